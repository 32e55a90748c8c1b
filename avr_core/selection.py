"""The selection rules of DESIGN section 5: which scored refinements become training data.

Every function here is pure: records in, records (or None) out. Conventions shared by all rules:
- gain(x) = score(x) - answer_score; a refinement without a score is ignored (a NaN score counts
  as no score: it comes from a failed reward call and would make every comparison False).
- Ties keep the first candidate in tree order (critique order, then refinement order), so every
  scan uses strict comparisons.
- A critique's value is the mean of its scored refinements, computed with `math.fsum` so that it
  does not depend on the order of the refinements.
- "Degenerate" text repeats some word, or some run of digits/symbols, at least `threshold` times
  (see `is_degenerate`); such text never becomes a chosen or rejected response.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple, TypeGuard

from avr_core.config import SelectionConfig
from avr_core.schemas import (
    Conversation,
    CoTSample,
    Critique,
    GreedySearch,
    Message,
    PairKind,
    PreferencePair,
    RefinementTree,
    SFTExample,
)
from avr_core.templates import (
    FINAL_ANSWER_MARKER,
    Templates,
    extract_final_answer,
    judge_request,
    load_templates,
    refine_request,
)

__all__ = [
    "assemble_trajectory",
    "build_length_controlled_pair",
    "build_preference_pairs",
    "is_degenerate",
    "pick_round_winner",
    "original_sft_example",
    "select_refinement_sft",
]

DEFAULT_DEGENERATE_THRESHOLD = 60

# Words are maximal runs of letters (any script); "symbol runs" are maximal runs of characters that
# are neither letters nor whitespace (digits, punctuation, underscores, emoji...). "ab12cd!!" has
# the words "ab", "cd" and the symbol runs "12", "!!".
_WORD_OR_SYMBOL_RUN = re.compile(r"[^\W\d_]+|(?:(?![^\W\d_])\S)+")


class _Scored(NamedTuple):
    """A scored refinement with its position in the tree."""

    critique_index: int
    refinement_index: int
    text: str
    score: float


def is_degenerate(text: str, threshold: int = DEFAULT_DEGENERATE_THRESHOLD) -> bool:
    """True if one word (case-insensitive) or one digit/symbol run occurs >= threshold times.

    Catches looping generations ("the the the ...", "!!!!\\n!!!!\\n...") that a reward model may
    still score well.
    """
    if threshold < 1:
        raise ValueError(f"degenerate threshold must be >= 1, got {threshold}")
    counts = Counter(token.casefold() for token in _WORD_OR_SYMBOL_RUN.findall(text))
    return any(count >= threshold for count in counts.values())


def _has_score(score: float | None) -> TypeGuard[float]:
    """A usable score: present and not NaN (a failed reward call is treated as unscored)."""
    return score is not None and not math.isnan(score)


def _scored_refinements(critiques: list[Critique]) -> Iterator[_Scored]:
    """Refinements that have a score, in tree order."""
    for ci, critique in enumerate(critiques):
        for ri, refinement in enumerate(critique.refinements):
            score = refinement.score
            if _has_score(score):
                yield _Scored(ci, ri, refinement.text, score)


def _first_highest(candidates: list[_Scored]) -> _Scored | None:
    """The highest-scoring candidate; the first one on ties."""
    best = None
    for candidate in candidates:
        if best is None or candidate.score > best.score:
            best = candidate
    return best


def _first_lowest(candidates: list[_Scored]) -> _Scored | None:
    """The lowest-scoring candidate; the first one on ties."""
    worst = None
    for candidate in candidates:
        if worst is None or candidate.score < worst.score:
            worst = candidate
    return worst


def _assistant(text: str) -> Message:
    return Message(role="assistant", content=text)


def _passes_length_guard(best: str, answer: str, cfg: SelectionConfig) -> bool:
    """RSFT length guard: the refinement may not be much longer than the answer (characters).

    Kept if it adds fewer than `rsft_max_extra_chars` characters, or if it is less than
    `rsft_max_length_ratio` times as long. An empty answer makes the ratio infinite, so only the
    first clause can keep it.
    """
    if len(best) - len(answer) < cfg.rsft_max_extra_chars:
        return True
    return len(answer) > 0 and len(best) / len(answer) < cfg.rsft_max_length_ratio


def select_refinement_sft(
    tree: RefinementTree, cfg: SelectionConfig, templates: Templates | None = None
) -> SFTExample | None:
    """Stage I RSFT: the tree's best refinement, shown after its critique, if it beats the answer.

    messages = tree.messages + [judge request, critique, refine request, best refinement].
    None if nothing is scored, the answer is unscored, gain(best) <= 0, or the length guard fails.
    """
    if not _has_score(tree.answer_score):
        return None
    best = _first_highest(list(_scored_refinements(tree.critiques)))
    if best is None or not best.score - tree.answer_score > 0:
        return None
    if not _passes_length_guard(best.text, tree.answer, cfg):
        return None
    if templates is None:
        templates = load_templates()
    messages = [
        *tree.messages,
        judge_request(templates),
        _assistant(tree.critiques[best.critique_index].text),
        refine_request(templates),
        _assistant(best.text),
    ]
    return SFTExample(
        prompt_id=tree.prompt_id, messages=messages, kind="refinement", lineage=tree.lineage
    )


def original_sft_example(tree: RefinementTree) -> SFTExample:
    """The tree's original conversation as an SFT example (for `cfg.rsft_include_original`)."""
    return SFTExample(
        prompt_id=tree.prompt_id,
        messages=list(tree.messages),
        kind="original",
        lineage=tree.lineage,
    )


