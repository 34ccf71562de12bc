"""A run's work on disk: exported files cut into line ranges, ranges split into patient buckets, buckets scored.

Layout under ``BATCH_DIR/RUN/`` (every directory private to the service, every step atomic)::

    export/NNN-Type.ndjson         the export's files, as downloaded
    split/RRRRR/                   range RRRRR's lines, one file per bucket (bBBBBB.ndjson), shared.ndjson
                                   (resources of no patient, e.g. Medication) and bad.ndjson (OperationOutcome)
    parts/bBBBBB/                  bucket BBBBB scored: RiskAssessment.ndjson, OperationOutcome.ndjson,
                                   worklist.csv and summary.json

A step writes into a temporary directory and renames it into place, so a directory that exists is complete:
that rename is the checkpoint, and a step killed before it is simply done again (its output is the same).
Every patient's resources land in one bucket (by a hash of the patient id), so each patient is scored exactly
once however the export spread them over files; a bucket holds about ``BATCH_PART_BYTES`` of NDJSON whatever
the population's size, which bounds memory.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import math
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from app.ai.types import ModelUnavailable
from app.batch.scoring import NotScored, PatientResources, Population, Scored
from app.fhir.compartment import PATIENT_LINKS, Compartment
from app.logs import describe
from app.private_files import private_folders, tighten

log = logging.getLogger(__name__)

CHUNK = 1 << 20
SHARED_TYPES = frozenset({"Medication"})  # resources of no patient that scoring may need (MedicationRequest refs)
HISTOGRAM_STEP = 0.005  # 0.5 % bins: the 5 %, 7.5 % and 20 % thresholds fall on bin edges
HISTOGRAM_TOP = 0.30  # one bin for 30 % and over
WORKLIST_FIELDS = ("patient", "risk_percent", "category", "action")
REASON_SYSTEM = "urn:clinical-ai-gateway:batch:not-scored-reason"
SUBJECT_EXTENSION = "urn:clinical-ai-gateway:batch:subject"
UNREADABLE = "record could not be read"  # the NotScored reason of a patient whose scoring raised


class UnsafeDirectory(Exception):
    """BATCH_DIR is writable by other users and is not ours to make private: a run must not write PHI there."""


def private_root(root: Path) -> Path:
    """BATCH_DIR, made private when missing or ours (as INSTANCE_PATH is); UnsafeDirectory when others may write in
    it and it is not ours to change (another user's, or shared with the sticky bit): they could read a run's PHI
    or put files in its place."""
    private_folders(root)
    info = root.stat()
    problem = None
    if info.st_mode & stat.S_ISVTX:
        problem = "is a shared folder (sticky bit)"
    elif info.st_uid != os.geteuid():
        problem = f"belongs to another user (uid {info.st_uid})"
    if problem and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeDirectory(
            f"BATCH_DIR {root} is writable by group or others and {problem}: give the service a folder of its own "
            "(0700) or set BATCH_DIR to another directory"
        )
    if problem is None:
        try:
            tighten(root)
        except OSError as exc:
            raise UnsafeDirectory(f"BATCH_DIR {root} cannot be made private ({exc.strerror})") from None
    return root


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path | None]:
    """A temporary directory beside ``final``, renamed to it on success; yields None when ``final`` exists (the
    step was done before). A step killed half-way leaves only a temporary directory, removed next time."""
    if final.is_dir():
        yield None
        return
    private_folders(final.parent)
    for stale in final.parent.glob(f".{final.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    temporary = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}"
    private_folders(temporary)
    try:
        yield temporary
        for name in os.listdir(temporary):
            with open(temporary / name, "rb") as handle:
                os.fsync(handle.fileno())
        try:
            os.rename(temporary, final)
        except OSError:
            if not final.is_dir():  # another worker finished the same step first: theirs is as good
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def write_atomically(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: a temporary file, fsync, rename."""
    private_folders(path.parent)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}"
    with open(temporary, "wb", opener=_private_opener) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _private_opener(path: str, flags: int) -> int:
    descriptor = os.open(path, flags, 0o600)
    os.fchmod(descriptor, 0o600)  # a file left by an earlier attempt keeps its mode through os.open
    return descriptor


