"""Test-time behaviour over injected engines (DESIGN section 9): N rounds of prompted refinement
for a Stage I model, and autonomous thinking for a Stage II model.

Refinement runs a shard of prompts together: every round is ONE critique call for all prompts,
ONE refine call for all their critiques and, with a reward model, ONE reward call. Round k
critiques answer k with the judge request and refines it with the refine request, restarting
from [prompt, answer k] (never the whole history), so round k sees what round 1 saw. Every
round's answer is kept: one record is the whole 0..N curve. With `keep_best` a refinement that
does not score higher than the best answer so far leaves that answer in place (recorded).

Thinking is one call per prompt with the prompt turns only; a response whose final answer does
not parse after the trajectory marker is re-sampled (one call per retry round over every unparsed
prompt) up to `max_format_retries` times; a prompt still unparsed is kept, marked as a format
failure, with its last response.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from avr_core.engines.base import Generator, RewardModel
from avr_core.schemas import (
    AnswerRound,
    Conversation,
    Lineage,
    Message,
    PromptRecord,
    RefinedAnswers,
    Sampling,
    ThoughtAnswer,
)
from avr_core.synthesis import (
    SynthesisStats,
    chat_checked,
    copy_totals,
    level_sampling,
    score_checked,
    token_counts,
)
from avr_core.templates import (
    Templates,
    build_critique_messages,
    build_refine_messages,
    extract_final_answer,
)

__all__ = [
    "RefineStats",
    "ThinkStats",
    "own_starting_answers",
    "refine_answers",
    "think",
]


class RefineStats(BaseModel):
    prompts: int = 0
    rounds: int = 0
    engine_calls: int = 0
    reward_calls: int = 0
    kept_previous: int = Field(0, description="keep_best rounds whose refinement did not win")
    generated_chars: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generated_texts: int = 0


class ThinkStats(BaseModel):
    prompts: int = 0
    format_retries: int = 0
    format_failures: int = Field(0, description="prompts whose response never parsed")
    engine_calls: int = 0
    generated_chars: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generated_texts: int = 0


def _assistant(text: str) -> Message:
    return Message(role="assistant", content=text)


def _usable(score: float | None) -> bool:
    return score is not None and not math.isnan(score)


def own_starting_answers(
    generator: Generator, prompts: list[PromptRecord], sampling: Sampling, lineage: Lineage
) -> tuple[list[RefinedAnswers], SynthesisStats]:
    """Round 0 written by the refining model itself: one answer per prompt, in one call."""
    stats = SynthesisStats()
    outputs = chat_checked(
        generator,
        [p.messages for p in prompts],
        level_sampling(sampling, "refine-answer", 1),
        stats,
        "answer",
    )
    records = [
        RefinedAnswers(
            prompt_id=p.prompt_id,
            prompt=p.messages,
            generator=generator.model_id,
            rounds=[AnswerRound(answer=samples[0])],
            constraints=p.constraints,
            lineage=lineage,
            token_counts=token_counts([("rounds[0].answer", samples[0])]),
        )
        for p, samples in zip(prompts, outputs, strict=True)
    ]
    return records, stats


def _score(
    reward: RewardModel, records: list[RefinedAnswers], answers: list[str], stats: RefineStats
) -> list[float | None]:
    """One reward call: each answer in its prompt's context (NaN counts as no score)."""
    conversations: list[Conversation] = [
        [*r.prompt, _assistant(a)] for r, a in zip(records, answers, strict=True)
    ]
    scores = score_checked(reward, conversations, [list(r.constraints) for r in records])
    stats.reward_calls += 1
    return [s if _usable(s) else None for s in scores]