def _critique_values(scored: list[_Scored]) -> dict[int, float]:
    """Mean score of each critique's scored refinements, keyed by critique index in tree order."""
    grouped: dict[int, list[float]] = {}
    for item in scored:
        grouped.setdefault(item.critique_index, []).append(item.score)
    return {ci: math.fsum(scores) / len(scores) for ci, scores in grouped.items()}


def build_preference_pairs(
    tree: RefinementTree, cfg: SelectionConfig, templates: Templates | None = None
) -> list[PreferencePair]:
    """Stage I DPO pairs from one scored tree, in order: generation, critique, refinement.

    The generation pair needs a non-degenerate answer and best refinement with gain(best) > 0.
    The critique and refinement pairs need two critiques of different value, the better one
    non-degenerate with a refinement scoring at least the answer (DESIGN section 5, steps 1-5).
    """
    threshold = cfg.degenerate_repeat_threshold
    scored = list(_scored_refinements(tree.critiques))
    best = _first_highest(scored)
    answer_score = tree.answer_score
    if (
        is_degenerate(tree.answer, threshold)
        or best is None
        or not _has_score(answer_score)
        or not best.score - answer_score > 0
        or is_degenerate(best.text, threshold)
    ):
        return []
    if templates is None:
        templates = load_templates()

    def pair(
        kind: PairKind,
        prompt: Conversation,
        chosen: str,
        rejected: str,
        chosen_score: float,
        rejected_score: float,
    ) -> PreferencePair:
        return PreferencePair(
            prompt_id=tree.prompt_id,
            kind=kind,
            prompt=prompt,
            chosen=[_assistant(chosen)],
            rejected=[_assistant(rejected)],
            chosen_score=chosen_score,
            rejected_score=rejected_score,
            lineage=tree.lineage,
        )

    pairs = [
        pair(
            "generation",
            list(tree.messages[:-1]),
            best.text,
            tree.answer,
            best.score,
            answer_score,
        )
    ]

    values = _critique_values(scored)
    # dict order is tree order: strict comparisons keep the first. `scored` is not empty here.
    best_c = worst_c = next(iter(values))
    for ci, value in values.items():
        if value > values[best_c]:
            best_c = ci
        if value < values[worst_c]:
            worst_c = ci
    under_best_c = [item for item in scored if item.critique_index == best_c]
    hi = _first_highest(under_best_c)
    best_c_text = tree.critiques[best_c].text
    if (
        hi is None
        or best_c == worst_c
        or values[best_c] <= values[worst_c]
        or hi.score < answer_score
        or is_degenerate(best_c_text, threshold)
    ):
        return pairs

    judge = judge_request(templates)
    worst_c_text = tree.critiques[worst_c].text
    if not is_degenerate(worst_c_text, threshold):
        pairs.append(
            pair(
                "critique",
                [*tree.messages, judge],
                best_c_text,
                worst_c_text,
                values[best_c],
                values[worst_c],
            )
        )

    lo = _first_lowest(under_best_c)
    if (
        lo is not None
        and len(under_best_c) >= 2
        and hi.score > lo.score
        and lo.score != answer_score
        and not is_degenerate(hi.text, threshold)
        and not is_degenerate(lo.text, threshold)
    ):
        prompt = [*tree.messages, judge, _assistant(best_c_text), refine_request(templates)]
        pairs.append(pair("refinement", prompt, hi.text, lo.text, hi.score, lo.score))
    return pairs


