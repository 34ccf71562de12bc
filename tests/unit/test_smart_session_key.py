"""The SMART session key: made once, whole, and shared by every process that starts at the same moment."""

from __future__ import annotations

import multiprocessing
import stat

from cryptography.fernet import Fernet

from app.smart.sessions import KEY_FILE, load_or_create_key


def _seal(directory, start, queue) -> None:
    start.wait(timeout=30)
    queue.put(load_or_create_key(directory).encrypt(b"launch state"))


def test_processes_starting_together_share_one_whole_key(tmp_path):
    for trial in range(20):
        directory = tmp_path / f"keys-{trial}"
        context = multiprocessing.get_context("fork")
        queue, start = context.Queue(), context.Barrier(8)
        processes = [context.Process(target=_seal, args=(directory, start, queue)) for _ in range(8)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=30)
        assert [process.exitcode for process in processes] == [0] * 8  # none read a half-written key
        key = Fernet((directory / KEY_FILE).read_bytes())
        sealed = [queue.get(timeout=5) for _ in processes]
        assert {key.decrypt(token) for token in sealed} == {b"launch state"}  # all used the key on disk
        assert sorted(p.name for p in directory.iterdir()) == [KEY_FILE]  # no temporary files left behind


def test_the_key_is_readable_by_the_service_alone(tmp_path):
    load_or_create_key(tmp_path / "keys")
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "keys" / KEY_FILE).stat().st_mode) == 0o600


def test_an_existing_key_is_kept(tmp_path):
    first = load_or_create_key(tmp_path)
    assert load_or_create_key(tmp_path).decrypt(first.encrypt(b"x")) == b"x"
