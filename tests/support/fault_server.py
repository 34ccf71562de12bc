"""A real HTTP server on 127.0.0.1 that speaks KServe v2 for one model and injects faults on demand::

    with FaultModelServer() as server:
        backend = KServeBackend(server.url)
        server.set_mode("slow", delay_ms=1000)
        ...
        assert server.calls == 3

Modes: ``healthy``; ``slow`` (answers after ``delay_ms``); ``trickle`` (one byte every 100 ms); ``hang`` (reads the
request, never answers); ``stall`` (headers and half the body, then nothing); ``refuse`` (not listening);
``reset`` (headers and half the body, then a TCP reset); ``error500``; ``malformed`` (200, invalid JSON);
``wrong-shape`` (200, a v2 body whose first output's shape does not match its data). ``hang``, ``stall`` and
``trickle`` end when the mode changes or the server stops.

Healthy answers come from ``app.ai.serve.create_model_server`` (the real protocol code; default model: the
Pooled Cohort Equations); every other mode breaks the transport or the body of that answer, for every path.
Each response closes its connection, so every call is a new connection and ``refuse`` takes effect at once.
Stopping never hangs: handler threads are daemons, every wait is bounded, and open connections are shut down.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from http import HTTPStatus
from types import TracebackType

from app.ai.models.pce import PooledCohortEquations
from app.ai.serve import create_model_server

MODES = ("healthy", "slow", "trickle", "hang", "stall", "refuse", "reset", "error500", "malformed", "wrong-shape")
HOST = "127.0.0.1"
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1 << 20
SOCKET_TIMEOUT_S = 5.0
HANG_LIMIT_S = 60.0
POLL_S = 0.05


def _read_request(conn: socket.socket) -> tuple[str, str, bytes] | None:
    """Method, path and body of one HTTP/1.1 request (Content-Length bodies only); None if the peer left."""
    head = b""
    while b"\r\n\r\n" not in head:
        if len(head) > MAX_HEAD_BYTES:
            return None
        chunk = conn.recv(4096)
        if not chunk:
            return None
        head += chunk
    head, _, body = head.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _version = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-length":
            length = min(int(value.strip()), MAX_BODY_BYTES)
    while len(body) < length:
        chunk = conn.recv(min(65536, length - len(body)))
        if not chunk:
            return None
        body += chunk
    return method, path, body


def _response(status: int, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _wrong_shape(body: bytes) -> bytes:
    """The answer with its first output tensor (PCE's ``risk``) claiming one more element than it carries."""
    answer = json.loads(body)
    tensor = answer["outputs"][0]
    tensor["shape"] = [len(tensor["data"]) + 1]
    return json.dumps(answer).encode()


class FaultModelServer:
    """A v2 model server whose behaviour a test switches at run time with ``set_mode``; ``calls`` counts requests."""

    def __init__(self, model=None, trickle_interval_ms: int = 100):
        self._app = create_model_server([model or PooledCohortEquations()])
        self._trickle_interval = trickle_interval_ms / 1000
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopped = threading.Event()
        self._mode, self._delay, self._generation, self._calls = "healthy", 0.0, 0, 0
        self._connections: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        self._acceptor = threading.Thread(target=self._accept_loop, name="fault-server", daemon=True)

    def __enter__(self) -> FaultModelServer:
        self.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    @property
    def calls(self) -> int:
        with self._lock:
            return self._calls

    @property
    def mode(self) -> str:
        with self._lock:
            return self._mode

    def start(self) -> None:
        self._acceptor.start()

    def set_mode(self, mode: str, delay_ms: int | None = None) -> None:
        """Switch behaviour for requests from now on; leaving ``hang`` or ``trickle`` drops those connections."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        with self._changed:
            if mode == "refuse" and self._listener is not None:
                self._close_listener()
            elif mode != "refuse" and self._listener is None and not self._stopped.is_set():
                self._listener = self._listen(self.port)
            self._mode = mode
            self._delay = (delay_ms or 0) / 1000
            self._generation += 1
            self._changed.notify_all()

    def stop(self) -> None:
        """Stop listening and shut every open connection down; returns within about a second."""
        with self._changed:
            self._stopped.set()
            self._close_listener()
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._changed.notify_all()
        if self._acceptor.is_alive():
            self._acceptor.join(timeout=1.0)
        for thread in list(self._threads):
            thread.join(timeout=0.2)

    @staticmethod
    def _listen(port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, port))
        listener.listen(128)
        listener.settimeout(POLL_S)
        return listener

    def _close_listener(self) -> None:
        """Called with the lock held: new connections are refused from now on."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the acceptor on Linux
            listener.close()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            with self._changed:
                listener = self._listener
                if listener is None:
                    self._changed.wait(POLL_S)
                    continue
            try:
                conn, _addr = listener.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(SOCKET_TIMEOUT_S)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._connections.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            request = _read_request(conn)
            if request is None:
                return
            with self._lock:
                self._calls += 1
                mode, delay, generation = self._mode, self._delay, self._generation
            self._answer(conn, request, mode, delay, generation)
        except (OSError, ValueError):
            pass  # the client left, or the server is stopping
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _healthy(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        response = self._app.test_client().open(path, method=method, data=body, content_type="application/json")
        return response.status_code, response.get_data()

    def _still(self, generation: int) -> bool:
        with self._lock:
            return self._still_locked(generation)

    def _still_locked(self, generation: int) -> bool:
        """Whether the server runs and the mode is still the one this request started under (lock held)."""
        return not self._stopped.is_set() and self._generation == generation

    def _answer(self, conn: socket.socket, request: tuple[str, str, bytes], mode: str, delay: float, gen: int) -> None:
        if mode == "refuse":
            return  # accepted just before the listener closed: drop it
        if mode == "hang":
            with self._changed:
                self._changed.wait_for(lambda: not self._still_locked(gen), timeout=HANG_LIMIT_S)
            return
        if mode == "error500":
            conn.sendall(_response(500, b'{"error": "injected fault"}'))
            return
        if mode == "malformed":
            conn.sendall(_response(200, b'{"model_name": "ascvd-pce", "outputs": [{"name": '))
            return
        if mode == "slow" and self._stopped.wait(delay):
            return
        status, body = self._healthy(*request)
        if mode == "wrong-shape" and status == 200:
            body = _wrong_shape(body)
        raw = _response(status, body)
        if mode in ("reset", "stall"):
            conn.sendall(raw[: len(raw) - len(body) // 2])
        if mode == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return  # closing with SO_LINGER 0 sends a TCP reset
        if mode == "stall":
            with self._changed:
                self._changed.wait_for(lambda: not self._still_locked(gen), timeout=HANG_LIMIT_S)
            return
        if mode == "trickle":
            for i in range(len(raw)):
                if not self._still(gen):
                    return
                conn.sendall(raw[i : i + 1])
                self._stopped.wait(self._trickle_interval)
            return
        conn.sendall(raw)
