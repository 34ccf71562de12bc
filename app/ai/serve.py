"""The embedded models over the KServe Open Inference Protocol v2 (REST), so the network path runs locally.

``flask --app app models serve --port N`` runs it on werkzeug's threaded server, for development and tests;
production runs it under gunicorn: ``gunicorn 'app.ai.serve:create_model_server()'``.
"""

from __future__ import annotations

import logging
from typing import Any

import click
import orjson
from flask import Flask, Response, request
from flask.cli import AppGroup
from werkzeug.exceptions import HTTPException

from app import limits
from app.ai.kserve import decode_tensors, encode_tensors
from app.ai.models import embedded_models
from app.ai.types import InvalidModelInput, Model
from app.logs import describe

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20
DEFAULT_PORT = 8081


class ProtocolError(Exception):
    """A request the server answers with a v2 error body ``{"error": ...}`` and ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


def _parse_infer_request(raw: bytes) -> tuple[str | None, dict[str, Any], list[str] | None]:
    """The request's id, its decoded inputs, and the output names it asks for (None: all)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProtocolError(400, "malformed request: the body is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise ProtocolError(400, "malformed request: the body must be an object with an inputs list")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(400, "malformed request: id must be a string")
    try:
        inputs = decode_tensors(body["inputs"])
    except ValueError as exc:
        raise ProtocolError(400, f"invalid input: {exc}") from None
    wanted = body.get("outputs")
    if wanted is None:
        return request_id, inputs, None
    if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in wanted):
        raise ProtocolError(400, "malformed request: outputs must be a list of objects with a name")
    return request_id, inputs, [o["name"] for o in wanted]


def create_model_server(models: list[Model] | None = None) -> Flask:
    """A v2 server (health, model metadata and readiness, inference) for ``models``, default the embedded ones."""
    if models is None:
        models = embedded_models()
    registry = {m.name: m for m in models}
    server = Flask(__name__)
    server.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    limits.init_app(server)  # the limit holds for chunked bodies too

    def lookup(name: str, version: str | None) -> Model:
        model = registry.get(name)
        if model is None:
            raise ProtocolError(404, f"unknown model {name!r}")
        if version is not None and version != model.version:
            raise ProtocolError(404, f"model {name!r} has no version {version!r}")
        return model

    @server.errorhandler(ProtocolError)
    def protocol_error(exc: ProtocolError) -> Response:
        return _json({"error": str(exc)}, exc.status)

    @server.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return _json({"error": exc.name.lower()}, exc.code or 500)

    @server.get("/v2/health/live")
    @server.get("/v2/health/ready")
    def health() -> Response:
        return Response(status=200)

    @server.get("/v2/models/<name>", defaults={"version": None})
    @server.get("/v2/models/<name>/versions/<version>")
    def metadata(name: str, version: str | None) -> Response:
        model = lookup(name, version)
        # The Model protocol does not declare tensors yet, so inputs and outputs are listed empty.
        return _json(
            {"name": model.name, "versions": [model.version], "platform": "python", "inputs": [], "outputs": []}
        )

    @server.get("/v2/models/<name>/ready", defaults={"version": None})
    @server.get("/v2/models/<name>/versions/<version>/ready")
    def model_ready(name: str, version: str | None) -> Response:
        lookup(name, version)
        return Response(status=200)

    @server.post("/v2/models/<name>/infer", defaults={"version": None})
    @server.post("/v2/models/<name>/versions/<version>/infer")
    def infer(name: str, version: str | None) -> Response:
        model = lookup(name, version)
        request_id, inputs, wanted = _parse_infer_request(request.get_data(cache=False))
        try:
            outputs = model.predict(inputs)
        except InvalidModelInput as exc:
            raise ProtocolError(400, f"invalid input: {exc}") from None
        except Exception as exc:
            log.error("model %s failed: %s", model.name, describe(exc))
            raise ProtocolError(500, "the model failed") from None
        if wanted is not None:
            unknown = [o for o in wanted if o not in outputs]
            if unknown:
                raise ProtocolError(400, f"malformed request: unknown output {unknown[0]!r}")
            outputs = {o: outputs[o] for o in wanted}
        try:
            tensors = encode_tensors(outputs)
        except ValueError as exc:
            log.error("model %s answered outputs that cannot be encoded: %s", model.name, exc)
            raise ProtocolError(500, "the model's outputs cannot be encoded") from None
        body = {"model_name": model.name, "model_version": model.version, "outputs": tensors}
        if request_id is not None:
            body["id"] = request_id
        return _json(body)

    return server


models_cli = AppGroup("models", help="The embedded models.")


@models_cli.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True)
def serve_command(host: str, port: int) -> None:
    """Serve the embedded models over KServe v2 (werkzeug, threaded; production: gunicorn, see app.ai.serve)."""
    from werkzeug.serving import run_simple

    from app.development import is_loopback

    if not is_loopback(host):  # werkzeug's server is for development: it is not hardened for other hosts
        raise click.BadParameter(
            f"{host} is not this host alone; to serve other hosts run "
            "gunicorn 'app.ai.serve:create_model_server()' instead",
            param_hint="--host",
        )

    run_simple(host, port, create_model_server(), threaded=True)


def init_cli(app: Flask) -> None:
    """Register ``flask models serve``."""
    app.cli.add_command(models_cli)