def refine_answers(
    generator: Generator,
    starts: list[RefinedAnswers],
    templates: Templates,
    rounds: int,
    sampling: Sampling,
    reward: RewardModel | None = None,
    keep_best: bool = False,
) -> tuple[list[RefinedAnswers], RefineStats]:
    """Refine every record's last answer `rounds` times; returns records with rounds 0..N.

    `starts` hold round 0 (the model's own answer, or another model's). With a reward model,
    every round's answer is scored; `keep_best` (which needs one) keeps the best answer so far
    when a refinement scores no higher (an unscored refinement never wins).
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if keep_best and reward is None:
        raise ValueError("keep_best needs a reward model to tell which answer is better")
    stats = RefineStats(prompts=len(starts), rounds=rounds)
    synthesis = SynthesisStats()
    for i, record in enumerate(starts):
        if not record.rounds:
            raise ValueError(f"record {i} ({record.prompt_id}): no starting answer (round 0)")
    history = [list(r.rounds) for r in starts]
    counted = [list(r.token_counts) for r in starts]
    if reward is not None and starts:
        unscored = [i for i, h in enumerate(history) if h[0].score is None]
        if unscored:
            start_scores = _score(
                reward,
                [starts[i] for i in unscored],
                [history[i][0].answer for i in unscored],
                stats,
            )
            for i, score in zip(unscored, start_scores, strict=True):
                history[i][0] = history[i][0].model_copy(update={"score": score})

    for k in range(1, rounds + 1):
        if not starts:
            break
        answered = [
            [*r.prompt, _assistant(h[-1].answer)] for r, h in zip(starts, history, strict=True)
        ]
        critiques = chat_checked(
            generator,
            [build_critique_messages(messages, templates) for messages in answered],
            level_sampling(sampling, f"refine-round-{k}-critique", 1),
            synthesis,
            f"round {k} critique",
        )
        refinements = chat_checked(
            generator,
            [
                build_refine_messages(messages, samples[0], templates)
                for messages, samples in zip(answered, critiques, strict=True)
            ],
            level_sampling(sampling, f"refine-round-{k}-refine", 1),
            synthesis,
            f"round {k} refine",
        )
        texts = [samples[0] for samples in refinements]
        scores: list[float | None] = (
            _score(reward, starts, texts, stats) if reward is not None else [None] * len(texts)
        )
        for h, c, critique, text, score in zip(
            history, counted, critiques, texts, scores, strict=True
        ):
            c.extend(
                token_counts(
                    [(f"rounds[{k}].critique", critique[0]), (f"rounds[{k}].refinement", text)]
                )
            )
            previous = h[-1]
            keep = (
                keep_best
                and previous.score is not None
                and not (score is not None and score > previous.score)
            )
            stats.kept_previous += keep
            h.append(
                AnswerRound(
                    answer=previous.answer if keep else text,
                    critique=critique[0],
                    refinement=text,
                    score=previous.score if keep else score,
                    kept_previous=keep,
                )
            )
    copy_totals(synthesis, stats)
    records = [
        r.model_copy(update={"rounds": h, "token_counts": c})
        for r, h, c in zip(starts, history, counted, strict=True)
    ]
    return records, stats


def think(
    generator: Generator,
    prompts: list[PromptRecord],
    sampling: Sampling,
    max_format_retries: int,
    lineage: Lineage,
) -> tuple[list[ThoughtAnswer], ThinkStats]:
    """One long response per prompt (prompt turns only) and its final answer; unparsed responses
    re-sampled up to `max_format_retries` times, then kept as format failures."""
    if max_format_retries < 0:
        raise ValueError(f"max_format_retries must be >= 0, got {max_format_retries}")
    stats = ThinkStats(prompts=len(prompts))
    synthesis = SynthesisStats()
    outputs = chat_checked(
        generator,
        [p.messages for p in prompts],
        level_sampling(sampling, "think", 1),
        synthesis,
        "think",
    )
    responses = [samples[0] for samples in outputs]
    finals = [extract_final_answer(text) for text in responses]
    retries = [0] * len(prompts)
    for retry_round in range(1, max_format_retries + 1):
        missing = [i for i, final in enumerate(finals) if final is None]
        if not missing:
            break
        again = chat_checked(
            generator,
            [prompts[i].messages for i in missing],
            level_sampling(sampling, f"think-retry-{retry_round}", 1),
            synthesis,
            f"think retry {retry_round}",
        )
        for i, samples in zip(missing, again, strict=True):
            responses[i] = samples[0]
            finals[i] = extract_final_answer(samples[0])
            retries[i] += 1
            stats.format_retries += 1
    stats.format_failures = sum(final is None for final in finals)
    copy_totals(synthesis, stats)
    record_lineage = lineage.model_copy(
        update={"generator": lineage.generator or generator.model_id, "sampling": sampling}
    )
    records = [
        ThoughtAnswer(
            prompt_id=p.prompt_id,
            prompt=p.messages,
            response=response,
            final_answer=final,
            format_retries=retry,
            format_failure=final is None,
            constraints=p.constraints,
            lineage=record_lineage,
            token_counts=token_counts([("response", response)]),
        )
        for p, response, final, retry in zip(prompts, responses, finals, retries, strict=True)
    ]
    return records, stats