def open_private(path: Path, mode: str = "wb"):
    """Open a file readable by the service alone (0600 whatever the umask, and whatever an old file had)."""
    return open(path, mode, opener=_private_opener)


# ---- planning: exported files cut into line ranges ---------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """Bytes ``start``..``end`` of ``file`` (relative to the run directory), whole lines, the first being line
    number ``first_line`` (1-based) of the file."""

    file: str
    start: int
    end: int
    first_line: int

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "start": self.start, "end": self.end, "firstLine": self.first_line}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Range:
        return cls(data["file"], int(data["start"]), int(data["end"]), int(data["firstLine"]))


def plan_ranges(run_dir: Path, files: list[str], part_bytes: int) -> list[Range]:
    """Cut each file into ranges of about ``part_bytes`` that start and end on line boundaries."""
    ranges: list[Range] = []
    for name in files:
        start, line, position, lines_seen = 0, 1, 0, 0
        with open(run_dir / name, "rb") as handle:
            while chunk := handle.read(CHUNK):
                offset = 0
                while True:
                    cut = start + part_bytes
                    if cut >= position + len(chunk):
                        break
                    newline = chunk.find(b"\n", max(cut - position, offset))
                    if newline < 0:
                        break
                    end = position + newline + 1
                    inside = chunk.count(b"\n", 0, newline + 1)
                    ranges.append(Range(name, start, end, line))
                    line = 1 + lines_seen + inside
                    start, offset = end, newline + 1
                lines_seen += chunk.count(b"\n")
                position += len(chunk)
        if position > start:
            ranges.append(Range(name, start, position, line))
    return ranges


def bucket_count(total_bytes: int, part_bytes: int) -> int:
    """Buckets of about ``part_bytes`` each (at least one)."""
    return max(1, math.ceil(total_bytes / part_bytes))


def bucket_of(patient_id: str, buckets: int) -> int:
    """A patient's bucket: stable across processes and hosts (not Python's salted ``hash``)."""
    digest = hashlib.blake2b(patient_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


def patient_of(resource: dict[str, Any], server: Compartment) -> str | None:
    """The id of the patient a resource belongs to by the hook's rule (``app.fhir.compartment``): its patient link
    is ``Patient/id`` relative or absolute under the export's server (``server``, a Compartment of no patient),
    and names no one else; None for a bare id, a ``urn:uuid:``, a contained or another server's patient, and for
    resources of no patient. The Patient's own id for a Patient."""
    kind = resource.get("resourceType")
    if kind == "Patient":
        ident = resource.get("id")
        valid = isinstance(ident, str) and server.target({"reference": f"Patient/{ident}"}) == f"Patient/{ident}"
        candidate = ident if valid else None
    else:
        candidate = _linked_patient(resource, PATIENT_LINKS.get(kind, ()), server)
    return candidate if candidate and Compartment(candidate, server.fhir_server).holds(resource) else None


def _linked_patient(resource: dict[str, Any], paths: tuple[str, ...], server: Compartment) -> str | None:
    """The first patient a top-level patient link names: the one ``holds`` is then asked about. Links through a
    repeating element (an Appointment's participants, a Group's members) name no one patient and give None."""
    for path in paths:
        links = resource.get(path)  # None for a dotted path
        for link in links if isinstance(links, list) else (links,):
            target = server.target(link)
            if target and target.startswith("Patient/"):
                return target.removeprefix("Patient/")
    return None


