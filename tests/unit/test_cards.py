"""Cards and their serialiser: R-2 (no empty members), R-8, R-16..R-24, and Markdown escaping (R-19), also of
record text in a line or a table cell (``app.cds.inputs.inline_markdown``)."""

from __future__ import annotations

import html
import re
import uuid

import pytest
from markdown_it import MarkdownIt

from app.cds.cards import Action, Card, Coding, Link, Source, Suggestion, cards_response, escape_markdown
from app.cds.inputs import inline_markdown, markdown_table

SOURCE = Source(label="Clinical AI gateway")


def card(**members) -> Card:
    return Card(**{"summary": "Consider a statin", "indicator": "info", "source": SOURCE, **members})


def is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except (ValueError, TypeError, AttributeError):
        return False


# --- empty members are left out (R-2) ---------------------------------------------------------------------------


def test_minimal_card_has_only_its_required_members_and_uuid():
    assert set(card().to_json()) == {"summary", "indicator", "source", "uuid"}


def test_none_and_empty_string_card_members_are_left_out():
    body = card(detail="", selectionBehavior=None).to_json()
    assert "detail" not in body
    assert "selectionBehavior" not in body


def test_empty_lists_on_a_card_are_left_out():
    body = card(suggestions=[], overrideReasons=[], links=[]).to_json()
    assert not {"suggestions", "overrideReasons", "links"} & set(body)


def test_empty_members_of_a_source_are_left_out():
    assert Source(label="Gateway", url="", icon=None, topic=None).to_json() == {"label": "Gateway"}


def test_empty_members_of_a_coding_are_left_out():
    assert Coding(system="http://snomed.info/sct", code="1", display="").to_json() == {
        "system": "http://snomed.info/sct",
        "code": "1",
    }


def test_empty_members_of_a_suggestion_are_left_out():
    body = Suggestion(label="Order it", actions=[], isRecommended=None).to_json()
    assert set(body) == {"label", "uuid"}


def test_empty_members_of_an_action_are_left_out():
    assert Action(type="delete", description="Remove", resource={}, resourceId="").to_json() == {
        "type": "delete",
        "description": "Remove",
    }


def test_empty_members_of_a_link_are_left_out():
    assert Link(label="Guideline", url="https://example.org/g", appContext=None, autolaunchable=None).to_json() == {
        "label": "Guideline",
        "url": "https://example.org/g",
        "type": "absolute",
    }


def test_empty_members_are_left_out_at_every_nesting_level_of_a_card():
    c = card(
        source=Source(label="Gateway", url="", topic=Coding(system="http://example.org/topics", code="t", display="")),
        suggestions=[
            Suggestion(
                label="Order it",
                actions=[Action(type="create", description="Order a statin", resource=None, resourceId="")],
            )
        ],
        selectionBehavior="any",
        links=[Link(label="Guideline", url="https://example.org/g", appContext=None)],
    )

    body = c.to_json()

    assert body["source"] == {"label": "Gateway", "topic": {"system": "http://example.org/topics", "code": "t"}}
    assert body["suggestions"][0]["actions"] == [{"type": "create", "description": "Order a statin"}]
    assert body["links"] == [{"label": "Guideline", "url": "https://example.org/g", "type": "absolute"}]


def test_false_and_zero_are_not_mistaken_for_empty():
    body = Suggestion(label="Not this one", isRecommended=False).to_json()
    assert body["isRecommended"] is False
    assert Link(label="L", url="https://example.org", autolaunchable=False).to_json()["autolaunchable"] is False


def test_empty_members_inside_an_action_resource_are_left_out():
    resource = {
        "resourceType": "MedicationRequest",
        "status": "draft",
        "note": None,
        "dosageInstruction": [],
        "meta": {},
        "subject": {"reference": "Patient/1", "display": ""},
    }

    body = Action(type="create", description="Order", resource=resource).to_json()

    assert body["resource"] == {
        "resourceType": "MedicationRequest",
        "status": "draft",
        "subject": {"reference": "Patient/1"},
    }


# --- response body (R-8, R-25) ------------------------------------------------------------------------------------


def test_response_without_cards_keeps_an_empty_cards_array():
    assert cards_response([]) == {"cards": []}


def test_response_without_system_actions_leaves_them_out():
    body = cards_response([card()], system_actions=[])
    assert set(body) == {"cards"}
    assert body["cards"][0]["summary"] == "Consider a statin"


