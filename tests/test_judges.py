"""Evaluation judges on scripted engines: reward-model preferences and the swapped pairwise judge."""

from __future__ import annotations

import math

import pytest

from avr_core.judges import (
    load_judge_template,
    pairwise_preferences,
    parse_verdict,
    reward_preferences,
)
from avr_core.schemas import Conversation, Message, Sampling
from tests.fakes import LengthReward

TEMPLATE = load_judge_template()
PROMPTS = [[Message(role="user", content=f"question {i}")] for i in range(4)]


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("A is clearer. [[A]]", "A"),
        ("[[A]] at first, but on reflection [[B]]", "B"),
        ("equally good [[C]]", "tie"),
        ("[[ B ]]", "B"),
        ("I prefer A.", None),
        ("[[D]]", None),
    ],
)
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_reward_preferences_are_win_tie_loss_and_unscored_gives_none():
    class NaNOnEmpty(LengthReward):
        def score(self, conversations, constraints=None):
            scores = super().score(conversations, constraints)
            return [math.nan if s == 0 else s for s in scores]

    reward = NaNOnEmpty()
    preferences, ours, theirs = reward_preferences(
        reward, PROMPTS, ["long answer", "same", "s", ""], ["short", "same", "longer", "x"]
    )
    assert preferences == [1.0, 0.5, 0.0, None]
    assert ours[3] is None and theirs[0] == 5.0
    assert len(reward.calls) == 1  # both sides of every prompt in one call


class PositionalJudge:
    """Prefers the longer answer; when `biased`, always says A. `unparsed` prompts get no verdict."""

    model_id = "fake:judge"

    def __init__(self, biased: bool = False, unparsed: frozenset[str] = frozenset()) -> None:
        self.biased = biased
        self.unparsed = unparsed
        self.calls: list[int] = []

    def chat(self, conversations: list[Conversation], sampling: Sampling) -> list[list[str]]:
        self.calls.append(len(conversations))
        replies = []
        for conversation in conversations:
            text = conversation[0].content
            a = text.split("[Answer A]\n", 1)[1].split("\n\n[Answer B]", 1)[0]
            b = text.split("[Answer B]\n", 1)[1].split("\n\nFirst explain", 1)[0]
            if any(q in text for q in self.unparsed):
                replies.append(["they are both fine"])
            elif self.biased:
                replies.append(["[[A]]"])
            else:
                replies.append(
                    ["[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]"]
                )
        return replies

    def close(self) -> None:
        pass


def test_pairwise_judge_plays_both_orders_in_one_call():
    judge = PositionalJudge()
    results = pairwise_preferences(
        judge,
        PROMPTS,
        ["a long answer", "same", "s", "tie!"],
        ["short", "same", "longer", "tie?"],
        TEMPLATE,
        Sampling(temperature=0.0),
    )
    assert judge.calls == [8]
    assert [r.preference for r in results] == [1.0, 0.5, 0.0, 0.5]
    assert [r.verdicts for r in results][0] == ("A", "B")
    assert all(r.consistent for r in results)


def test_a_position_biased_judge_is_inconsistent_and_averages_to_a_tie():
    results = pairwise_preferences(
        PositionalJudge(biased=True), PROMPTS[:2], ["x", "y"], ["yy", "x"], TEMPLATE, Sampling()
    )
    assert [r.preference for r in results] == [0.5, 0.5]
    assert [r.consistent for r in results] == [False, False]


def test_unparsed_games_are_counted_not_dropped():
    judge = PositionalJudge(unparsed=frozenset({"question 1"}))
    results = pairwise_preferences(
        judge, PROMPTS[:2], ["long one", "long one"], ["s", "s"], TEMPLATE, Sampling()
    )
    assert results[0].preference == 1.0
    assert results[1].preference is None and results[1].verdicts == (None, None)
    assert results[1].consistent is None and results[1].replies[0] == "they are both fine"


def test_judge_template_is_outside_the_synthesis_templates_version():
    from avr_core.templates import load_templates

    assert "pairwise" not in load_templates().sources  # finished data keeps its fingerprints
    assert "[[C]]" in TEMPLATE.render("q", "a", "b")