def bad_line(where: str, why: str) -> dict[str, Any]:
    """The OperationOutcome for an input line that cannot be used (no content of the line: it may be PHI)."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "structure", "diagnostics": f"{where}: {why}"}],
    }


# ---- splitting: a range's lines into patient buckets ------------------------------------------------------------


@dataclass(frozen=True)
class SplitCounts:
    """A range's lines: all, unreadable, shared (Medication...), and ``dropped``: resources of no patient of the
    export (another server's, a bare id...), left out unscored."""

    lines: int
    bad: int
    shared: int
    dropped: int = 0

    def to_json(self) -> dict[str, int]:
        return {"lines": self.lines, "bad": self.bad, "shared": self.shared, "dropped": self.dropped}


def split_range(run_dir: Path, index: int, part: Range, buckets: int, fhir_server: str) -> SplitCounts | None:
    """Copy range ``index``'s lines into one file per bucket under ``split/RRRRR``, each resource to the bucket of
    the patient it belongs to on ``fhir_server`` (the export's); None when it was done before."""
    final = run_dir / "split" / f"{index:05d}"
    server = Compartment(None, fhir_server)
    with atomic_dir(final) as out:
        if out is None:
            return None
        handles: dict[int, Any] = {}
        lines = bad = shared = dropped = 0
        bad_lines: list[bytes] = []
        shared_lines: list[bytes] = []
        try:
            with open(run_dir / part.file, "rb") as source:
                source.seek(part.start)
                stream = io.BufferedReader(_Limited(source, part.end - part.start), CHUNK)
                for number, raw in enumerate(stream, start=part.first_line):
                    line = raw.strip()
                    if not line:
                        continue
                    lines += 1
                    where = f"{Path(part.file).name} line {number}"
                    try:
                        resource = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        bad += 1
                        bad_lines.append(orjson.dumps(bad_line(where, "not valid JSON")))
                        continue
                    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
                        bad += 1
                        bad_lines.append(orjson.dumps(bad_line(where, "not a FHIR resource (no resourceType)")))
                        continue
                    patient = patient_of(resource, server)
                    if patient is None:
                        if resource["resourceType"] in SHARED_TYPES and isinstance(resource.get("id"), str):
                            shared += 1
                            shared_lines.append(line)
                        else:
                            dropped += 1
                        continue
                    bucket = bucket_of(patient, buckets)
                    handle = handles.get(bucket)
                    if handle is None:
                        handle = handles[bucket] = open_private(out / f"b{bucket:06d}.ndjson")
                    handle.write(line + b"\n")
        finally:
            for handle in handles.values():
                handle.close()
        for name, rows in (("bad.ndjson", bad_lines), ("shared.ndjson", shared_lines)):
            with open_private(out / name) as handle:
                handle.writelines(row + b"\n" for row in rows)
        counts = SplitCounts(lines, bad, shared, dropped)
        with open_private(out / "counts.json") as handle:
            handle.write(orjson.dumps(counts.to_json()))
    return counts


class _Limited(io.RawIOBase):
    """At most ``left`` bytes of an open file, from where it stands."""

    def __init__(self, source, left: int):
        self._source, self._left = source, left

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buffer)[: self._left]
        count = self._source.readinto(view)
        self._left -= count or 0
        return count or 0


def split_done(run_dir: Path, ranges: int) -> bool:
    """Whether every range has been split."""
    return all((run_dir / "split" / f"{i:05d}").is_dir() for i in range(ranges))


# ---- scoring: one bucket's patients --------------------------------------------------------------------------------


