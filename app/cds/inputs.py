"""A service's inputs with their provenance: what the record gave for each, and why any is missing or unusable.

Between the record reader (``app.fhir.record``: FHIR in, values out) and a service's cards. A ``Finding`` is one
input as found (value, unit, date, source, the record's words); a ``Problem`` says why an input is missing, and
whether that stops the model (blocking) or is only a note. ``Inputs`` gathers both for one patient; a service
subclasses it for anything else it tracks. ``InputDisplay`` words the inputs the same way on the card and in the
explanation page's stored data, which ``app.smart.pages`` reads back (``inputs``, ``missing``, ``notes``, ``loinc``).

Usage: ``inputs.read_observations(READINGS, record, years_before(today, 2), call.unavailable)``, then
``DISPLAY.lines(inputs)`` on the card and ``DISPLAY.explained(inputs, inputs.blocking)`` in the stored data.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, ClassVar

from app.cds.cards import escape_markdown
from app.cds.service import PrefetchKey
from app.fhir.codes import LOINC, CodeSet
from app.fhir.record import Reader, Record, age_on, concept_text, number, onset, ref, short

# The input a note about incompletely read prefetch keys is filed under (``incomplete_note``).
INCOMPLETE = "incomplete"


@dataclass(frozen=True)
class Finding:
    """One input as found in the record. ``text`` is record text: escape it before it reaches Markdown."""

    value: Any
    unit: str = ""
    date: date | None = None
    source: str = ""  # "Type/id" (several joined by ", "), or the element read, such as "Patient.gender"
    text: str = ""
    note: str = ""
    old: bool = False

    def cited(self) -> dict[str, Any]:
        """The record's words, source and date, as the explanation page lists a medication or condition."""
        return {"text": self.text, "source": self.source, "date": iso_day(self.date)}


@dataclass(frozen=True)
class Problem:
    """Why an input is missing or unusable; a blocking problem prevents the model's result. ``message`` names no
    record id (cards show it); ``source`` is the record it is about ("Type/id"), for the explanation page only."""

    input: str
    message: str
    blocking: bool = True
    source: str = ""


@dataclass(frozen=True)
class ObservedInput:
    """An input read from the latest observation in a code set: its name, the prefetch key that carries it, the
    codes (whose name labels it in messages), how a value is read, and the display unit (quantities only: their
    values are compared at the one decimal shown)."""

    name: str
    key: str
    codes: CodeSet
    read: Reader
    unit: str = ""


@dataclass
class Inputs:
    """What the record gave for each input of a service, and what it did not."""

    patient_id: str | None = None
    findings: dict[str, Finding] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    # Blocking problems of these inputs are named first, in this order (the most fundamental first).
    first: ClassVar[tuple[str, ...]] = ()

    @property
    def blocking(self) -> list[Problem]:
        """Problems that prevent the result: those of ``first`` in its order, then the others as they came."""
        order = self.first
        return sorted((p for p in self.problems if p.blocking), key=lambda p: _rank(order, p.input))

    @property
    def notes(self) -> list[Problem]:
        """Problems that leave the result possible, said on the card as notes."""
        return [p for p in self.problems if not p.blocking]

    def add(self, name: str, found: Finding | Problem) -> None:
        """Record what reading input ``name`` gave: its finding, or the problem that says why there is none."""
        if isinstance(found, Problem):
            self.problems.append(found)
        else:
            self.findings[name] = found

    def values(self, names: Iterable[str]) -> dict[str, Any]:
        """The values of the named inputs that were found, in ``names`` order (a model's inputs)."""
        return {name: self.findings[name].value for name in names if name in self.findings}

    def basis(self, names: Iterable[str]) -> tuple[str, ...]:
        """The resources the named inputs came from, as "Type/id", the patient first, each once."""
        refs = [f"Patient/{self.patient_id}"] if self.patient_id else []
        for name in names:
            finding = self.findings.get(name)
            for source in finding.source.split(", ") if finding else ():
                if "/" in source and source not in refs:
                    refs.append(source)
        return tuple(refs)

    def read_latest(self, reading: ObservedInput, record: Record, old_before: date) -> None:
        """Record the latest observation with a usable value (old when dated before ``old_before``); say which newer
        ones were skipped and why.

        Two usable results at the same instant that disagree are a conflict the record must resolve: no value is
        picked from them, since which one is right cannot be told (and bundle order means nothing).
        """
        label, latest = reading.codes.name, record.latest(reading.codes, reading.read)
        skipped = [(f"({s.day.isoformat() if s.day else 'undated'}): {s.reason}", s.ref) for s in latest.skipped]
        found = latest.reading
        if found is None:
            if skipped:
                why, source = skipped[0]
                self.problems.append(Problem(reading.name, f"{label} not usable {why}", source=source))
            else:
                self.problems.append(Problem(reading.name, f"no {label} in the record"))
            return
        if reading.unit:  # quantities agree when they agree to the decimal shown
            values = latest.conflicting(lambda r: round(r.value, 1))
            conflict = f"{' vs '.join(number(v) for v in sorted(round(r.value, 1) for r in values))} {reading.unit}"
        else:
            values = latest.conflicting()
            conflict = " vs ".join(sorted({r.text for r in latest.same_time}))
        if values:
            message = f"{label} results at the same time on {found.day.isoformat()} disagree: {conflict}"
            self.problems.append(Problem(reading.name, message))
            return
        old = found.day is not None and found.day < old_before
        self.findings[reading.name] = Finding(
            found.value, reading.unit, found.day, found.ref, found.text, found.note, old
        )
        for why, source in skipped:
            self.problems.append(Problem(reading.name, f"a newer {label} was not used {why}", False, source))

    def read_observations(
        self, readings: Iterable[ObservedInput], record: Record, old_before: date, unavailable: Iterable[str] = ()
    ) -> None:
        """``read_latest`` for each reading; then an input not found whose prefetch key could not be fetched is
        reported as unseen ("could not be fetched") rather than as absent from the record."""
        readings, unavailable = list(readings), set(unavailable)
        for reading in readings:
            self.read_latest(reading, record, old_before)
        for reading in readings:
            if reading.key in unavailable and reading.name not in self.findings:
                self.problems = [p for p in self.problems if p.input != reading.name]
                self.problems.append(Problem(reading.name, f"{reading.codes.name} could not be fetched"))


