"""Stage II synthesis over injected engines (DESIGN sections 4-5): greedy recursive search, then
k long "answer, criticise, improve ..., final answer" responses and their scores.

Greedy search runs a whole shard of prompts together: every round is ONE generation call for the
critiques of all still-active prompts (plus one per rating re-sample round), ONE for all their
refinements and ONE reward call, so the engine batches across prompts no matter how many rounds
each takes. A prompt leaves the batch when its round does not beat its current best:
- the round's winner is the first highest-scoring refinement in (critique, refinement) order;
- it replaces the current answer only if it scores strictly higher (a tie stops the search);
- an unscored refinement (no score, or NaN from a failed reward call) is a failed one.

Long responses are sampled with only the prompt turns; one whose final answer does not parse is
re-sampled (again one call per retry round over all unparsed slots) up to `max_format_retries`
times. Every re-sample is counted per response and in the stats; one still unparsed stays in the
record with no final answer and no score, so nothing is dropped silently. Scoring reads only the
final answer, in the prompt's context.

Nothing here touches storage or Prefect; engines are passed in so tests can script them.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TypeGuard

from pydantic import BaseModel, Field

from avr_core.config import LongResponseConfig, SearchConfig, TreeConfig
from avr_core.engines.base import Generator, RewardModel
from avr_core.schemas import (
    Constraint,
    Conversation,
    CoTResponse,
    CoTSample,
    Critique,
    GreedySearch,
    Lineage,
    Message,
    PromptRecord,
    Refinement,
    Round,
    TokenCount,
)
from avr_core.selection import pick_round_winner
from avr_core.synthesis import (
    SynthesisStats,
    chat_checked,
    copy_totals,
    generate_critiques,
    generate_refinements,
    level_sampling,
    score_checked,
    slot_texts,
    token_counts,
)
from avr_core.templates import Templates, extract_final_answer

__all__ = [
    "LongResponseStats",
    "SearchStats",
    "greedy_search",
    "sample_long_responses",
    "score_long_responses",
    "search_gain",
]


class SearchStats(BaseModel):
    """What one `greedy_search` call did (summed over shards by the tasks)."""

    searches: int = Field(0, description="prompts searched (one record each)")
    unscored_starts: int = Field(0, description="starting answers without a score: no rounds")
    improved_searches: int = Field(0, description="searches with at least one improving round")
    improved_rounds: int = Field(0, description="rounds whose winner beat the current answer")
    stopped_no_gain: int = Field(0, description="searches ended by a round that did not improve")
    reached_max_rounds: int = Field(0, description="searches still improving at max_rounds")
    critiques: int = 0
    refinements: int = 0
    format_retries: int = 0
    dropped_critiques: int = 0
    engine_calls: int = Field(0, description="generation calls, starting answers included")
    reward_calls: int = 0
    generated_chars: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generated_texts: int = 0
    rounds: Counter[int] = Field(
        default_factory=Counter, description="rounds run -> how many prompts ran that many"
    )
    active_per_round: list[int] = Field(
        default_factory=list, description="prompts still searching at each round"
    )
    calls_per_round: list[int] = Field(
        default_factory=list, description="generation calls of each round (all prompts together)"
    )
    round_gains: dict[int, list[float]] = Field(
        default_factory=dict,
        description="round -> best refinement score minus the current score, per prompt with a "
        "scored refinement (negative when the round failed)",
    )


@dataclass
class _Searching:
    """One prompt's search state."""

    prompt: PromptRecord
    start: str
    start_score: float | None
    current: str
    current_score: float
    rounds: list[Round] = field(default_factory=list)
    active: bool = True
    token_counts: list[TokenCount] = field(default_factory=list)


def _usable(score: float | None) -> TypeGuard[float]:
    """A score that can be compared: present and not NaN (a failed reward call)."""
    return score is not None and not math.isnan(score)


def _assistant(text: str) -> Message:
    return Message(role="assistant", content=text)


def _score(
    reward_model: RewardModel,
    conversations: list[Conversation],
    constraints: list[list[Constraint]],
    stats: SearchStats | LongResponseStats,
) -> list[float]:
    """One reward call, checked: exactly one float per conversation."""
    if not conversations:
        return []
    stats.reward_calls += 1
    return score_checked(reward_model, conversations, constraints)


def _starting_answers(
    generator: Generator,
    prompts: list[PromptRecord],
    search: SearchConfig,
    stats: SynthesisStats,
) -> list[str]:
    """The answer each search starts from: the policy's own, or the prompt's reference."""
    if search.start == "reference":
        missing = [p.prompt_id for p in prompts if p.reference is None]
        if missing:
            raise ValueError(
                f"search.start is 'reference' but {len(missing)} prompts have no reference "
                f"answer (first: {missing[0]}); add a `reference` column to the prompt set or "
                "use search.start = policy"
            )
        return [p.reference for p in prompts if p.reference is not None]
    outputs = chat_checked(
        generator,
        [p.messages for p in prompts],
        level_sampling(search.sampling, "search-answer", 1),
        stats,
        "search answer",
    )
    return [samples[0] for samples in outputs]


