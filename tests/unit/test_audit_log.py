"""Audit records: no caller can make one long; each is one line of valid JSON that lands whole, also in a pipe."""

from __future__ import annotations

import json
import os
import select
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from app.audit import MAX_ITEMS, MAX_RECORD_BYTES, MAX_TEXT_CHARS, AuditLog

ROOT = Path(__file__).resolve().parents[2]
PIPE_BUF = 4096


@pytest.fixture
def log_path(tmp_path) -> Path:
    return tmp_path / "audit.jsonl"


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_short_fields_are_written_as_given_with_no_truncated_marker(log_path):
    AuditLog(str(log_path)).record(
        "hook", iss="https://ehr.example", hookInstance="d1577c69", cards=2, prefetch_dropped_by_key={"patient": 1}
    )
    record = json.loads(lines(log_path)[0])
    assert record["iss"] == "https://ehr.example" and record["hookInstance"] == "d1577c69"
    assert record["cards"] == 2 and record["prefetch_dropped_by_key"] == {"patient": 1}
    assert "truncated" not in record


def test_long_text_is_cut_and_the_field_named_in_truncated(log_path):
    AuditLog(str(log_path)).record("hook", hookInstance="h" * 100_000, user="Practitioner/" + "u" * 5000, status=200)
    [line] = lines(log_path)
    record = json.loads(line)
    assert record["hookInstance"] == "h" * MAX_TEXT_CHARS
    assert record["user"].startswith("Practitioner/uuu") and len(record["user"]) == MAX_TEXT_CHARS
    assert record["truncated"] == ["hookInstance", "user"]
    assert record["status"] == 200
    assert len(line) <= MAX_RECORD_BYTES


def test_a_long_list_of_card_ids_is_cut(log_path):
    cards = [f"{n:08d}-3283-4575-ab82-028d55fe2719" for n in range(10_000)]
    AuditLog(str(log_path)).record("feedback", entries=10_000, cards=cards)
    [line] = lines(log_path)
    record = json.loads(line)
    assert record["cards"] == cards[:MAX_ITEMS]
    assert record["entries"] == 10_000
    assert record["truncated"] == ["cards"]


@pytest.mark.parametrize(
    "text",
    ["x" * 10_000, "\u0000" * 10_000, "\U0001f600" * 10_000, "a\nb\r\n" * 3000],
    ids=["ascii", "control-characters", "four-byte-characters", "newlines"],
)
def test_a_record_with_every_field_long_stays_one_line_under_the_size_cap(log_path, text):
    fields = {f"field{n}": text for n in range(25)}
    AuditLog(str(log_path)).record("hook", **fields, nested={"k" * 500: [text] * 100})
    [line] = lines(log_path)
    assert len(line) <= MAX_RECORD_BYTES < PIPE_BUF
    record = json.loads(line)
    assert record["event"] == "hook" and record["truncated"]


def test_a_lone_surrogate_does_not_lose_the_record(log_path):
    AuditLog(str(log_path)).record("feedback", cards=["card-\ud800"], status=200)
    record = json.loads(lines(log_path)[0])
    assert record["status"] == 200 and record["cards"][0].startswith("card-")


def test_an_integer_beyond_64_bits_does_not_lose_the_record(log_path):
    AuditLog(str(log_path)).record("hook", entries=10**400, status=200)
    record = json.loads(lines(log_path)[0])
    assert record["status"] == 200 and record["truncated"] == ["entries"]


def test_the_log_file_is_0600_even_when_it_existed_readable_by_others(log_path):
    log_path.write_text("")
    os.chmod(log_path, 0o644)
    AuditLog(str(log_path)).record("hook")
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600


def test_a_missing_log_folder_is_created_0700_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        AuditLog(str(tmp_path / "logs" / "audit.jsonl")).record("hook")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "logs").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "logs" / "audit.jsonl").stat().st_mode) == 0o600


WRITER = """
import sys
from app.audit import AuditLog
log = AuditLog("-")
for n in range(int(sys.argv[1])):
    log.record("hook", hookInstance=sys.argv[2] * 60_000, user="Practitioner/" + str(n) * 3000, cards=["c" * 90] * 500)
"""


def test_records_from_several_processes_on_one_pipe_stay_whole():
    """AUDIT_LOG=- under gunicorn: every worker writes to the same pipe; a write over PIPE_BUF may interleave."""
    read_end, write_end = os.pipe()
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, "200", letter], cwd=ROOT, stdout=write_end) for letter in "abcd"
    ]
    os.close(write_end)
    received = bytearray()
    while True:
        ready, _, _ = select.select([read_end], [], [], 60)
        assert ready, "the writers stopped writing"
        chunk = os.read(read_end, 1 << 16)
        if not chunk:
            break
        received += chunk
    os.close(read_end)
    assert all(w.wait(timeout=60) == 0 for w in writers)
    records = [json.loads(line) for line in received.splitlines()]
    assert len(records) == 800
    assert {r["hookInstance"][0] for r in records} == set("abcd")