def _rank(order: tuple[str, ...], name: str) -> int:
    return order.index(name) if name in order else len(order)


def latest_observations(codes: CodeSet, count: int = 5) -> PrefetchKey:
    """An optional prefetch of the patient's observations in ``codes``, newest first: the first page holds the
    latest values, so no further page is read."""
    search = f"Observation?patient={{{{context.patientId}}}}&code={codes.search_token()}&_sort=-date&_count={count}"
    return PrefetchKey(search, required=False, pages="first")


def age_input(birth_date: Any, day: date, allowed: tuple[float, float]) -> Finding | Problem:
    """The patient's age on ``day``, in years, from ``Patient.birthDate``, for a model valid at ages ``allowed``
    (inclusive), or the problem (input ``age``) that prevents it.

    A partial birth date (``1960``, ``1960-05``) gives the age the patient has certainly reached, with a note,
    and only when every age it allows is within ``allowed``: the model never gets an age that may be wrong.
    """
    age = age_on(birth_date, day)
    if isinstance(age, str):
        return Problem("age", age)
    youngest, oldest, written = age.least, age.most, age.written
    if youngest == oldest:
        return Finding(youngest, "years", None, "Patient.birthDate", written)
    low, high = allowed
    if not low <= youngest <= oldest <= high:
        limits = f"{number(low)}–{number(high)}"
        return Problem("age", f"age {youngest} or {oldest} (birth date {written} is partial) may be outside {limits}")
    note = f"at least {youngest}: the birth date ({written}) is partial"
    return Finding(youngest, "years", None, "Patient.birthDate", written, note)


def condition_finding(condition: dict[str, Any]) -> Finding:
    """A condition as a yes: dated by its onset (else when it was recorded), citing it, in the record's words."""
    when = onset(condition)
    text = short(concept_text(condition.get("code")) or "unnamed condition", 80)
    return Finding(True, "", when.day if when else None, ref(condition), text)


def any_of(found: list[Finding], source: str, none: str) -> Finding:
    """A yes/no input: yes, dated by the first record found and citing them all, or no (``none`` says what)."""
    if found:
        return Finding(True, "", found[0].date, ", ".join(f.source for f in found), "; ".join(f.text for f in found))
    return Finding(False, "", None, source, none)


def incomplete_note(keys: Iterable[str], words: Mapping[str, str]) -> Problem | None:
    """One note naming the prefetch keys of which not every page could be read (in ``words`` order, by their
    words there); None when there are none. What they hold is still used."""
    keys = set(keys)
    named = [phrase for key, phrase in words.items() if key in keys]
    if not named:
        return None
    names = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
    message = f"{names[0].upper()}{names[1:]} may be incomplete: not every page could be read from the EHR"
    return Problem(INCOMPLETE, message, blocking=False)


def problem_bullets(problems: Iterable[Problem]) -> list[str]:
    """Problems as Markdown bullets."""
    return [f"- {escape_markdown(p.message)}" for p in problems]


_INLINE = str.maketrans({c: "\\" + c for c in "\\`*_|~"} | {"<": "&lt;", ">": "&gt;", "&": "&amp;"})
# A bracket makes a link or image only when followed by (url), [label] or :url (CommonMark 6.3, 4.7).
_LINK_CLOSE = re.compile(r"\](?=[(\[:])")
# What makes a line a heading, a list item or a rule where it starts (CommonMark 4.1, 4.2, 5.2, 5.3).
_BLOCK_START = re.compile(r"^(?:#{1,6}(?=\s|$)|[+-](?=\s|$)|-{3,}\s*$|\d{1,9}(?=[.)](?:\s|$)))")