def greedy_search(
    generator: Generator,
    reward_model: RewardModel,
    prompts: list[PromptRecord],
    templates: Templates,
    search: SearchConfig,
    lineage: Lineage,
) -> tuple[list[GreedySearch], SearchStats]:
    """Search every prompt of a shard, batched by round; one GreedySearch per prompt, in order.

    A prompt whose starting answer gets no score has no rounds (it cannot be compared).
    """
    stats = SearchStats(searches=len(prompts))
    if not prompts:
        return [], stats
    for i, prompt in enumerate(prompts):
        if not prompt.messages or prompt.messages[-1].role != "user":
            raise ValueError(f"prompt {i} ({prompt.prompt_id}): messages must end with a user turn")
    synthesis = SynthesisStats()
    starts = _starting_answers(generator, prompts, search, synthesis)
    start_scores = _score(
        reward_model,
        [[*p.messages, _assistant(a)] for p, a in zip(prompts, starts, strict=True)],
        [list(p.constraints) for p in prompts],
        stats,
    )
    states = [
        _Searching(p, a, s if _usable(s) else None, a, s, active=_usable(s))
        for p, a, s in zip(prompts, starts, start_scores, strict=True)
    ]
    stats.unscored_starts = sum(not s.active for s in states)

    tree = search.tree()
    for round_index in range(search.max_rounds):
        active = [s for s in states if s.active]
        if not active:
            break
        calls_before = synthesis.engine_calls
        _run_round(generator, reward_model, active, templates, tree, round_index, synthesis, stats)
        stats.active_per_round.append(len(active))
        stats.calls_per_round.append(synthesis.engine_calls - calls_before)
        for state in active:
            if state.active and round_index == search.max_rounds - 1:
                stats.reached_max_rounds += 1

    copy_totals(synthesis, stats)
    stats.format_retries = synthesis.format_retries
    stats.dropped_critiques = synthesis.dropped_critiques
    stats.rounds = Counter(len(s.rounds) for s in states)
    stats.improved_searches = sum(any(r.best is not None for r in s.rounds) for s in states)
    record_lineage = lineage.model_copy(
        update={
            "generator": lineage.generator or generator.model_id,
            "reward_model": reward_model.model_id,
            "template_version": lineage.template_version or templates.version,
            "sampling": lineage.sampling or search.sampling,
        }
    )
    records = [
        GreedySearch(
            prompt_id=s.prompt.prompt_id,
            messages=[*s.prompt.messages, _assistant(s.start)],
            initial_score=s.start_score,
            rounds=s.rounds,
            constraints=s.prompt.constraints,
            lineage=record_lineage,
            token_counts=[
                *token_counts([(f"messages[{len(s.prompt.messages)}].content", s.start)]),
                *s.token_counts,
            ],
        )
        for s in states
    ]
    return records, stats


def _run_round(
    generator: Generator,
    reward_model: RewardModel,
    active: list[_Searching],
    templates: Templates,
    tree: TreeConfig,
    round_index: int,
    synthesis: SynthesisStats,
    stats: SearchStats,
) -> None:
    """One round for every active prompt: critiques, refinements, scores, winner or stop."""
    answered = [[*s.prompt.messages, _assistant(s.current)] for s in active]
    level = f"search-round-{round_index}"
    slots = generate_critiques(generator, answered, templates, tree, synthesis, f"{level}-critique")
    generate_refinements(generator, answered, slots, templates, tree, synthesis, f"{level}-refine")
    conversations: list[Conversation] = []
    constraints: list[list[Constraint]] = []
    for slot in slots:
        prompt = active[slot.tree_index].prompt
        for text in slot.refinements:
            conversations.append([*prompt.messages, _assistant(text)])
            constraints.append(list(prompt.constraints))
    scores = iter(_score(reward_model, conversations, constraints, stats))
    critiques: list[list[Critique]] = [[] for _ in active]
    for slot in slots:
        critiques[slot.tree_index].append(
            Critique(
                text=slot.text,
                rating=slot.rating,
                format_retries=slot.format_retries,
                refinements=[Refinement(text=t, score=next(scores)) for t in slot.refinements],
            )
        )
    stats.critiques += len(slots)
    stats.refinements += sum(len(slot.refinements) for slot in slots)

    for i, state in enumerate(active):
        own = [slot for slot in slots if slot.tree_index == i]
        path = f"rounds[{len(state.rounds)}].critiques"
        state.token_counts.extend(token_counts(slot_texts(own, path)))
    for state, round_critiques in zip(active, critiques, strict=True):
        scored = [
            r.score
            for c in round_critiques
            for r in c.refinements
            if r.score is not None and not math.isnan(r.score)
        ]
        best_score = max(scored) if scored else None
        if best_score is not None:
            stats.round_gains.setdefault(round_index, []).append(best_score - state.current_score)
        winner = pick_round_winner(round_critiques, state.current_score)
        state.rounds.append(
            Round(
                answer=state.current,
                critiques=round_critiques,
                best=None if winner is None else (winner[0], winner[1]),
                best_score=best_score,
            )
        )
        if winner is None:
            state.active = False
            stats.stopped_no_gain += 1
            continue
        critique_index, refinement_index, score = winner
        state.current = round_critiques[critique_index].refinements[refinement_index].text
        state.current_score = score
        stats.improved_rounds += 1


