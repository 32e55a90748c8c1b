"""Stage I tree synthesis over injected engines (DESIGN sections 3-5).

A shard of prompts becomes refinement trees in three generation levels, each ONE engine call over
the whole shard so the engine can batch (and, on vLLM, share prompt prefixes between samples):
1. answers: one sample per prompt;
2. critiques: `x` samples per answer over `build_critique_messages`;
3. refinements: `y` samples per kept critique over `build_refine_messages`.
With `require_rating`, critiques without a parseable `[[N]]` rating are re-sampled (again one call
per retry round over all missing slots) up to `max_format_retries` times, then dropped. Every
re-sample is counted, per critique and in the stats: nothing is retried or dropped silently.

`score_trees` then scores the answer and every refinement of every tree in one reward call.
Nothing here touches storage or Prefect; engines are passed in so tests can script them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from avr_core.config import TreeConfig
from avr_core.engines.base import Generator, RewardModel, token_usage
from avr_core.schemas import (
    Constraint,
    Conversation,
    Critique,
    Lineage,
    Message,
    PromptRecord,
    Refinement,
    RefinementTree,
    Sampling,
    TokenCount,
)
from avr_core.templates import (
    Templates,
    build_critique_messages,
    build_refine_messages,
    extract_rating,
)

__all__ = [
    "ENGINE_TOTALS",
    "CritiqueSlot",
    "SynthesisStats",
    "add_token_usage",
    "chat_checked",
    "copy_totals",
    "derive_seed",
    "generate_critiques",
    "generate_refinements",
    "generate_trees",
    "level_sampling",
    "score_checked",
    "score_gains",
    "score_trees",
    "slot_texts",
    "token_counts",
]

# Levels of one tree; each gets its own seed so e.g. critiques are not sampled with the answer's
# random stream, yet the same base seed reproduces the whole tree.
LEVEL_ANSWER = "answer"
LEVEL_CRITIQUE = "critique"
LEVEL_REFINE = "refine"


class SynthesisStats(BaseModel):
    """Counts of one `generate_trees` call (summed over shards by the tasks)."""

    trees: int = Field(0, description="prompts answered (one tree each)")
    critiques: int = Field(0, description="critiques kept in the trees")
    refinements: int = 0
    format_retries: int = Field(0, description="critique re-samples spent to get a rating")
    dropped_critiques: int = Field(0, description="critiques still unrated after all retries")
    engine_calls: int = 0
    generated_chars: int = Field(0, description="characters of all generated text, retries too")
    prompt_tokens: int = Field(
        0, description="tokens of the conversations sent, once per conversation and call"
    )
    completion_tokens: int = Field(0, description="tokens generated, retries too")
    generated_texts: int = Field(0, description="samples generated, retries too")


def derive_seed(base_seed: int | None, level: str) -> int | None:
    """A per-level seed from the base seed: levels differ, runs with the same base reproduce."""
    if base_seed is None:
        return None
    digest = hashlib.sha256(f"{base_seed}:{level}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def level_sampling(sampling: Sampling, level: str, n: int) -> Sampling:
    """`sampling` with `n` samples and the level's derived seed."""
    return sampling.model_copy(update={"n": n, "seed": derive_seed(sampling.seed, level)})


@dataclass
class CritiqueSlot:
    """One critique being generated: which tree it belongs to, its text and retries so far."""

    tree_index: int
    text: str
    rating: int | None
    format_retries: int = 0
    refinements: list[str] = field(default_factory=list)


def chat_checked(
    generator: Generator,
    conversations: list[Conversation],
    sampling: Sampling,
    stats: SynthesisStats,
    level: str,
) -> list[list[str]]:
    """One engine call, checked: exactly `sampling.n` strings per conversation, in order."""
    if not conversations:
        return []
    outputs = generator.chat(conversations, sampling)
    stats.engine_calls += 1
    if len(outputs) != len(conversations):
        raise ValueError(
            f"{level}: generator {generator.model_id!r} returned {len(outputs)} outputs "
            f"for {len(conversations)} conversations"
        )
    for i, samples in enumerate(outputs):
        if len(samples) != sampling.n:
            raise ValueError(
                f"{level}: generator {generator.model_id!r} returned {len(samples)} samples "
                f"for conversation {i}, expected n={sampling.n}"
            )
        stats.generated_chars += sum(len(s) for s in samples)
        stats.generated_texts += len(samples)
        add_token_usage(stats, samples)
    return outputs


