"""Assertions several test layers share."""

from __future__ import annotations

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
