"""Systems read from stored records and judged against a baseline (scripted engines)."""

from __future__ import annotations

import json

import pytest

from avr_core.comparison import judge_prompts, system_answers
from avr_core.judges import load_judge_template
from avr_core.schemas import (
    AnswerRound,
    Constraint,
    Message,
    PromptRecord,
    RefinedAnswers,
    Sampling,
    ThoughtAnswer,
)
from tests.fakes import LengthReward
from tests.test_judges import PositionalJudge

PROMPT = [Message(role="user", content="question 0")]


def _refined(pid: str, answers: list[str]) -> RefinedAnswers:
    return RefinedAnswers(
        prompt_id=pid,
        prompt=PROMPT,
        rounds=[AnswerRound(answer=a) for a in answers],
        constraints=[Constraint(type="word_count", args={"max": 50})],
    )


def test_refined_records_become_one_system_per_round():
    records = [_refined("p", ["a", "ab", "abc"]), _refined("q", ["x", "xy", "xyz"])]
    systems = system_answers("refined", records)
    assert [s.name for s in systems] == ["refined@round0", "refined@round1", "refined@round2"]
    assert systems[2].answers["q"].answer == "xyz" and systems[2].answers["q"].rounds == 2
    (only,) = system_answers("start", records, round_=0)
    assert only.name == "start" and only.answers["p"].answer == "a"
    with pytest.raises(ValueError, match="round 5 not in 0..2"):
        system_answers("x", records, round_=5)


def test_a_thinking_format_failure_answers_with_nothing_but_keeps_its_length():
    records = [
        ThoughtAnswer(prompt_id="p", prompt=PROMPT, response="long thought", final_answer="ok"),
        ThoughtAnswer(prompt_id="q", prompt=PROMPT, response="never ends", format_failure=True),
    ]
    (system,) = system_answers("thinker", records)
    assert system.answers["p"].answer == "ok" and system.answers["q"].answer == ""
    assert system.answers["q"].response_chars == len("never ends")


def test_records_without_answers_are_refused_by_name():
    prompt = PromptRecord(prompt_id="p", messages=PROMPT)
    with pytest.raises(ValueError, match="system 'x': records of type PromptRecord"):
        system_answers("x", [prompt])


def test_every_candidate_is_judged_by_every_judge_against_the_baseline():
    records = [_refined("p", ["a", "abcd"]), _refined("q", ["xyz", "x"])]
    candidates = system_answers("refined", records)
    (baseline,) = system_answers("start", records, round_=0)
    reward, judge = LengthReward(), PositionalJudge()
    rows = judge_prompts(
        ["p", "q"], candidates, baseline, reward, judge, load_judge_template(), Sampling()
    )
    assert len(rows) == 2 * 2 * 2  # prompts x systems x judges
    by_key = {(r.system, r.judge, r.prompt_id): r for r in rows}
    reward_row = by_key[("refined@round1", "reward:fake:length", "p")]
    assert (reward_row.preference, reward_row.candidate_score, reward_row.baseline_score) == (
        1.0,
        4.0,
        1.0,
    )
    assert by_key[("refined@round1", "reward:fake:length", "q")].preference == 0.0
    assert by_key[("refined@round0", "reward:fake:length", "p")].preference == 0.5
    pairwise = by_key[("refined@round1", "pairwise:fake:judge", "p")]
    assert pairwise.preference == 1.0 and pairwise.consistent is True
    assert json.loads(pairwise.detail)["verdicts"] == ["A", "B"]
    assert pairwise.candidate_chars == 4 and pairwise.baseline_chars == 1 and pairwise.rounds == 1
    # constraints reach the reward model with each answer
    _, constraints = reward.calls[0]
    assert constraints[0][0].type == "word_count"
