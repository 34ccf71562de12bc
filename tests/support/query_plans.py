"""Query plans for tests: record the SQL an engine runs, EXPLAIN it with its own parameters, and name what reads
a whole table or sorts it (PostgreSQL ``EXPLAIN (FORMAT JSON)``, SQLite ``EXPLAIN QUERY PLAN``)."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

# Only these can have a plan; BEGIN, COMMIT, PRAGMA, SAVEPOINT and the like are skipped.
_PLANNED = re.compile(r"^\s*(WITH|SELECT|INSERT|UPDATE|DELETE)\b", re.IGNORECASE)
_SQLITE_ACCESS = re.compile(r"^(SCAN|SEARCH) (\w+)(?: AS (\w+))?(?: USING (?:COVERING )?INDEX (\w+))?")
_PLACEHOLDER = r"(?:\?|%\(\w+\)s(?:::\w+)?)"  # SQLite's, or psycopg's with SQLAlchemy's cast
_PLACEHOLDER_RUN = re.compile(rf"({_PLACEHOLDER})(?:, {_PLACEHOLDER}){{4,}}")
_SQLITE_SORT = re.compile(r"^USE TEMP B-TREE FOR (?:RIGHT PART OF |LAST TERM OF )?ORDER BY")


@dataclass(frozen=True)
class Statement:
    """One statement as the driver received it: text with placeholders, and the parameters bound to them."""

    sql: str
    parameters: Any

    def describe(self) -> str:
        """One line each for the text and the parameters, long IN lists shortened."""
        sql = _PLACEHOLDER_RUN.sub(lambda run: f"{run.group(1)}, ... ({run.group(0).count(',') + 1} values)", self.sql)
        parameters = repr(self.parameters)
        return f"{' '.join(sql.split())}\n  parameters: {parameters[:400]}{' ...' if len(parameters) > 400 else ''}"


@dataclass(frozen=True)
class Plan:
    text: str  # readable, for failure messages
    offences: tuple[str, ...]  # what reads all of the table or sorts its rows; empty when the plan is clean


class StatementLog:
    """The planned statements an engine executes while a label is set, grouped by label (e.g. the function run)."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine
        self.by_label: dict[str, list[Statement]] = {}
        self._label: str | None = None
        sa.event.listen(engine, "before_cursor_execute", self._record)

    def close(self) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._record)

    @contextlib.contextmanager
    def labelled(self, label: str) -> Iterator[None]:
        self._label = label
        self.by_label.setdefault(label, [])
        try:
            yield
        finally:
            self._label = None

    def _record(self, conn, cursor, statement, parameters, context, executemany):
        if self._label is None or not _PLANNED.match(statement):
            return
        if executemany:  # one row's parameters plan the same as any other's
            parameters = parameters[0]
        self.by_label[self._label].append(Statement(statement, parameters))


def explain(engine: sa.Engine, statement: Statement, tables: Collection[str]) -> Plan:
    """The plan of ``statement`` on ``engine``, with what in it reads every row of one of ``tables`` or sorts
    its rows."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if engine.dialect.name == "sqlite":
            cursor.execute(f"EXPLAIN QUERY PLAN {statement.sql}", statement.parameters)
            ordered = all(re.search(rf"\b{word}\b", statement.sql, re.IGNORECASE) for word in ("ORDER BY", "LIMIT"))
            return _sqlite_plan(cursor.fetchall(), tables, ordered)
        cursor.execute(f"EXPLAIN (FORMAT JSON) {statement.sql}", statement.parameters)
        document = cursor.fetchone()[0]
        if isinstance(document, str):
            document = json.loads(document)
        return _postgres_plan(document[0]["Plan"], tables)
    finally:
        raw.rollback()
        raw.close()


def _is_table(name: str, tables: Collection[str]) -> bool:
    """SQLite names an access by its alias; SQLAlchemy's anonymous aliases are ``<table>_<n>``."""
    return re.sub(r"_\d+$", "", name) in tables or name in tables


