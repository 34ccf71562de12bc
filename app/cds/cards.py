"""CDS Hooks 2.0 response types: cards, suggestions, actions, links; one serialiser drops empty members (R-2)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

Indicator = Literal["info", "warning", "critical"]
SUMMARY_LIMIT = 140  # characters; a card's summary must be shorter


def new_uuid() -> str:
    """A fresh card or suggestion uuid; feedback is impossible without them (R-20)."""
    return str(uuid.uuid4())


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _compact(value: Any) -> Any:
    """Serialise dataclasses and dicts recursively, leaving out None and empty strings, lists and dicts (R-2)."""
    if hasattr(value, "__dataclass_fields__"):
        items = ((f.name, _compact(getattr(value, f.name))) for f in fields(value))
        return {k: v for k, v in items if not _is_empty(v)}
    if isinstance(value, dict):
        items = ((k, _compact(v)) for k, v in value.items())
        return {k: v for k, v in items if not _is_empty(v)}
    if isinstance(value, (list, tuple)):
        return [_compact(v) for v in value]
    return value


class _Serialisable:
    def to_json(self) -> dict[str, Any]:
        """This object as CDS Hooks JSON, without empty optional members."""
        return _compact(self)


@dataclass
class Coding(_Serialisable):
    system: str
    code: str
    display: str | None = None


@dataclass
class Source(_Serialisable):
    label: str
    url: str | None = None
    icon: str | None = None
    topic: Coding | None = None


@dataclass
class Action(_Serialisable):
    type: Literal["create", "update", "delete"]
    description: str
    resource: dict[str, Any] | None = None
    resourceId: str | None = None  # noqa: N815 - spelled as the spec spells it


@dataclass
class Suggestion(_Serialisable):
    label: str
    actions: list[Action] = field(default_factory=list)
    isRecommended: bool | None = None  # noqa: N815
    uuid: str = field(default_factory=new_uuid)


@dataclass
class Link(_Serialisable):
    label: str
    url: str
    type: Literal["absolute", "smart"] = "absolute"
    appContext: str | None = None  # noqa: N815
    autolaunchable: bool | None = None


@dataclass
class Card(_Serialisable):
    summary: str
    indicator: Indicator
    source: Source
    detail: str | None = None
    suggestions: list[Suggestion] = field(default_factory=list)
    selectionBehavior: Literal["at-most-one", "any"] | None = None  # noqa: N815
    overrideReasons: list[Coding] = field(default_factory=list)  # noqa: N815
    links: list[Link] = field(default_factory=list)
    uuid: str = field(default_factory=new_uuid)

    def __post_init__(self) -> None:
        if not self.summary.strip():
            raise ValueError("card summary is required (R-16)")
        if len(self.summary) >= SUMMARY_LIMIT:
            raise ValueError("card summary must be shorter than 140 characters (R-16)")
        if self.suggestions and self.selectionBehavior is None:
            raise ValueError("selectionBehavior is required when a card has suggestions (R-21)")
        if self.selectionBehavior == "at-most-one" and sum(bool(s.isRecommended) for s in self.suggestions) > 1:
            raise ValueError("at most one suggestion may be recommended with at-most-one (R-21)")
        if self.indicator not in get_args(Indicator):
            raise ValueError(f"card indicator must be one of {get_args(Indicator)} (R-17)")
        if any(not reason.display for reason in self.overrideReasons):
            raise ValueError("override reasons need a display (R-23)")
        for link in self.links:
            if link.appContext is not None and link.type != "smart":
                raise ValueError("appContext is allowed only on smart links (R-24)")


def fit_summary(prefix: str, text: str, suffix: str = "") -> str:
    """``prefix + text + suffix`` as a card summary: ``text`` is cut, with an ellipsis, so the whole fits (R-16)."""
    room = SUMMARY_LIMIT - 1 - len(prefix) - len(suffix)
    return prefix + (text if len(text) <= room else text[: room - 1] + "…") + suffix


def with_link(cards: list[Card], link: Link | None) -> list[Card]:
    """``cards``, each with ``link`` added (such as the explanation page's, which may be None: then unchanged)."""
    if link is not None:
        for card in cards:
            card.links.append(link)
    return cards


def cards_response(cards: list[Card], system_actions: list[Action] | None = None) -> dict[str, Any]:
    """The body of a service response: ``{"cards": [...]}`` always present, systemActions only when any."""
    body: dict[str, Any] = {"cards": [card.to_json() for card in cards]}
    if system_actions:
        body["systemActions"] = [action.to_json() for action in system_actions]
    return body


def escape_markdown(text: str) -> str:
    """Neutralise raw HTML and Markdown control characters in text from a record or a model (R-19)."""
    out = []
    for ch in str(text):
        if ch in "<>&":
            out.append({"<": "&lt;", ">": "&gt;", "&": "&amp;"}[ch])
        elif ch in "\\`*_{}[]()#+!|~":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)