def test_response_with_system_actions_serialises_them():
    body = cards_response([], [Action(type="update", description="Flag", resource={"resourceType": "Flag"})])
    assert body == {
        "cards": [],
        "systemActions": [{"type": "update", "description": "Flag", "resource": {"resourceType": "Flag"}}],
    }


# --- uuids (R-20) -------------------------------------------------------------------------------------------------


def test_every_card_and_suggestion_has_a_uuid():
    body = card(suggestions=[Suggestion(label="A"), Suggestion(label="B")], selectionBehavior="any").to_json()

    assert is_uuid(body["uuid"])
    assert all(is_uuid(s["uuid"]) for s in body["suggestions"])


def test_card_and_suggestion_uuids_are_all_distinct():
    cards = [
        card(suggestions=[Suggestion(label="A"), Suggestion(label="B")], selectionBehavior="any") for _ in range(3)
    ]

    body = cards_response(cards)

    ids = [c["uuid"] for c in body["cards"]] + [s["uuid"] for c in body["cards"] for s in c["suggestions"]]
    assert len(ids) == 9
    assert len(set(ids)) == 9


def test_uuid_is_stable_across_serialisations_of_one_card():
    c = card()
    assert c.to_json()["uuid"] == c.to_json()["uuid"] == c.uuid


# --- card rules (R-16, R-17, R-21, R-23, R-24) --------------------------------------------------------------------


def test_summary_of_139_characters_is_accepted():
    assert len(card(summary="x" * 139).to_json()["summary"]) == 139


@pytest.mark.parametrize("length", [140, 141, 500])
def test_summary_of_140_characters_or_more_is_rejected(length):
    with pytest.raises(ValueError, match="140"):
        card(summary="x" * length)


def test_empty_summary_is_rejected():
    # summary is required; an empty one would be dropped by the serialiser, leaving an invalid card.
    with pytest.raises(ValueError):
        card(summary="")


def test_indicator_outside_info_warning_critical_is_rejected():
    with pytest.raises(ValueError):
        card(indicator="danger")


def test_suggestions_without_selection_behavior_are_rejected():
    with pytest.raises(ValueError, match="selectionBehavior"):
        card(suggestions=[Suggestion(label="Order it")])


def test_two_recommended_suggestions_with_at_most_one_are_rejected():
    with pytest.raises(ValueError, match="at most one"):
        card(
            suggestions=[Suggestion(label="A", isRecommended=True), Suggestion(label="B", isRecommended=True)],
            selectionBehavior="at-most-one",
        )


def test_one_recommended_suggestion_with_at_most_one_is_accepted():
    body = card(
        suggestions=[Suggestion(label="A", isRecommended=True), Suggestion(label="B", isRecommended=False)],
        selectionBehavior="at-most-one",
    ).to_json()
    assert body["selectionBehavior"] == "at-most-one"
    assert [s.get("isRecommended") for s in body["suggestions"]] == [True, False]


def test_two_recommended_suggestions_with_any_are_accepted():
    body = card(
        suggestions=[Suggestion(label="A", isRecommended=True), Suggestion(label="B", isRecommended=True)],
        selectionBehavior="any",
    ).to_json()
    assert len(body["suggestions"]) == 2


def test_override_reason_without_display_is_rejected():
    with pytest.raises(ValueError):
        card(overrideReasons=[Coding(system="http://example.org/override", code="not-relevant")])


def test_override_reasons_with_display_are_serialised():
    reason = Coding(system="http://example.org/override", code="not-relevant", display="Not relevant")
    assert card(overrideReasons=[reason]).to_json()["overrideReasons"] == [
        {"system": "http://example.org/override", "code": "not-relevant", "display": "Not relevant"}
    ]


def test_app_context_on_an_absolute_link_is_rejected():
    with pytest.raises(ValueError, match="appContext"):
        card(links=[Link(label="App", url="https://app.example.org/launch", type="absolute", appContext="{}")])


def test_app_context_on_a_smart_link_is_kept():
    link = Link(label="App", url="https://app.example.org/launch", type="smart", appContext='{"x": 1}')
    assert card(links=[link]).to_json()["links"] == [
        {"label": "App", "url": "https://app.example.org/launch", "type": "smart", "appContext": '{"x": 1}'}
    ]


# --- Markdown from a record or a model (R-19) --------------------------------------------------------------------


