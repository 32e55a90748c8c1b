"""What an evaluation compares: every system's answer per prompt, joined on prompt ids, judged
against a baseline in batches (DESIGN section 9).

A system is any stored step that holds answers, read into `Answer`s by record type:
- `RefinedAnswers` (refine): each round k is its own system `name@round{k}` (the test-time
  scaling curve), or only `round` when one is chosen;
- `ThoughtAnswer` (think): the parsed final answer; a format failure answers with nothing (it
  loses to any real answer under a fair judge) and its whole response still counts in lengths;
- `RefinedAnswers` imported from another system's file: its round 0.
`judge_prompts` compares every candidate system with the baseline on a chunk of prompts, one
engine call per judge for the whole chunk.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from avr_core.engines.base import Generator, RewardModel
from avr_core.judges import JudgeTemplate, pairwise_preferences, reward_preferences
from avr_core.schemas import (
    ArrowRecord,
    Constraint,
    Conversation,
    Judgement,
    RefinedAnswers,
    Sampling,
    ThoughtAnswer,
)

__all__ = ["Answer", "SystemAnswers", "judge_prompts", "system_answers"]


@dataclass(frozen=True)
class Answer:
    """One system's answer to one prompt."""

    prompt: Conversation
    answer: str
    response_chars: int
    rounds: int
    constraints: tuple[Constraint, ...] = ()


@dataclass(frozen=True)
class SystemAnswers:
    """A named system's answers by prompt id."""

    name: str
    answers: dict[str, Answer]


def system_answers(
    name: str, records: Sequence[ArrowRecord], round_: int | None = None
) -> list[SystemAnswers]:
    """The systems a step's records hold (several for refinement rounds, see the module doc)."""
    if not records:
        raise ValueError(f"system {name!r}: the step holds no records")
    if all(isinstance(r, ThoughtAnswer) for r in records):
        thoughts = [r for r in records if isinstance(r, ThoughtAnswer)]
        return [
            SystemAnswers(
                name,
                {
                    t.prompt_id: Answer(
                        t.prompt, t.final_answer or "", len(t.response), 0, tuple(t.constraints)
                    )
                    for t in thoughts
                },
            )
        ]
    if all(isinstance(r, RefinedAnswers) for r in records):
        refined = [r for r in records if isinstance(r, RefinedAnswers)]
        rounds = min(len(r.rounds) for r in refined)
        if rounds == 0:
            raise ValueError(f"system {name!r}: a record has no answer at all")
        if round_ is not None and not 0 <= round_ < rounds:
            raise ValueError(f"system {name!r}: round {round_} not in 0..{rounds - 1}")
        chosen = [round_] if round_ is not None else list(range(rounds))
        systems = []
        for k in chosen:
            label = name if round_ is not None or rounds == 1 else f"{name}@round{k}"
            answers = {
                r.prompt_id: Answer(
                    r.prompt,
                    r.rounds[k].answer,
                    len(r.rounds[k].answer),
                    k,
                    tuple(r.constraints),
                )
                for r in refined
            }
            systems.append(SystemAnswers(label, answers))
        return systems
    kinds = sorted({type(r).__name__ for r in records})
    raise ValueError(
        f"system {name!r}: records of type {', '.join(kinds)} hold no answers to evaluate "
        "(use a refine or think step, or an imported answers file)"
    )


def _row(
    prompt_id: str,
    names: tuple[str, str],
    answers: tuple[Answer, Answer],
    judge: str,
    **fields: object,
) -> Judgement:
    """One table row: (candidate, baseline) names and answers, the judge, its figures."""
    candidate, baseline = answers
    return Judgement.model_validate(
        {
            "prompt_id": prompt_id,
            "system": names[0],
            "baseline": names[1],
            "judge": judge,
            "candidate_chars": len(candidate.answer),
            "baseline_chars": len(baseline.answer),
            "candidate_response_chars": candidate.response_chars,
            "rounds": candidate.rounds,
            **fields,
        }
    )


def judge_prompts(
    prompt_ids: Sequence[str],
    candidates: Sequence[SystemAnswers],
    baseline: SystemAnswers,
    reward: RewardModel | None,
    judge: Generator | None,
    template: JudgeTemplate | None,
    sampling: Sampling,
) -> list[Judgement]:
    """Judgements of every candidate against the baseline on `prompt_ids`, by each judge given.

    The prompts must be answered by the baseline and every candidate (the caller joins them).
    """
    rows: list[Judgement] = []
    base = [baseline.answers[p] for p in prompt_ids]
    for system in candidates:
        ours = [system.answers[p] for p in prompt_ids]
        prompts = [a.prompt for a in ours]

        if reward is not None:
            preferences, mine, theirs = reward_preferences(
                reward,
                prompts,
                [a.answer for a in ours],
                [a.answer for a in base],
                [list(a.constraints) for a in ours],
            )
            rows += [
                _row(
                    prompt_ids[i],
                    (system.name, baseline.name),
                    (ours[i], base[i]),
                    f"reward:{reward.model_id}",
                    preference=preferences[i],
                    candidate_score=mine[i],
                    baseline_score=theirs[i],
                )
                for i in range(len(prompt_ids))
            ]
        if judge is not None:
            if template is None:
                raise ValueError("a pairwise judge needs its template")
            judgements = pairwise_preferences(
                judge,
                prompts,
                [a.answer for a in ours],
                [a.answer for a in base],
                template,
                sampling,
            )
            rows += [
                _row(
                    prompt_ids[i],
                    (system.name, baseline.name),
                    (ours[i], base[i]),
                    f"pairwise:{judge.model_id}",
                    preference=j.preference,
                    consistent=j.consistent,
                    detail=json.dumps({"verdicts": j.verdicts, "replies": j.replies}),
                )
                for i, j in enumerate(judgements)
            ]
    return rows
