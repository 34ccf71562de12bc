"""Small real HTTP servers for end-to-end tests: a webhook receiver that records what it gets, and a
forwarding proxy in front of the FHIR server that can fail or act (e.g. kill a worker) at chosen requests."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class _Server:
    def __init__(self, handler_class: type[BaseHTTPRequestHandler]):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class WebhookReceiver(_Server):
    """Records every POST; ``respond(received) -> status`` decides the answer (200 by default)."""

    def __init__(self, respond: Callable[[Received], int] | None = None):
        super().__init__(_ReceiverHandler)
        self.received: list[Received] = []
        self.respond = respond or (lambda _: 200)
        self.lock = threading.Lock()


class _ReceiverHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        owner: WebhookReceiver = self.server.owner  # type: ignore[attr-defined]
        item = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        with owner.lock:
            owner.received.append(item)
        status = owner.respond(item)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


class FhirProxy(_Server):
    """Forwards every request to ``target``. ``before(method, path)`` may return a status to answer instead
    (the FHIR server "down"); ``after(method, path, status)`` runs once the upstream has answered."""

    def __init__(self, target: str):
        super().__init__(_ProxyHandler)
        self.target = target.rstrip("/")
        self.before: Callable[[str, str], int | None] = lambda method, path: None
        self.after: Callable[[str, str, int], None] = lambda method, path, status: None
        self.session = requests.Session()


class _ProxyHandler(BaseHTTPRequestHandler):
    def _forward(self) -> None:
        proxy: FhirProxy = self.server.owner  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        refused = proxy.before(self.command, self.path)
        if refused is not None:
            self.send_response(refused)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        # The proxy listens at /fhir/R4 like the upstream, so the path is forwarded as it came.
        upstream = proxy.session.request(
            self.command,
            proxy.target.split("/fhir/R4")[0] + self.path,
            data=body,
            headers={k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")},
            timeout=10,
        )
        proxy.after(self.command, self.path, upstream.status_code)
        self.send_response(upstream.status_code)
        for name in ("Content-Type", "Location", "ETag"):
            if name in upstream.headers:
                self.send_header(name, upstream.headers[name])
        self.send_header("Content-Length", str(len(upstream.content)))
        self.end_headers()
        self.wfile.write(upstream.content)

    do_GET = do_POST = do_PUT = _forward  # noqa: N815

    def log_message(self, *args) -> None:
        pass


def post_raw(base: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """POST ``body`` as the chunked framing itself, then close our side; the status, headers and body answered."""
    host, port = base.removeprefix("http://").split(":")
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    header_block, _, content = rest.partition(b"\r\n\r\n")
    fields = dict(line.split(": ", 1) for line in header_block.decode().split("\r\n"))
    return int(status_line.split()[1]), {k.lower(): v for k, v in fields.items()}, content