def pick_round_winner(
    critiques: list[Critique], current_score: float
) -> tuple[int, int, float] | None:
    """Stage II greedy step: (critique index, refinement index, score) of the round's best
    refinement (first on ties) if it beats `current_score`, else None (the search stops)."""
    if not _has_score(current_score):
        raise ValueError(
            f"current_score is {current_score}: score the current answer before a greedy round"
        )
    best = _first_highest(list(_scored_refinements(critiques)))
    if best is None or not best.score > current_score:
        return None
    return best.critique_index, best.refinement_index, best.score


def assemble_trajectory(search: GreedySearch, templates: Templates) -> SFTExample | None:
    """Stage II RSFT: the whole greedy search as one assistant message ending in the final answer.

    Layout (the `trajectory` template): the initial answer; for each improving round the critique
    whose refinement won and that refinement; the first critique of the last, non-improving round
    (the one that failed to improve); a closing line; FINAL_ANSWER_MARKER and the final answer
    (the winning refinement of the last improving round).
    None if no round improved, if the last round improved or has no critique (no closing
    critique to show), or if the final answer could not be read back by `extract_final_answer`
    (it is blank or contains the marker itself).
    """
    if not search.rounds:
        return None
    last = search.rounds[-1]
    if last.best is not None or not last.critiques:
        return None
    improving = [(i, r) for i, r in enumerate(search.rounds) if r.best is not None]
    if not improving:
        return None

    steps = []
    for index, round_ in improving:
        assert round_.best is not None  # `improving` holds only rounds with a best
        ci, ri = round_.best
        if not (
            0 <= ci < len(round_.critiques) and 0 <= ri < len(round_.critiques[ci].refinements)
        ):
            raise ValueError(
                f"prompt {search.prompt_id!r}, round {index}: best {list(round_.best)} "
                f"points outside its critiques/refinements"
            )
        critique = round_.critiques[ci]
        steps.append({"critique": critique.text, "refinement": critique.refinements[ri].text})
    final_answer = steps[-1]["refinement"].strip()
    if not final_answer or FINAL_ANSWER_MARKER in final_answer:
        return None

    text = templates.render(
        "trajectory",
        initial_answer=search.messages[-1].content,
        steps=steps,
        final_critique=last.critiques[0].text,
        marker=FINAL_ANSWER_MARKER,
        final_answer=final_answer,
    )
    if extract_final_answer(text) != final_answer:
        raise ValueError(
            f"template trajectory.jinja in {templates.directory} must end with "
            f"{{{{ marker }}}} followed by {{{{ final_answer }}}}"
        )
    return SFTExample(
        prompt_id=search.prompt_id,
        messages=[*search.messages[:-1], _assistant(text)],
        kind="trajectory",
        lineage=search.lineage,
    )


def build_length_controlled_pair(sample: CoTSample, cfg: SelectionConfig) -> PreferencePair | None:
    """Stage II DPO: best vs worst sampled response, kept only if the best beats the reference
    answer and the worst, and its final answer is no longer than the worst's.

    Only samples with a parsed final answer and a score take part; first on ties. `cfg` is taken
    for symmetry with the other rules (no threshold applies here yet).
    """
    del cfg
    # (score, final answer, response) of every sample with a parsed final answer and a score
    candidates = [
        (s.score, s.final_answer, s.response)
        for s in sample.samples
        if s.final_answer is not None and _has_score(s.score)
    ]
    reference = sample.reference_score
    if not candidates or not _has_score(reference):
        return None
    best = worst = candidates[0]
    for candidate in candidates[1:]:
        if candidate[0] > best[0]:
            best = candidate
        if candidate[0] < worst[0]:
            worst = candidate
    if not (best[0] > reference and best[0] > worst[0] and len(best[1]) <= len(worst[1])):
        return None
    return PreferencePair(
        prompt_id=sample.prompt_id,
        kind="trajectory",
        prompt=list(sample.prompt),
        chosen=[_assistant(best[2])],
        rejected=[_assistant(worst[2])],
        chosen_score=best[0],
        rejected_score=worst[0],
        lineage=sample.lineage,
    )