def _sqlite_plan(rows: list[tuple], tables: Collection[str], ordered: bool) -> Plan:
    """``EXPLAIN QUERY PLAN`` rows are (id, parent, _, detail).

    ``SCAN t`` walks all of t in rowid order, ``SCAN t USING [COVERING] INDEX i`` all of i in its order. Either
    stops early only when it yields the rows in the order the statement asks for and a LIMIT ends it (ORDER BY
    and LIMIT in the text, as the plan does not show them, and no sort next to the walk); otherwise it is a
    full scan. ``USE TEMP B-TREE FOR ORDER BY`` next to an access of t (directly, or through the branches of a
    ``MULTI-INDEX OR``) sorts t's rows."""
    children: dict[int, list[tuple[int, str]]] = {}
    for node, parent, _, detail in rows:
        children.setdefault(parent, []).append((node, detail))
    offences = []
    for siblings in children.values():
        sorts = [detail for _, detail in siblings if _SQLITE_SORT.match(detail)]
        for _, detail in siblings:
            access = _sqlite_access(detail, tables)
            if access and access.group(1) == "SCAN" and (sorts or not ordered):
                offences.append(f"full {'index walk' if access.group(4) else 'scan'}: {detail}")
        if any(_sqlite_reads(children, node, detail, tables) for node, detail in siblings):
            offences += [f"sort: {detail}" for detail in sorts]
    return Plan(_sqlite_text(children, 0, 0), tuple(offences))


def _sqlite_access(detail: str, tables: Collection[str]) -> re.Match | None:
    """The SCAN or SEARCH of one of ``tables`` that ``detail`` describes, if it is one."""
    access = _SQLITE_ACCESS.match(detail)
    return access if access and _is_table(access.group(3) or access.group(2), tables) else None


def _sqlite_reads(children: dict[int, list[tuple[int, str]]], node: int, detail: str, tables: Collection[str]) -> bool:
    if _sqlite_access(detail, tables):
        return True
    if detail == "MULTI-INDEX OR" or detail.startswith("INDEX "):
        return any(_sqlite_reads(children, child, text, tables) for child, text in children.get(node, []))
    return False


def _sqlite_text(children: dict[int, list[tuple[int, str]]], parent: int, depth: int) -> str:
    lines = []
    for node, detail in children.get(parent, []):
        lines.append("  " * depth + detail)
        subtree = _sqlite_text(children, node, depth + 1)
        if subtree:
            lines.append(subtree)
    return "\n".join(lines)


def _postgres_plan(root: dict, tables: Collection[str]) -> Plan:
    """A ``Seq Scan`` of a table reads all of it, and so does an index scan with no ``Index Cond`` unless a
    ``Limit`` above it stops it early. A ``Sort`` or ``Incremental Sort`` whose input reaches a scan of
    the table with no ``Limit`` or aggregate between them sorts that table's rows."""
    offences = []

    def visit(node: dict, sorting: str | None, limited: bool) -> None:
        kind = node["Node Type"]
        table = node.get("Relation Name")
        if table in tables:
            if kind == "Seq Scan":
                offences.append(f"full scan: Seq Scan on {table}")
            elif kind in ("Index Scan", "Index Only Scan") and "Index Cond" not in node and not limited:
                offences.append(f"full index walk, no Limit: {kind} on {table} using {node.get('Index Name')}")
            if sorting:
                offences.append(f"sort: {sorting} over {kind} on {table}")
        if kind in ("Sort", "Incremental Sort"):
            sorting = f"{kind} by {', '.join(node.get('Sort Key', []))}"
        elif kind in ("Limit", "Aggregate", "Group"):
            sorting, limited = None, limited or kind == "Limit"
        for child in node.get("Plans", []):
            visit(child, sorting, limited)

    visit(root, None, False)
    return Plan(_postgres_text(root, 0), tuple(dict.fromkeys(offences)))


def _postgres_text(node: dict, depth: int) -> str:
    detail = node["Node Type"]
    if "Relation Name" in node:
        detail += f" on {node['Relation Name']}"
    if "Index Name" in node:
        detail += f" using {node['Index Name']}"
    for key in ("Sort Key", "Index Cond", "Filter", "Join Filter", "Hash Cond", "Group Key"):
        if key in node:
            value = str(node[key])
            detail += f" [{key}: {value[:200]}{' ...' if len(value) > 200 else ''}]"
    detail += f" (rows={node.get('Plan Rows')}, cost={node.get('Total Cost')})"
    lines = ["  " * depth + detail] + [_postgres_text(child, depth + 1) for child in node.get("Plans", [])]
    return "\n".join(lines)
