"""Card helpers shared by services (app.cds.cards): a summary that fits, and a link added to every card."""

import pytest

from app.cds.cards import SUMMARY_LIMIT, Card, Link, Source, fit_summary, with_link


def _card(summary: str = "s") -> Card:
    return Card(summary=summary, indicator="info", source=Source(label="test"))


def test_a_short_summary_is_kept_whole():
    assert fit_summary("Risk not calculated: ", "no HDL", " (+1 more)") == "Risk not calculated: no HDL (+1 more)"


def test_a_long_text_is_cut_with_an_ellipsis_so_the_summary_is_valid():
    summary = fit_summary("Risk not calculated: ", "x" * 300, " (+2 more)")
    assert len(summary) == SUMMARY_LIMIT - 1
    assert summary.startswith("Risk not calculated: xxx") and summary.endswith("x… (+2 more)")
    _card(summary)  # accepted
    with pytest.raises(ValueError):
        _card(summary + "y")


def test_a_text_that_exactly_fits_is_not_cut():
    text = "y" * (SUMMARY_LIMIT - 1 - len("p: "))
    assert fit_summary("p: ", text) == "p: " + text


def test_with_link_adds_the_link_to_every_card_and_nothing_when_there_is_none():
    cards = [_card(), _card()]
    link = Link(label="Explain", url="https://example.org/launch", type="smart", appContext="abc")
    assert with_link(cards, None) is cards and all(card.links == [] for card in cards)
    assert with_link(cards, link) is cards
    assert [card.links for card in cards] == [[link], [link]]