def search_gain(search: GreedySearch) -> float | None:
    """Score of the search's final answer minus its starting answer's (0 when no round improved);
    None when the starting answer has no score."""
    if not _usable(search.initial_score):
        return None
    assert search.initial_score is not None
    final = search.initial_score
    for round_ in search.rounds:
        if round_.best is not None and round_.best_score is not None:
            final = round_.best_score
    return final - search.initial_score


# ---- k long responses ---------------------------------------------------------------------------


class LongResponseStats(BaseModel):
    """What sampling (and scoring) long responses did."""

    prompts: int = 0
    responses: int = 0
    format_retries: int = Field(0, description="re-samples spent to get a parseable final answer")
    unparsed: int = Field(0, description="responses still without a final answer after retries")
    engine_calls: int = 0
    reward_calls: int = 0
    generated_chars: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generated_texts: int = 0
    scored: int = Field(0, description="final answers scored")


@dataclass
class _Slot:
    """One of a prompt's k responses while it is being sampled."""

    prompt_index: int
    response: str
    final_answer: str | None
    format_retries: int = 0


def sample_long_responses(
    generator: Generator,
    searches: list[GreedySearch],
    long: LongResponseConfig,
    lineage: Lineage,
) -> tuple[list[CoTSample], LongResponseStats]:
    """k long responses per searched prompt, from the prompt turns only; unscored.

    The prompt is the search's conversation without its starting answer, and the record's
    `reference_score` is that answer's score: a kept pair must beat it.
    """
    stats = LongResponseStats(prompts=len(searches))
    if not searches:
        return [], stats
    synthesis = SynthesisStats()
    prompts = [list(s.messages[:-1]) for s in searches]
    outputs = chat_checked(
        generator, prompts, level_sampling(long.sampling, "long", long.k), synthesis, "long"
    )
    slots = [
        _Slot(i, text, extract_final_answer(text))
        for i, samples in enumerate(outputs)
        for text in samples
    ]
    for retry_round in range(1, long.max_format_retries + 1):
        missing = [slot for slot in slots if slot.final_answer is None]
        if not missing:
            break
        retried = chat_checked(
            generator,
            [prompts[slot.prompt_index] for slot in missing],
            level_sampling(long.sampling, f"long-retry-{retry_round}", 1),
            synthesis,
            f"long retry {retry_round}",
        )
        for slot, samples in zip(missing, retried, strict=True):
            slot.response = samples[0]
            slot.final_answer = extract_final_answer(slot.response)
            slot.format_retries += 1
            stats.format_retries += 1

    stats.responses = len(slots)
    stats.unparsed = sum(slot.final_answer is None for slot in slots)
    copy_totals(synthesis, stats)
    record_lineage = lineage.model_copy(
        update={
            "generator": lineage.generator or generator.model_id,
            "sampling": lineage.sampling or long.sampling,
        }
    )
    records = []
    for i, search in enumerate(searches):
        own = [slot for slot in slots if slot.prompt_index == i]
        records.append(
            CoTSample(
                prompt_id=search.prompt_id,
                prompt=prompts[i],
                reference_score=search.initial_score,
                samples=[
                    CoTResponse(
                        response=slot.response,
                        final_answer=slot.final_answer,
                        format_retries=slot.format_retries,
                    )
                    for slot in own
                ],
                constraints=search.constraints,
                lineage=record_lineage,
                token_counts=token_counts(
                    [(f"samples[{k}].response", slot.response) for k, slot in enumerate(own)]
                ),
            )
        )
    return records, stats


def score_long_responses(
    reward_model: RewardModel, samples: list[CoTSample]
) -> tuple[list[CoTSample], LongResponseStats]:
    """Score every parsed final answer (alone, in its prompt's context) in one reward call.

    A response without a final answer keeps `score=None`: the thinking before the marker is never
    scored, so a long response cannot win by its deliberation.
    """
    stats = LongResponseStats(prompts=len(samples))
    conversations: list[Conversation] = []
    constraints: list[list[Constraint]] = []
    for sample in samples:
        for response in sample.samples:
            stats.responses += 1
            if response.final_answer is None:
                stats.unparsed += 1
                continue
            conversations.append([*sample.prompt, _assistant(response.final_answer)])
            constraints.append(list(sample.constraints))
    scores = iter(_score(reward_model, conversations, constraints, stats))
    stats.scored = len(conversations)
    scored = []
    for sample in samples:
        responses = [
            r if r.final_answer is None else r.model_copy(update={"score": next(scores)})
            for r in sample.samples
        ]
        lineage = sample.lineage.model_copy(update={"reward_model": reward_model.model_id})
        scored.append(sample.model_copy(update={"samples": responses, "lineage": lineage}))
    return scored, stats
