"""Secrets as files (NAME_FILE), as container orchestrators mount them: the first line is the value."""

from __future__ import annotations

import pytest

from app.config import ConfigError, load_config


def environ(tmp_path, **extra) -> dict[str, str]:
    return {"INSTANCE_PATH": str(tmp_path / "instance"), **extra}


def test_a_secret_is_read_from_its_file(tmp_path):
    (tmp_path / "metrics-token").write_text("s3cret\n")
    (tmp_path / "db-url").write_text("postgresql+psycopg://gateway:pw@db/gateway\nignored second line\n")
    files = {"METRICS_TOKEN_FILE": str(tmp_path / "metrics-token"), "DATABASE_URL_FILE": str(tmp_path / "db-url")}
    settings = load_config(environ(tmp_path, **files))
    assert settings["METRICS_TOKEN"] == "s3cret"
    assert settings["DATABASE_URL"] == "postgresql+psycopg://gateway:pw@db/gateway"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"ADMIN_TOKEN": "a", "ADMIN_TOKEN_FILE": "{tmp}/token"}, "set ADMIN_TOKEN or ADMIN_TOKEN_FILE, not both"),
        ({"ADMIN_TOKEN_FILE": "{tmp}/absent"}, "ADMIN_TOKEN_FILE '{tmp}/absent' cannot be read: No such file"),
        ({"ADMIN_TOKEN_FILE": "{tmp}/empty"}, "ADMIN_TOKEN_FILE '{tmp}/empty' is empty"),
        ({"REDIS_URL_FILE": "{tmp}/token"}, "REDIS_URL must be"),  # the value is validated like any other
        ({"METRICS_TOKEN": ""}, "METRICS_TOKEN is set but empty"),  # not a quiet "open"
        ({"METRICS_TOKEN": "  "}, "METRICS_TOKEN is set but empty"),
    ],
)
def test_a_bad_secret_file_names_the_variable(tmp_path, extra, message):
    (tmp_path / "token").write_text("value\n")
    (tmp_path / "empty").write_text("\n")
    extra = {name: value.format(tmp=tmp_path) for name, value in extra.items()}
    with pytest.raises(ConfigError) as raised:
        load_config(environ(tmp_path, **extra))
    assert message.format(tmp=tmp_path) in str(raised.value)
