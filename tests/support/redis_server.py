"""A redis-server of a test's own on a spare port, which the test may kill, pause and start again."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple


def redis_is_up(port: int = 6379) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def redis_server_missing() -> str | None:
    return None if shutil.which("redis-server") else "redis-server is not installed"


class RedisServer(NamedTuple):
    port: int
    start: Callable[[], None]
    stop: Callable[[], None]
    pause: Callable[[bool], None]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@contextlib.contextmanager
def own_redis_server(directory: Path) -> Iterator[RedisServer]:
    """Without persistence, as on this machine; a snapshot written with SAVE into ``directory`` is loaded again
    at the next start, as a Redis with RDB persistence does."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    command += ["--dir", str(directory)]
    servers: list[subprocess.Popen] = []

    def start() -> None:
        servers.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while not redis_is_up(port):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def stop() -> None:
        servers[-1].kill()
        servers[-1].wait(10)

    def pause(paused: bool) -> None:
        servers[-1].send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    start()
    try:
        yield RedisServer(port, start, stop, pause)
    finally:
        for server in servers:
            if server.poll() is None:
                os.kill(server.pid, signal.SIGCONT)
                server.kill()
                server.wait(10)
