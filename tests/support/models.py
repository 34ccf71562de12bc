"""A minimal Flask app with only the AI layer, for tests of services and models without HTTP."""

from __future__ import annotations

import functools

import flask

import app.ai
from app.config import load_config


@functools.cache
def model_app() -> flask.Flask:
    """One app per test session: the embedded models behind the guard, default settings."""
    flask_app = flask.Flask(__name__)
    flask_app.config.update(load_config(environ={}))
    app.ai.init_app(flask_app)
    return flask_app
