"""A run's files hold PHI: under any umask every directory the batch creates is 0700 and every file 0600, and a
BATCH_DIR that others may write in is made private when ours and refused when not."""

from __future__ import annotations

import os

import pytest
import requests
from werkzeug import Response

from app.batch import parts
from app.batch.export import BulkDataClient
from app.private_files import private_folders
from tests.support.files import mode

PATIENT = b'{"resourceType":"Patient","id":"a"}\n'


@pytest.fixture
def permissive_umask():
    old = os.umask(0)
    yield
    os.umask(old)


def test_every_directory_level_created_is_private(tmp_path, permissive_umask):
    batch_dir = tmp_path / "batchout" / "nested" / "batch"
    assert private_folders(batch_dir / "run-1") == batch_dir / "run-1"
    for level in (tmp_path / "batchout", tmp_path / "batchout" / "nested", batch_dir, batch_dir / "run-1"):
        assert mode(level) == 0o700, level


def test_an_existing_parent_keeps_its_mode(tmp_path, permissive_umask):
    tmp_path.chmod(0o755)
    private_folders(tmp_path / "batch")
    assert mode(tmp_path) == 0o755 and mode(tmp_path / "batch") == 0o700


def test_a_batch_dir_others_may_write_in_is_made_private_when_ours(tmp_path):
    batch_dir = tmp_path / "batch"
    batch_dir.mkdir()
    batch_dir.chmod(0o777)
    parts.private_root(batch_dir)
    assert mode(batch_dir) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_batch_dir_others_may_write_in_is_refused_when_not_ours(tmp_path):
    batch_dir = tmp_path / "batch"
    batch_dir.mkdir()
    os.chown(batch_dir, 65534, 65534)
    batch_dir.chmod(0o775)
    with pytest.raises(parts.UnsafeDirectory, match="BATCH_DIR .* writable by group or others"):
        parts.private_root(batch_dir)
    assert mode(batch_dir) == 0o775  # not ours to change


def test_files_are_private_whatever_the_umask_or_an_older_file(tmp_path, permissive_umask):
    with parts.open_private(tmp_path / "new.ndjson") as handle:
        handle.write(PATIENT)
    old = tmp_path / "left-by-an-old-attempt.ndjson"
    old.write_bytes(b"")
    old.chmod(0o666)
    with parts.open_private(old) as handle:
        handle.write(PATIENT)
    assert mode(tmp_path / "new.ndjson") == 0o600 and mode(old) == 0o600


def test_a_downloaded_export_file_and_its_part_are_private(httpserver, tmp_path, permissive_umask):
    seen: list[int] = []

    def respond(request):
        seen.extend(mode(p) for p in tmp_path.rglob("*.part"))  # the .part while it is being written
        return Response(PATIENT, content_type="application/fhir+ndjson")

    httpserver.expect_request("/fhir/files/1.ndjson").respond_with_handler(respond)
    dest = tmp_path / "batch" / "run-1" / "export" / "000-Patient.ndjson"
    session = requests.Session()
    with BulkDataClient(httpserver.url_for("/fhir"), session.request, timeout=5.0) as client:
        client.download(httpserver.url_for("/fhir/files/1.ndjson"), dest, requires_access_token=False)
    session.close()
    assert seen == [0o600]
    assert mode(dest) == 0o600
    assert [mode(level) for level in (dest.parent, dest.parents[1], dest.parents[2])] == [0o700] * 3


def test_a_shared_batch_dir_with_the_sticky_bit_is_refused(tmp_path):
    batch_dir = tmp_path / "batch"
    batch_dir.mkdir()
    batch_dir.chmod(0o1777)
    with pytest.raises(parts.UnsafeDirectory, match="sticky bit"):
        parts.private_root(batch_dir)
