"""Test-time refinement and thinking on scripted engines: batching, restarts, keep_best, retries."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from avr_core.ingest import BadRowError, read_answers
from avr_core.schemas import (
    AnswerRound,
    Conversation,
    Lineage,
    Message,
    PromptRecord,
    RefinedAnswers,
    Sampling,
)
from avr_core.templates import FINAL_ANSWER_MARKER, load_templates
from avr_core.testtime import own_starting_answers, refine_answers, think
from tests.fakes import LengthReward, conversation_level

TEMPLATES = load_templates()
SAMPLING = Sampling(max_tokens=16, seed=1)


class Appender:
    """Critiques say "add more"; a refinement appends `suffix` to the answer it refines."""

    model_id = "fake:appender"

    def __init__(self, suffix: str = "+") -> None:
        self.suffix = suffix
        self.calls: list[tuple[str, list[Conversation]]] = []

    def chat(self, conversations: list[Conversation], sampling: Sampling) -> list[list[str]]:
        levels = {conversation_level(c, TEMPLATES) for c in conversations}
        assert len(levels) == 1
        level = levels.pop()
        self.calls.append((level, conversations))
        if level == "answer":
            return [["a"] for _ in conversations]
        if level == "critique":
            return [["add more"] for _ in conversations]
        return [[c[-4].content + self.suffix] for c in conversations]

    def close(self) -> None:
        pass


def _start(prompt: str, answer: str, generator: str = "other-model") -> RefinedAnswers:
    return RefinedAnswers(
        prompt_id=prompt,
        prompt=[Message(role="user", content=prompt)],
        generator=generator,
        rounds=[AnswerRound(answer=answer)],
    )


def test_each_round_restarts_from_prompt_and_current_answer_in_one_call_per_level():
    generator = Appender()
    starts = [_start("p", "x"), _start("q", "yy")]
    records, stats = refine_answers(generator, starts, TEMPLATES, 3, SAMPLING)

    assert [[r.answer for r in rec.rounds] for rec in records] == [
        ["x", "x+", "x++", "x+++"],
        ["yy", "yy+", "yy++", "yy+++"],
    ]
    assert [level for level, _ in generator.calls] == ["critique", "refine"] * 3
    # round 3's critique sees only [prompt, answer 2, judge request]: no earlier rounds
    _, third_critiques = generator.calls[4]
    assert [m.content for m in third_critiques[0][:2]] == ["p", "x++"]
    assert len(third_critiques[0]) == 3
    assert stats.engine_calls == 6 and stats.reward_calls == 0
    assert records[0].generator == "other-model"
    assert all(r.critique == "add more" for r in records[0].rounds[1:])


class ShorterIsBetter(LengthReward):
    def score(self, conversations, constraints=None):
        return [-s for s in super().score(conversations, constraints)]


def test_keep_best_keeps_the_previous_answer_when_a_round_does_not_improve():
    records, stats = refine_answers(
        Appender(), [_start("p", "x")], TEMPLATES, 2, SAMPLING, ShorterIsBetter(), keep_best=True
    )
    rounds = records[0].rounds
    assert [r.answer for r in rounds] == ["x", "x", "x"]
    assert [r.refinement for r in rounds] == [None, "x+", "x+"]
    assert [r.kept_previous for r in rounds] == [False, True, True]
    assert [r.score for r in rounds] == [-1.0, -1.0, -1.0]
    assert stats.kept_previous == 2 and stats.reward_calls == 3


def test_scores_every_round_without_keep_best():
    records, _ = refine_answers(
        Appender(), [_start("p", "x")], TEMPLATES, 2, SAMPLING, LengthReward()
    )
    assert [r.score for r in records[0].rounds] == [1.0, 2.0, 3.0]


def test_keep_best_needs_a_reward_model():
    with pytest.raises(ValueError, match="keep_best needs a reward model"):
        refine_answers(Appender(), [_start("p", "x")], TEMPLATES, 1, SAMPLING, keep_best=True)


def test_own_starting_answers_then_zero_rounds_is_the_plain_answer():
    prompts = [PromptRecord(prompt_id="p", messages=[Message(role="user", content="p")])]
    starts, _ = own_starting_answers(Appender(), prompts, SAMPLING, Lineage(run="r"))
    records, stats = refine_answers(Appender(), starts, TEMPLATES, 0, SAMPLING)
    assert [r.answer for r in records[0].rounds] == ["a"]
    assert records[0].generator == "fake:appender" and stats.engine_calls == 0


class Thinker:
    """Responses for prompt p: the first `fails[p]` lack the final-answer marker."""

    model_id = "fake:thinker"

    def __init__(self, fails: dict[str, int]) -> None:
        self.fails = dict(fails)
        self.calls: list[int] = []

    def chat(self, conversations: list[Conversation], sampling: Sampling) -> list[list[str]]:
        self.calls.append(len(conversations))
        out = []
        for c in conversations:
            prompt = c[-1].content
            if self.fails.get(prompt, 0) > 0:
                self.fails[prompt] -= 1
                out.append(["still thinking"])
            else:
                out.append([f"draft, review, revision\n{FINAL_ANSWER_MARKER}\nanswer to {prompt}"])
        return out

    def close(self) -> None:
        pass


def test_think_retries_unparsed_responses_and_records_format_failures():
    prompts = [
        PromptRecord(prompt_id=p, messages=[Message(role="user", content=p)])
        for p in ("ok", "late", "never")
    ]
    thinker = Thinker({"late": 2, "never": 99})
    records, stats = think(thinker, prompts, SAMPLING, 3, Lineage())
    assert thinker.calls == [3, 2, 2, 1]  # one call, then one per retry round over the gaps
    by_id = {r.prompt_id: r for r in records}
    assert by_id["ok"].final_answer == "answer to ok" and by_id["ok"].format_retries == 0
    assert by_id["late"].final_answer == "answer to late" and by_id["late"].format_retries == 2
    never = by_id["never"]
    assert never.final_answer is None and never.format_failure and never.format_retries == 3
    assert never.response == "still thinking"  # kept, not dropped
    assert stats.format_retries == 5 and stats.format_failures == 1
    assert [r.prompt_id for r in records] == ["ok", "late", "never"]


# ---- another system's outputs as starting answers ---------------------------------------------


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


ANSWER_ROWS = [
    {"prompt": "Name a color.", "response": "Blue.", "generator": "gpt-x"},
    {
        "messages": [{"role": "user", "content": "Say hi."}],
        "response": "Hi!",
        "constraints": [{"type": "word_count", "args": {"max": 3}}],
    },
    {"prompt": "Name a color.", "response": "Red.", "generator": "gpt-x"},  # same prompt again
    {"prompt": "No answer here."},
    {"prompt": "Blank answer.", "response": "   "},
]


def test_read_answers_takes_rows_of_another_system_and_names_bad_rows(tmp_path):
    source = _write_jsonl(tmp_path / "other.jsonl", ANSWER_ROWS)
    with pytest.raises(BadRowError, match=r"other.jsonl.*row 3.*response"):
        read_answers(source)

    result = read_answers(source, on_bad_row="skip")
    assert [a.rounds[0].answer for a in result.answers] == ["Blue.", "Hi!"]
    assert [a.generator for a in result.answers] == ["gpt-x", "other.jsonl"]
    assert result.answers[1].constraints[0].type == "word_count"
    assert result.duplicates == 1 and result.rejects == 2
    rejects = [json.loads(line) for line in Path(result.rejects_path).read_text().splitlines()]
    assert [(r["row"], r["field"]) for r in rejects] == [(3, "response"), (4, "response")]


def test_imported_answers_are_refined_across_models(tmp_path):
    table = pa.Table.from_pylist(
        [ANSWER_ROWS[0], {"prompt": "Say hi.", "response": "Hi!", "generator": "other"}]
    )
    pq.write_table(table, tmp_path / "other.parquet")
    answers = read_answers(str(tmp_path / "other.parquet")).answers
    records, _ = refine_answers(Appender(), answers, TEMPLATES, 1, SAMPLING)
    assert [[r.answer for r in rec.rounds] for rec in records] == [
        ["Blue.", "Blue.+"],
        ["Hi!", "Hi!+"],
    ]
    # round 0 stays attributed to the system that wrote it
    assert [rec.generator for rec in records] == ["gpt-x", "other"]
