"""A run's outputs: the scored buckets merged into the files users read, with their manifest.

``RiskAssessment.ndjson`` and ``OperationOutcome.ndjson`` hold the buckets' lines in bucket order (patients by
id within each), then the export's bad lines; ``worklist.csv`` is sorted by risk, highest first; ``manifest.json``
lists every file with its line count and sha256. Each file is written whole or not at all, so finishing again
after a kill rewrites the same bytes.
"""

from __future__ import annotations

import csv
import hashlib
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from app.batch.parts import WORKLIST_FIELDS, open_private, write_atomically

RISK_ASSESSMENTS = "RiskAssessment.ndjson"
OUTCOMES = "OperationOutcome.ndjson"
WORKLIST = "worklist.csv"
REPORT = "report.html"
MANIFEST = "manifest.json"


def _concatenate(target: Path, sources: Iterable[Path]) -> None:
    """``target`` made of ``sources`` back to back, atomically."""
    temporary = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}"
    with open_private(temporary) as out:
        for source in sources:
            if source.is_file():
                with open(source, "rb") as handle:
                    while chunk := handle.read(1 << 20):
                        out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, target)


def _worklist(target: Path, sources: Iterable[Path]) -> None:
    """One CSV, with a header: patients proposed treatment whatever their risk first (no risk shown), then by risk,
    highest first; patient id within each."""
    rows: list[list[str]] = []
    for source in sources:
        with open(source, newline="") as handle:
            rows.extend(csv.reader(handle))
    rows.sort(key=lambda row: (-float(row[1]) if row[1] else float("-inf"), row[0]))
    temporary = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}"
    with open_private(temporary, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(WORKLIST_FIELDS)
        writer.writerows(rows)
    os.replace(temporary, target)


def file_facts(path: Path) -> dict[str, Any]:
    """A file's name, line count and sha256, as the manifest lists it."""
    digest, lines = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            lines += chunk.count(b"\n")
    return {"name": path.name, "lines": lines, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def merge(run_dir: Path, buckets: int, ranges: int) -> list[dict[str, Any]]:
    """Write the merged outputs from the parts; the facts of each file written."""
    parts = [run_dir / "parts" / f"b{b:06d}" for b in range(buckets)]
    bad = [run_dir / "split" / f"{i:05d}" / "bad.ndjson" for i in range(ranges)]
    _concatenate(run_dir / RISK_ASSESSMENTS, (p / RISK_ASSESSMENTS for p in parts))
    _concatenate(run_dir / OUTCOMES, [*(p / OUTCOMES for p in parts), *bad])
    _worklist(run_dir / WORKLIST, (p / WORKLIST for p in parts))
    return [file_facts(run_dir / name) for name in (RISK_ASSESSMENTS, OUTCOMES, WORKLIST)]


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    """``manifest.json``, with the report's own facts added to its file list."""
    files = [f for f in manifest.get("files", []) if f["name"] != REPORT]
    if (run_dir / REPORT).is_file():
        files.append(file_facts(run_dir / REPORT))
    write_atomically(run_dir / MANIFEST, orjson.dumps({**manifest, "files": files}, option=orjson.OPT_INDENT_2))