def test_escape_markdown_neutralises_a_script_tag():
    escaped = escape_markdown("<script>alert(1)</script>")
    assert "<" not in escaped
    assert ">" not in escaped
    assert escaped.startswith("&lt;script&gt;")


def test_escape_markdown_neutralises_raw_html_attributes():
    escaped = escape_markdown('<img src=x onerror="alert(1)">')
    assert "<img" not in escaped


def test_escape_markdown_neutralises_a_javascript_link():
    assert escape_markdown("[link](javascript:alert(1))") == r"\[link\]\(javascript:alert\(1\)\)"


def test_escape_markdown_neutralises_an_image():
    assert escape_markdown("![img](https://evil.example/x.png)") == r"\!\[img\]\(https://evil.example/x.png\)"


def test_escape_markdown_neutralises_an_autolink():
    assert "<" not in escape_markdown("<javascript:alert(1)>")


def test_escape_markdown_neutralises_backticks():
    assert escape_markdown("`code` and ```fence```") == r"\`code\` and \`\`\`fence\`\`\`"


def test_escape_markdown_escapes_ampersands_so_entities_cannot_become_tags():
    assert escape_markdown("&lt;script&gt;") == "&amp;lt;script&amp;gt;"


def test_escape_markdown_escapes_backslashes_so_escapes_cannot_be_undone():
    assert escape_markdown("\\[x](y)") == r"\\\[x\]\(y\)"


def test_escape_markdown_leaves_ordinary_text_alone():
    assert escape_markdown("LDL 4.2 mmol/L, above target: consider a statin.") == (
        "LDL 4.2 mmol/L, above target: consider a statin."
    )


def test_escape_markdown_accepts_non_strings():
    assert escape_markdown(42) == "42"


# --- record text inside a line or a table cell, with as few escapes as safety allows (R-19) ----------------------

MARKDOWN = MarkdownIt("commonmark").enable("table")


@pytest.mark.parametrize(
    "hostile",
    [
        "<script>alert(1)</script>",
        '<img src=x onerror="alert(1)">',
        "[link](javascript:alert(1))",
        "![img](https://evil.example/x.png)",
        "[ref][x] and [x]: https://evil.example",
        "<https://evil.example>",
        "*strong* _em_ `code` ~~gone~~",
        "a | b",
        "&lt;script&gt;",
    ],
)
def test_inline_markdown_renders_record_text_as_text_only(hostile):
    rendered = MARKDOWN.render("| Input | Value |\n| --- | --- |\n| x | " + inline_markdown(hostile) + " |")
    cells = re.findall(r"<td>(.*?)</td>", rendered)
    assert len(cells) == 2 and cells[0] == "x"  # one row of two cells: a "|" could not add a cell
    assert not re.search(r"<(?!/?(table|thead|tbody|tr|th|td)>)", rendered)  # no tag but the table's own
    assert html.unescape(cells[1]) == hostile  # shown as the record wrote it


@pytest.mark.parametrize(
    "ordinary",
    [
        "Hydrochlorothiazide 25 MG (thiazide diuretic)",
        "24 HR metoprolol succinate 100 MG [Toprol]",
        "Diabetes mellitus type 2 (disorder)",
        "total cholesterol #2, 5.5 mmol/L + HDL",
    ],
)
def test_inline_markdown_leaves_what_renders_as_written_unescaped(ordinary):
    assert inline_markdown(ordinary) == ordinary
    assert MARKDOWN.renderInline(ordinary) == html.escape(ordinary, quote=False)


@pytest.mark.parametrize(
    ("start", "escaped"), [("# heading", r"\# heading"), ("- item", r"\- item"), ("1. one", r"1\. one")]
)
def test_inline_markdown_keeps_a_line_from_becoming_a_heading_or_a_list(start, escaped):
    assert inline_markdown(start) == escaped
    assert MARKDOWN.render(f"- {escaped}").count("<li>") == 1 and "<h1>" not in MARKDOWN.render(escaped)


def test_markdown_table_escapes_every_cell_and_keeps_empty_ones():
    lines = markdown_table(("Input", "Value", "Date"), [("HDL", "50 mg/dL", ""), ("Note", "a | b\nc", "")])
    assert lines == [
        "| Input | Value | Date |",
        "| --- | --- | --- |",
        "| HDL | 50 mg/dL |  |",
        r"| Note | a \| b c |  |",
    ]
    assert MARKDOWN.render("\n".join(lines)).count("<td>") == 6