def inline_markdown(text: Any) -> str:
    """Record text for one Markdown line or table cell, on one line: raw HTML, links, images, emphasis, code,
    strikethrough and cell breaks neutralised (R-19) with as few backslashes as possible, so that what CommonMark
    would show anyway (parentheses, a bracketed brand name, ``#`` or ``+`` inside a line) is left as written and
    shows no stray escapes in renderers that do not read them."""
    out = _LINK_CLOSE.sub(r"\\]", " ".join(str(text).split()).translate(_INLINE))
    found = _BLOCK_START.match(out)
    if found:  # a heading, list or rule marker where a line starts
        out = out[: found.end()] + "\\" + out[found.end() :] if found.group()[0].isdigit() else "\\" + out
    return out


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A GitHub-flavoured Markdown table, every cell passed through ``inline_markdown``; an empty cell is kept."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(inline_markdown(c) for c in cells) + " |"

    return [line(header), "| " + " | ".join("---" for _ in header) + " |", *(line(r) for r in rows)]


def problem_notes(problems: Iterable[Problem]) -> list[str]:
    """Problems as Markdown paragraphs starting "Note:"."""
    return [f"\nNote: {escape_markdown(p.message)}" for p in problems]


def iso_day(value: date | None) -> str | None:
    """A date as stored in explanation data: ISO 8601, or None."""
    return value.isoformat() if value else None


def plain(value: Any) -> Any:
    """A value as JSON can store it: strings, numbers, booleans and None as they are, anything else as text."""
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


# Gives an input's value in words; the callable is applied to record text (Markdown escaping on cards).
ValueWords = Callable[[str, Finding, Callable[[str], str]], str]


@dataclass(frozen=True)
class InputDisplay:
    """How a service shows its inputs, worded the same on its cards and on its explanation page.

    ``labels`` names each input, in the order they are listed; ``shown(name, finding, esc)`` is the value in words,
    with ``esc`` applied to record text (``escape_markdown`` on cards, nothing in stored data); a date reads
    "measured 2020-01-01" unless ``date_verbs`` gives another verb; ``old_after_years`` is the age at which a value
    is marked old; ``loinc`` lists, by input, the LOINC codes that carry it, so that the explanation page can look
    for values recorded since the card.
    """

    labels: Mapping[str, str]
    shown: ValueWords
    old_after_years: int
    date_verbs: Mapping[str, str] = field(default_factory=dict)
    loinc: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def date_verb(self, name: str) -> str:
        return self.date_verbs.get(name, "measured")

    def line(self, name: str, finding: Finding) -> str:
        """One Markdown bullet: label, value, date, note, and a warning when the value is old."""
        parts = [f"- **{self.labels[name]}:** {self.shown(name, finding, escape_markdown)}"]
        if finding.date:
            parts.append(f", {self.date_verb(name)} {finding.date.isoformat()}")
        if finding.note:
            parts.append(f"; {escape_markdown(finding.note)}")
        if finding.old:
            parts.append(f" — **older than {self.old_after_years} years**")
        return "".join(parts)

    def lines(self, inputs: Inputs) -> list[str]:
        """One bullet per input found, in ``labels`` order."""
        return [self.line(name, inputs.findings[name]) for name in self.labels if name in inputs.findings]

    def entry(self, name: str, finding: Finding) -> dict[str, Any]:
        """One input as the explanation page lists it (the record's own words, unescaped)."""
        return {
            "name": name,
            "label": self.labels[name],
            "value": plain(finding.value),
            "display": self.shown(name, finding, str),
            "unit": finding.unit,
            "date": iso_day(finding.date),
            "date_kind": self.date_verb(name),
            "source": finding.source,
            "note": finding.note,
            "old": finding.old,
            "loinc": list(self.loinc.get(name, ())),
        }

    def explained(self, inputs: Inputs, blocking: Iterable[Problem]) -> dict[str, Any]:
        """The explanation data's ``inputs`` (found, in ``labels`` order), ``missing`` (``blocking``) and ``notes``."""
        return {
            "inputs": [self.entry(name, inputs.findings[name]) for name in self.labels if name in inputs.findings],
            "missing": [
                {"input": p.input, "label": self.labels.get(p.input, p.input), "message": p.message}
                | ({"source": p.source} if p.source else {})
                for p in blocking
            ],
            "notes": [f"{p.message} ({p.source})" if p.source else p.message for p in inputs.notes],
        }

    def codes(self) -> dict[str, Any]:
        """The explanation data's ``loinc_system`` and ``loinc``: what the page searches for newer values."""
        return {"loinc_system": LOINC, "loinc": {name: list(codes) for name, codes in self.loinc.items()}}