def add_token_usage(stats: SynthesisStats, samples: list[str]) -> None:
    """Add one conversation's samples to the token totals: its prompt once (the n samples of a
    request share it, and an API bills it once), every sample's completion. Samples from an
    engine that reports no counts add nothing."""
    usages = [usage for sample in samples if (usage := token_usage(sample)) is not None]
    if usages:
        stats.prompt_tokens += usages[0][0]
        stats.completion_tokens += sum(completion for _, completion in usages)


# The totals every engine-calling step reports, copied from its SynthesisStats into its own stats.
ENGINE_TOTALS = (
    "engine_calls",
    "generated_chars",
    "generated_texts",
    "prompt_tokens",
    "completion_tokens",
)


def copy_totals(synthesis: SynthesisStats, stats: BaseModel) -> None:
    """Copy the engine totals (`ENGINE_TOTALS`) of `synthesis` onto `stats`."""
    for name in ENGINE_TOTALS:
        setattr(stats, name, getattr(synthesis, name))


def token_counts(texts: list[tuple[str, str | None]]) -> list[TokenCount]:
    """The token counts of a record's generated texts, given as `(path in the record, text as
    the engine returned it)`; texts without counts (or absent) are left out."""
    counts = []
    for path, text in texts:
        usage = None if text is None else token_usage(text)
        if usage is not None:
            counts.append(TokenCount(text=path, prompt_tokens=usage[0], completion_tokens=usage[1]))
    return counts


def score_checked(
    reward_model: RewardModel,
    conversations: list[Conversation],
    constraints: list[list[Constraint]] | None,
) -> list[float]:
    """One reward call, checked: exactly one float per conversation, in order (no call for
    none). NaN scores pass through: each rule decides what an unscored candidate means."""
    if not conversations:
        return []
    scores = reward_model.score(conversations, constraints)
    if len(scores) != len(conversations):
        raise ValueError(
            f"reward model {reward_model.model_id!r} returned {len(scores)} scores "
            f"for {len(conversations)} conversations"
        )
    return [float(s) for s in scores]


def generate_trees(
    generator: Generator,
    prompts: list[PromptRecord],
    templates: Templates,
    tree: TreeConfig,
    lineage: Lineage,
) -> tuple[list[RefinementTree], SynthesisStats]:
    """Answer, critique (x per answer) and refine (y per critique) a shard of prompts.

    Returns one tree per prompt, in prompt order. Trees whose critiques were all dropped keep
    `critiques=[]` so the answer is still scored and counted.
    """
    sampling = tree.sampling
    stats = SynthesisStats()
    if not prompts:
        return [], stats
    for i, prompt in enumerate(prompts):
        if not prompt.messages or prompt.messages[-1].role != "user":
            raise ValueError(f"prompt {i} ({prompt.prompt_id}): messages must end with a user turn")

    answers = chat_checked(
        generator,
        [p.messages for p in prompts],
        level_sampling(sampling, LEVEL_ANSWER, 1),
        stats,
        LEVEL_ANSWER,
    )
    answered = [
        [*p.messages, Message(role="assistant", content=samples[0])]
        for p, samples in zip(prompts, answers, strict=True)
    ]
    stats.trees = len(answered)

    slots = generate_critiques(generator, answered, templates, tree, stats)
    generate_refinements(generator, answered, slots, templates, tree, stats)

    tree_lineage = lineage.model_copy(
        update={
            "generator": lineage.generator or generator.model_id,
            "template_version": lineage.template_version or templates.version,
            "sampling": lineage.sampling or sampling,
        }
    )
    trees = []
    for i, (prompt, messages) in enumerate(zip(prompts, answered, strict=True)):
        own = [slot for slot in slots if slot.tree_index == i]
        critiques = [
            Critique(
                text=slot.text,
                rating=slot.rating,
                format_retries=slot.format_retries,
                refinements=[Refinement(text=text) for text in slot.refinements],
            )
            for slot in own
        ]
        answer_path = f"messages[{len(messages) - 1}].content"
        trees.append(
            RefinementTree(
                prompt_id=prompt.prompt_id,
                messages=messages,
                critiques=critiques,
                constraints=prompt.constraints,
                lineage=tree_lineage,
                token_counts=token_counts(
                    [(answer_path, answers[i][0]), *slot_texts(own, "critiques")]
                ),
            )
        )
    stats.critiques = len(slots)
    stats.refinements = sum(len(slot.refinements) for slot in slots)
    return trees, stats


