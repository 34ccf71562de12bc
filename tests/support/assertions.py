"""Assertions several test layers share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def assert_no_empty_members(value: Any, path: str = "$") -> None:
    """No null, "", [] or {} anywhere in ``value`` (CDS Hooks R-2); the failure names the member's path."""
    if isinstance(value, dict):
        items = [(f"{path}.{k}", v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    else:
        return
    for where, item in items:
        assert item not in (None, "", [], {}), f"empty member at {where}"
        assert_no_empty_members(item, where)


def wait_for(condition: Callable[[], bool], message: str = "condition not met", timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail with ``message`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.01)
