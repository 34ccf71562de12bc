"""Settings from the environment, validated once at start; errors name the variable."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from app.cds.service import Setting, declared_settings
from app.development import DEV_CLIENTS_FILE, off_host_refusal

PROJECT_ROOT = Path(__file__).resolve().parent.parent
INSTANCE_DIR = PROJECT_ROOT / "instance"


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


# Settings that are secrets may come from a file instead (NAME_FILE=/run/secrets/name), as container secrets are
# mounted; the file's first line is the value.
SECRET_SETTINGS = ("DATABASE_URL", "REDIS_URL", "ADMIN_TOKEN", "METRICS_TOKEN", "SMART_CLIENT_SECRET")


def _metrics_token(raw: str | None) -> str | None:
    """The bearer token /metrics asks for; None (open) only when unset: a blank one is a mistake, not a choice."""
    if raw is not None and not raw.strip():
        raise ConfigError("METRICS_TOKEN is set but empty: unset it for an open /metrics, or give the token")
    return raw.strip() if raw else None


def _secrets_from_files(source: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        path = source.get(f"{name}_FILE")
        if not path:
            continue
        if source.get(name):
            raise ConfigError(f"set {name} or {name}_FILE, not both")
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{name}_FILE {path!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
        if not lines or not lines[0].strip():
            raise ConfigError(f"{name}_FILE {path!r} is empty")
        source[name] = lines[0].strip()


def _flag(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    value = str(raw).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be one of 1/0, true/false, on/off (got {raw!r})")


def _int(name: str, raw: Any, low: int, high: int) -> int:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a whole number (got {raw!r})") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high} (got {value})")
    return value


def _float(name: str, raw: Any, low: float, high: float) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number (got {raw!r})") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high} (got {value})")
    return value


def _schedule(name: str, raw: Any) -> tuple[float, ...]:
    """Comma-separated delays in seconds, e.g. a retry schedule."""
    parts = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
    try:
        delays = tuple(float(part) for part in parts if str(part).strip())
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated seconds (got {raw!r})") from None
    if not delays or any(d < 0 for d in delays):
        raise ConfigError(f"{name} must list at least one delay, none negative (got {raw!r})")
    return delays


def _is_local_http(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "http" and parts.hostname in ("localhost", "127.0.0.1", "::1")


def _url(name: str, raw: str, schemes: tuple[str, ...]) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in schemes or not parts.netloc:
        raise ConfigError(f"{name} must be an absolute {'/'.join(schemes)} URL (got {raw!r})")
    return raw.rstrip("/")


def _origins(raw: Any) -> list[str] | None:
    """CORS_ALLOWED_ORIGINS as a list; None when unset, which app/cds/responses.py reads as every origin, or the
    development origins alone while development settings are on."""
    return None if raw is None else [o.strip() for o in str(raw).split(",") if o.strip()]


def _public_base_url(raw: str) -> str:
    """PUBLIC_BASE_URL: an http(s) origin and path only, since callers sign it as their audience and the
    development rule reads its host; user info, a query, a fragment, whitespace or a bad port is a mistake."""
    url = _url("PUBLIC_BASE_URL", raw, ("http", "https"))
    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if (
        not port_ok
        or "@" in parts.netloc
        or parts.query
        or parts.fragment
        or "#" in url
        or any(c.isspace() for c in url)
    ):
        raise ConfigError(f"PUBLIC_BASE_URL must be http(s)://host[:port][/path], nothing else (got {raw!r})")
    return url


def _declared(name: str, setting: Setting, raw: Any) -> Any:
    """A setting a service declares (app.cds.service.Setting), validated like the others; unset is its default."""
    if raw is None or (isinstance(raw, str) and not raw.strip() and setting.type is not bool):
        return setting.default
    if setting.type is bool:
        return _flag(name, raw)
    if setting.type is int:
        low = int(setting.low) if setting.low is not None else -(2**63)
        return _int(name, raw, low, int(setting.high) if setting.high is not None else 2**63)
    if setting.type is float:
        low = setting.low if setting.low is not None else float("-inf")
        return _float(name, raw, low, setting.high if setting.high is not None else float("inf"))
    if setting.type == "url":
        return _url(name, str(raw).strip(), ("http", "https"))
    return str(raw)


def load_config(environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> dict:
    """Read every setting from ``environ`` (default: the process environment) and ``overrides``; validate."""
    source: dict[str, Any] = dict(os.environ if environ is None else environ)
    source.update(overrides or {})
    declared = declared_settings()
    _secrets_from_files(source, SECRET_SETTINGS + tuple(name for name, s in declared.items() if s.secret))
    get = source.get

    port = _int("PORT", get("PORT", 8080), 1, 65535)
    instance = Path(get("INSTANCE_PATH") or INSTANCE_DIR)
    settings: dict[str, Any] = {
        "PORT": port,
        "HOST": str(get("HOST") or "127.0.0.1").strip(),
        "INSTANCE_PATH": str(instance),
        "KEYS_DIR": str(get("KEYS_DIR") or instance / "keys"),
        "PUBLIC_BASE_URL": _public_base_url(get("PUBLIC_BASE_URL") or f"http://localhost:{port}"),
        "PUBLIC_BASE_URL_SET": bool(get("PUBLIC_BASE_URL")),  # named, not defaulted (a worker's check needs it)
        "DATABASE_URL": get("DATABASE_URL") or f"sqlite:///{instance / 'gateway.db'}",
        "REDIS_URL": get("REDIS_URL") or None,
        "CDS_CLIENTS_FILE": str(get("CDS_CLIENTS_FILE") or DEV_CLIENTS_FILE),
        "CDS_AUTH": _flag("CDS_AUTH", get("CDS_AUTH") or "on"),  # blank is the default, as for every setting
        "FHIR_ALLOW_ANONYMOUS": _flag("FHIR_ALLOW_ANONYMOUS", get("FHIR_ALLOW_ANONYMOUS", "0")),
        "CORS_ALLOWED_ORIGINS": _origins(get("CORS_ALLOWED_ORIGINS")),
        "HOOK_BUDGET_MS": _int("HOOK_BUDGET_MS", get("HOOK_BUDGET_MS", 500), 50, 60_000),
        "FHIR_TIMEOUT_S": _int("FHIR_TIMEOUT_S", get("FHIR_TIMEOUT_S", 5), 1, 120),
        "AUDIT_LOG": str(get("AUDIT_LOG") or instance / "audit.jsonl"),
        "LOG_LEVEL": str(get("LOG_LEVEL", "INFO")).upper(),
        "WEB_CONCURRENCY": _int("WEB_CONCURRENCY", get("WEB_CONCURRENCY", 2), 1, 256),
        "GUNICORN_THREADS": _int("GUNICORN_THREADS", get("GUNICORN_THREADS", 16), 1, 1024),
        "ACCESS_LOG": get("ACCESS_LOG") or None,
        "MAX_CONTENT_LENGTH": _int("MAX_REQUEST_BYTES", get("MAX_REQUEST_BYTES", 10 * 1024 * 1024), 1024, 1 << 30),
        "TESTING": _flag("TESTING", get("TESTING", False)),
        "AI_BACKEND": str(get("AI_BACKEND", "local")).strip().lower(),
        "AI_URL": get("AI_URL") or None,
        "AI_MAX_IN_FLIGHT": _int("AI_MAX_IN_FLIGHT", get("AI_MAX_IN_FLIGHT", 16), 1, 1024),
        "AI_RESERVE_MS": _int("AI_RESERVE_MS", get("AI_RESERVE_MS", 20), 0, 1000),
        "AI_CALL_TIMEOUT_MS": _int("AI_CALL_TIMEOUT_MS", get("AI_CALL_TIMEOUT_MS", 2000), 10, 600_000),
        "LATE_RESULT_TTL_S": _int("LATE_RESULT_TTL_S", get("LATE_RESULT_TTL_S", 300), 0, 86400),
        "BREAKER_FAILURE_RATE": _float("BREAKER_FAILURE_RATE", get("BREAKER_FAILURE_RATE", 0.5), 0.01, 1.0),
        "BREAKER_SLOW_CALL_RATE": _float("BREAKER_SLOW_CALL_RATE", get("BREAKER_SLOW_CALL_RATE", 0.8), 0.01, 1.0),
        "BREAKER_SLOW_CALL_MS": _int("BREAKER_SLOW_CALL_MS", get("BREAKER_SLOW_CALL_MS", 400), 1, 60_000),
        "BREAKER_WINDOW": _int("BREAKER_WINDOW", get("BREAKER_WINDOW", 20), 1, 10_000),
        "BREAKER_MIN_CALLS": _int("BREAKER_MIN_CALLS", get("BREAKER_MIN_CALLS", 10), 1, 10_000),
        "BREAKER_OPEN_SECONDS": _float("BREAKER_OPEN_SECONDS", get("BREAKER_OPEN_SECONDS", 30), 0.01, 3600),
        "BREAKER_HALF_OPEN_CALLS": _int("BREAKER_HALF_OPEN_CALLS", get("BREAKER_HALF_OPEN_CALLS", 3), 1, 1000),
        "ADMIN_TOKEN": get("ADMIN_TOKEN") or None,
        "METRICS_TOKEN": _metrics_token(get("METRICS_TOKEN")),
        "SMART_CLIENT_ID": str(get("SMART_CLIENT_ID") or "clinical-ai-gateway"),
        "SMART_CLIENT_SECRET": get("SMART_CLIENT_SECRET") or None,
        "SMART_SESSION_TTL_S": _int("SMART_SESSION_TTL_S", get("SMART_SESSION_TTL_S", 3600), 60, 86400),
        "RESULT_TTL_S": _int("RESULT_TTL_S", get("RESULT_TTL_S", 86400), 60, 2_592_000),
        "JOB_LEASE_S": _float("JOB_LEASE_S", get("JOB_LEASE_S", 30), 0.5, 3600),
        "JOB_POLL_S": _float("JOB_POLL_S", get("JOB_POLL_S", 0.5), 0.01, 60),
        # Unset: each job kind's own RetryPolicy decides (app/jobs/retry.py); set: overrides the discharge summary's.
        "JOB_MAX_ATTEMPTS": (
            _int("JOB_MAX_ATTEMPTS", get("JOB_MAX_ATTEMPTS"), 1, 100) if get("JOB_MAX_ATTEMPTS") else None
        ),
        "DLQ_ALERT_THRESHOLD": _int("DLQ_ALERT_THRESHOLD", get("DLQ_ALERT_THRESHOLD", 10), 1, 1_000_000),
        "JOB_RETENTION_S": _int("JOB_RETENTION_S", get("JOB_RETENTION_S", 7 * 86400), 60, 366 * 86400),
        "DEAD_JOB_RETENTION_S": _int("DEAD_JOB_RETENTION_S", get("DEAD_JOB_RETENTION_S", 30 * 86400), 60, 366 * 86400),
        "BATCH_DIR": str(get("BATCH_DIR") or instance / "batch"),
        "BATCH_AI_MAX_IN_FLIGHT": _int("BATCH_AI_MAX_IN_FLIGHT", get("BATCH_AI_MAX_IN_FLIGHT", 4), 1, 1024),
        "BATCH_PART_BYTES": _int("BATCH_PART_BYTES", get("BATCH_PART_BYTES", 8 * 1024 * 1024), 4096, 1 << 30),
        "BATCH_RETENTION_S": _int("BATCH_RETENTION_S", get("BATCH_RETENTION_S", 30 * 86400), 60, 3660 * 86400),
        "BATCH_EXPORT_TIMEOUT_S": _int(
            "BATCH_EXPORT_TIMEOUT_S", get("BATCH_EXPORT_TIMEOUT_S", 24 * 3600), 10, 30 * 86400
        ),
        "WEBHOOKS_ALLOW_PRIVATE": _flag("WEBHOOKS_ALLOW_PRIVATE", get("WEBHOOKS_ALLOW_PRIVATE", "0")),
        "WEBHOOK_TIMEOUT_S": _float("WEBHOOK_TIMEOUT_S", get("WEBHOOK_TIMEOUT_S", 10), 0.1, 120),
        "WEBHOOK_RETRY_SCHEDULE": _schedule(
            "WEBHOOK_RETRY_SCHEDULE", get("WEBHOOK_RETRY_SCHEDULE", "5,300,1800,7200,18000,36000,36000")
        ),
    }
    # Session cookies are Secure everywhere but plain-http development on this machine.
    settings["SESSION_COOKIE_SECURE"] = _flag(
        "SESSION_COOKIE_SECURE",
        get("SESSION_COOKIE_SECURE", "0" if _is_local_http(settings["PUBLIC_BASE_URL"]) else "1"),
    )
    settings.update({name: _declared(name, setting, get(name)) for name, setting in declared.items()})
    if settings["AI_BACKEND"] not in ("local", "kserve"):
        raise ConfigError(f"AI_BACKEND must be local or kserve (got {settings['AI_BACKEND']!r})")
    if settings["AI_BACKEND"] == "kserve":
        if not settings["AI_URL"]:
            raise ConfigError("AI_URL is required when AI_BACKEND=kserve")
        settings["AI_URL"] = _url("AI_URL", settings["AI_URL"], ("http", "https"))
    if settings["BREAKER_MIN_CALLS"] > settings["BREAKER_WINDOW"]:
        raise ConfigError("BREAKER_MIN_CALLS must not exceed BREAKER_WINDOW")
    if settings["REDIS_URL"]:
        _url("REDIS_URL", settings["REDIS_URL"], ("redis", "rediss", "unix"))
    if settings["LOG_LEVEL"] not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR (got {settings['LOG_LEVEL']!r})")
    if not settings["DATABASE_URL"].startswith(("sqlite", "postgresql")):
        raise ConfigError("DATABASE_URL must be a sqlite:/// or postgresql:// SQLAlchemy URL")
    if not Path(settings["CDS_CLIENTS_FILE"]).is_file():
        raise ConfigError(f"CDS_CLIENTS_FILE {settings['CDS_CLIENTS_FILE']!r} does not exist")
    refusal = off_host_refusal(settings)
    if refusal:
        raise ConfigError(refusal)
    return settings