def slot_texts(slots: list[CritiqueSlot], prefix: str) -> list[tuple[str, str | None]]:
    """`(path, text)` of critique slots stored as `{prefix}[i]` Critiques, refinements included."""
    texts: list[tuple[str, str | None]] = []
    for c, slot in enumerate(slots):
        texts.append((f"{prefix}[{c}].text", slot.text))
        texts.extend(
            (f"{prefix}[{c}].refinements[{r}].text", text)
            for r, text in enumerate(slot.refinements)
        )
    return texts


def generate_critiques(
    generator: Generator,
    answered: list[Conversation],
    templates: Templates,
    tree: TreeConfig,
    stats: SynthesisStats,
    level: str = LEVEL_CRITIQUE,
) -> list[CritiqueSlot]:
    """x critiques per answer; with require_rating, unrated ones are re-sampled, then dropped.

    `level` names the call for seeds and errors (a Stage II round passes its own, so each round
    samples from its own stream)."""
    sampling = tree.sampling
    critique_prompts = [build_critique_messages(messages, templates) for messages in answered]
    outputs = chat_checked(
        generator,
        critique_prompts,
        level_sampling(sampling, level, tree.x),
        stats,
        level,
    )
    slots = [
        CritiqueSlot(tree_index=i, text=text, rating=extract_rating(text))
        for i, samples in enumerate(outputs)
        for text in samples
    ]
    if not tree.require_rating:
        return slots

    for retry_round in range(1, tree.max_format_retries + 1):
        missing = [slot for slot in slots if slot.rating is None]
        if not missing:
            break
        # One conversation per missing slot with n=1: a single call re-samples every gap at once.
        retry_outputs = chat_checked(
            generator,
            [critique_prompts[slot.tree_index] for slot in missing],
            level_sampling(sampling, f"{level}-retry-{retry_round}", 1),
            stats,
            f"{level} retry {retry_round}",
        )
        for slot, samples in zip(missing, retry_outputs, strict=True):
            slot.text = samples[0]
            slot.rating = extract_rating(slot.text)
            slot.format_retries += 1
            stats.format_retries += 1

    kept = [slot for slot in slots if slot.rating is not None]
    stats.dropped_critiques = len(slots) - len(kept)
    return kept


def generate_refinements(
    generator: Generator,
    answered: list[Conversation],
    slots: list[CritiqueSlot],
    templates: Templates,
    tree: TreeConfig,
    stats: SynthesisStats,
    level: str = LEVEL_REFINE,
) -> None:
    """y refinements per kept critique, in one call; stored on the slots in order."""
    refine_prompts = [
        build_refine_messages(answered[slot.tree_index], slot.text, templates) for slot in slots
    ]
    outputs = chat_checked(
        generator,
        refine_prompts,
        level_sampling(tree.sampling, level, tree.y),
        stats,
        level,
    )
    for slot, samples in zip(slots, outputs, strict=True):
        slot.refinements = list(samples)


def score_trees(reward_model: RewardModel, trees: list[RefinementTree]) -> list[RefinementTree]:
    """Score every answer and refinement of `trees` in one reward call; returns scored copies.

    Each candidate is scored as the full conversation it answers: the tree's prompt turns
    (`messages[:-1]`) plus the candidate as the assistant turn, with the tree's constraints.
    """
    conversations: list[Conversation] = []
    constraints: list[list[Constraint]] = []
    for tree in trees:
        prompt_turns = tree.messages[:-1]
        candidates = [tree.answer] + [r.text for c in tree.critiques for r in c.refinements]
        for text in candidates:
            conversations.append([*prompt_turns, Message(role="assistant", content=text)])
            constraints.append(list(tree.constraints))
    if not conversations:
        return []
    position = iter(score_checked(reward_model, conversations, constraints))
    scored = []
    for tree in trees:
        answer_score = next(position)
        critiques = [
            critique.model_copy(
                update={
                    "refinements": [
                        r.model_copy(update={"score": next(position)}) for r in critique.refinements
                    ]
                }
            )
            for critique in tree.critiques
        ]
        # Always the scoring model: re-scoring with another reward model must not keep the old id.
        lineage = tree.lineage.model_copy(update={"reward_model": reward_model.model_id})
        scored.append(
            tree.model_copy(
                update={"answer_score": answer_score, "critiques": critiques, "lineage": lineage}
            )
        )
    return scored


def score_gains(trees: list[RefinementTree]) -> list[float]:
    """Per scored tree: best refinement score minus answer score (for reports)."""
    gains = []
    for tree in trees:
        scores = [
            r.score
            for c in tree.critiques
            for r in c.refinements
            if r.score is not None and not math.isnan(r.score)
        ]
        if tree.answer_score is not None and not math.isnan(tree.answer_score) and scores:
            gains.append(max(scores) - tree.answer_score)
    return gains