def shared_resources(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every range's shared resources (Medication...), by "Type/id"."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((run_dir / "split").glob("*/shared.ndjson")):
        with open(path, "rb") as handle:
            for line in handle:
                resource = orjson.loads(line)
                found[f"{resource['resourceType']}/{resource['id']}"] = resource
    return found


def bucket_patients(run_dir: Path, bucket: int, fhir_server: str) -> dict[str, list[dict[str, Any]]]:
    """The bucket's resources grouped by patient, each (type, id) once."""
    server = Compartment(None, fhir_server)
    patients: dict[str, list[dict[str, Any]]] = {}
    seen: set[tuple[str, str]] = set()
    for path in sorted((run_dir / "split").glob(f"*/b{bucket:06d}.ndjson")):
        with open(path, "rb") as handle:
            for line in handle:
                resource = orjson.loads(line)
                key = (resource["resourceType"], resource.get("id") or "")
                if key[1] and key in seen:
                    continue
                seen.add(key)
                patients.setdefault(patient_of(resource, server), []).append(resource)  # type: ignore[arg-type]
    return patients


def histogram_bin(probability: float, bins: int) -> int:
    """The 0.5 % bin of a risk, rounded to 0.1 % first as its category is, so bar and category agree."""
    tenths = round(probability * 1000)
    return min(max(tenths // round(HISTOGRAM_STEP * 1000), 0), bins - 1)


@dataclass
class BucketSummary:
    """What a scored bucket counts (its ``summary.json``): plain numbers, never patient data."""

    patients: int = 0
    scored: int = 0
    not_scored: int = 0
    worklist: int = 0
    by_category: dict[str, int] | None = None
    reasons: dict[str, int] | None = None
    histogram: list[int] | None = None

    def __post_init__(self) -> None:
        self.by_category = self.by_category or {}
        self.reasons = self.reasons or {}
        self.histogram = self.histogram or [0] * (round(HISTOGRAM_TOP / HISTOGRAM_STEP) + 1)

    def add(self, outcome: Scored | NotScored) -> None:
        self.patients += 1
        if isinstance(outcome, NotScored):
            self.not_scored += 1
            self.reasons[outcome.reason] = self.reasons.get(outcome.reason, 0) + 1
            self.worklist += 1 if outcome.action else 0
            return
        self.scored += 1
        self.by_category[outcome.category] = self.by_category.get(outcome.category, 0) + 1
        self.histogram[histogram_bin(outcome.probability, len(self.histogram))] += 1
        if outcome.action:
            self.worklist += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "patients": self.patients,
            "scored": self.scored,
            "notScored": self.not_scored,
            "worklist": self.worklist,
            "byCategory": self.by_category,
            "reasons": self.reasons,
            "histogram": self.histogram,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BucketSummary:
        return cls(
            data["patients"],
            data["scored"],
            data["notScored"],
            data["worklist"],
            dict(data["byCategory"]),
            dict(data["reasons"]),
            list(data["histogram"]),
        )

    def merge(self, other: BucketSummary) -> None:
        self.patients += other.patients
        self.scored += other.scored
        self.not_scored += other.not_scored
        self.worklist += other.worklist
        for mine, theirs in ((self.by_category, other.by_category), (self.reasons, other.reasons)):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count
        self.histogram = [a + b for a, b in zip(self.histogram, other.histogram, strict=True)]


@dataclass(frozen=True)
class Identity:
    """How a run names what it writes: the identifier system and the run, so that RiskAssessment identifiers
    are the same however often a part runs (the conditional create's key)."""

    system: str
    run_id: str

    def value(self, patient_id: str) -> str:
        return f"{self.run_id}/{patient_id}"


def risk_assessment(
    identity: Identity, patient_id: str, scored: Scored, population: Population, occurrence: str
) -> dict[str, Any]:
    """The RiskAssessment for a scored patient: probability, category, model and version, inputs as ``basis``."""
    return {
        "resourceType": "RiskAssessment",
        "identifier": [{"system": identity.system, "value": identity.value(patient_id)}],
        "status": "final",
        "subject": {"reference": f"Patient/{patient_id}"},
        "occurrenceDateTime": occurrence,
        "method": {"text": f"{population.method} ({scored.model} {scored.version})"},
        "basis": [{"reference": reference} for reference in scored.basis],
        "prediction": [
            {
                "outcome": {"text": population.outcome},
                "probabilityDecimal": round(scored.probability, 6),
                "qualitativeRisk": {"text": scored.category},
                "whenRange": {
                    "high": {"value": 10, "unit": "years", "system": "http://unitsofmeasure.org", "code": "a"}
                },
            }
        ],
        "note": [{"text": f"Model {scored.model} version {scored.version}"}],
    }


def not_scored_outcome(patient_id: str, outcome: NotScored, population: Population) -> dict[str, Any]:
    """The OperationOutcome for a patient not scored, with the reason's code and the patient it is about."""
    label = population.reasons.get(outcome.reason, outcome.reason)
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "information",
                "code": "incomplete",
                "details": {"coding": [{"system": REASON_SYSTEM, "code": outcome.reason}], "text": label},
                "diagnostics": outcome.message,
                "extension": [{"url": SUBJECT_EXTENSION, "valueReference": {"reference": f"Patient/{patient_id}"}}],
            }
        ],
    }


