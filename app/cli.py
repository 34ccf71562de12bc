"""The ``gateway`` command: every ``flask --app app X`` command as ``gateway X``, from any directory, plus ``serve``.

It is Flask's own command group with our application factory, so the commands are the ones the areas register
(``db``, ``jobs``, ``keys``, ``models``, ``dev``...). A bad setting is one line naming the variable and exit
status 2, never a traceback: operators read it in a container's log, scripts read the status.
"""

from __future__ import annotations

import os
import sys

import click
import sqlalchemy as sa
from flask import Flask
from flask.cli import FlaskGroup, routes_command, shell_command

from app import create_app
from app.config import ConfigError, load_config
from app.up import up_command

CONFIG_ERROR_STATUS = 2


def _create_app() -> Flask:
    try:
        return create_app()
    except ConfigError as exc:
        click.echo(f"gateway: not starting: {exc}", err=True)  # as gunicorn's start says it (app/gunicorn_conf.py)
        sys.exit(CONFIG_ERROR_STATUS)


@click.command(
    "serve",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("gunicorn_args", nargs=-1, type=click.UNPROCESSED)
def serve_command(gunicorn_args: tuple[str, ...]) -> None:
    """Serve the CDS Hooks API with gunicorn and the project's settings (app/gunicorn_conf.py); extra arguments
    go to gunicorn (``gateway serve --certfile C --keyfile K``)."""
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:app.gunicorn_conf", *gunicorn_args, "app:create_app()"]
    os.execv(sys.executable, argv)  # noqa: S606 - gunicorn becomes this process, so a supervisor's signals reach it


def main(argv: list[str] | None = None) -> None:
    cli = FlaskGroup(
        name="gateway",
        help="The clinical AI gateway's commands (the same as `flask --app app ...`).",
        create_app=_create_app,
        add_default_commands=False,
        add_version_option=False,
        load_dotenv=False,
        set_debug_flag=False,
    )
    # Settings come from the environment alone, and the application is always ours: no --app, --env-file, --debug.
    cli.params = [param for param in cli.params if param.name not in ("app", "env_file", "debug")]
    for command in (serve_command, up_command, routes_command, shell_command):
        cli.add_command(command)
    try:
        cli.main(args=argv, prog_name="gateway")
    except sa.exc.DBAPIError as exc:  # unreachable, refused, not migrated: say which database and what it said
        reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
        click.echo(f"gateway: database {_database_named()}: {reason}", err=True)
        if "no such table" in reason or "does not exist" in reason:
            click.echo("gateway: is it migrated? `gateway db upgrade`", err=True)
        sys.exit(1)


def _database_named() -> str:
    """DATABASE_URL as this command saw it, password hidden: an operator must see which database was read."""
    return sa.make_url(load_config()["DATABASE_URL"]).render_as_string(hide_password=True)


if __name__ == "__main__":
    main()