def score_one(score: Callable[[PatientResources], Scored | NotScored], patient: PatientResources) -> Scored | NotScored:
    """``score`` of one patient; a patient whose record makes it raise is NotScored (UNREADABLE), so one bad
    record never costs the others. A model that is unavailable still raises: the whole bucket waits for it."""
    try:
        return score(patient)
    except ModelUnavailable:
        raise
    except Exception as exc:  # the type and place only: the message may quote the record
        log.warning("batch: a patient's record could not be scored: %s", describe(exc))
        return NotScored(UNREADABLE, f"the record could not be read ({type(exc).__name__})")


def score_bucket(
    run_dir: Path,
    bucket: int,
    score: Callable[[PatientResources], Scored | NotScored],
    population: Population,
    identity: Identity,
    occurrence: str,
    today,
    fhir_server: str,
) -> BucketSummary | None:
    """Score every patient of a bucket into ``parts/bBBBBB``; None when it was done before. A model that is
    unavailable raises before anything is written: the bucket is done again later."""
    final = run_dir / "parts" / f"b{bucket:06d}"
    if final.is_dir():
        return None
    shared = shared_resources(run_dir)
    patients = bucket_patients(run_dir, bucket, fhir_server)
    summary = BucketSummary()
    assessments, outcomes, worklist = [], [], []
    for patient_id in sorted(patients):
        resources = patients[patient_id]
        if not any(r.get("resourceType") == "Patient" for r in resources):
            outcome: Scored | NotScored = NotScored("patient", "the export holds no Patient resource for this patient")
        else:
            outcome = score_one(score, PatientResources(patient_id, resources, today, shared))
        summary.add(outcome)
        if isinstance(outcome, NotScored):
            outcomes.append(orjson.dumps(not_scored_outcome(patient_id, outcome, population)))
            if outcome.action:  # no risk, and a proposal all the same: the group calls for treatment whatever the risk
                group = population.reasons.get(outcome.reason, outcome.reason)
                worklist.append((patient_id, "", group, outcome.action))
            continue
        assessments.append(orjson.dumps(risk_assessment(identity, patient_id, outcome, population, occurrence)))
        if outcome.action:
            worklist.append((patient_id, f"{outcome.probability * 100:.1f}", outcome.category, outcome.action))
    with atomic_dir(final) as out:
        if out is None:
            return None
        for name, rows in (("RiskAssessment.ndjson", assessments), ("OperationOutcome.ndjson", outcomes)):
            with open_private(out / name) as handle:
                handle.writelines(row + b"\n" for row in rows)
        with open_private(out / "worklist.csv", "w") as handle:
            csv.writer(handle, lineterminator="\n").writerows(worklist)
        with open_private(out / "summary.json") as handle:
            handle.write(orjson.dumps(summary.to_json()))
    return summary


def scored_done(run_dir: Path, buckets: int) -> bool:
    return all((run_dir / "parts" / f"b{b:06d}").is_dir() for b in range(buckets))


def progress(run_dir: Path) -> BucketSummary:
    """The counts of the buckets scored so far."""
    total = BucketSummary()
    for path in (run_dir / "parts").glob("b*/summary.json"):
        total.merge(BucketSummary.from_json(orjson.loads(path.read_bytes())))
    return total
