"""The selection rules of DESIGN section 5: which scored refinements become training data.

Every function here is pure: records in, records (or None) out. Conventions shared by all rules:
- gain(x) = score(x) - answer_score; a refinement without a score is ignored (a NaN score counts
  as no score: it comes from a failed reward call and would make every comparison False).
- Ties keep the first candidate in tree order (critique order, then refinement order), so every
  scan uses strict comparisons.
- Critiques with identical text are one critique: their refinements are pooled. A critique's
  value is the mean of its scored refinements, computed with `math.fsum` so that it does not
  depend on the order of the refinements.
- No pair of any kind has a chosen text equal to its rejected text: such a pair teaches nothing
  and only adds noise to the DPO loss.
- "Degenerate" text repeats some word, or some run of digits/symbols, at least `threshold` times
  (see `is_degenerate`); such text never becomes a chosen or rejected response.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from itertools import chain
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
    "CHOSEN_LONGER",
    "KEPT",
    "assemble_trajectory",
    "build_length_controlled_pair",
    "build_preference_pairs",
    "is_degenerate",
    "length_controlled_outcome",
    "pick_round_winner",
    "original_sft_example",
    "select_refinement_sft",
    "trajectory_outcome",
]

DEFAULT_DEGENERATE_THRESHOLD = 60
# What the *_outcome functions say when a record was kept (otherwise: why it was dropped).
KEPT = "kept"
# Why `length_controlled_outcome` drops a pair whose best final answer is longer than its worst.
CHOSEN_LONGER = "chosen_longer"

# The reference's tokenisation (DESIGN section 5). Words are `\w+` tokens of the text, in every
# script, digits and underscores included ("x0" and "x1" are two words). Symbol runs are maximal
# runs of digits and non-word characters once the spaces (not the newlines) are deleted:
# "| a1 | b1 |\n| a2 |" has the runs "|", "1|", "1|\n|" and "2|".
_WORD = re.compile(r"\w+")
_SYMBOL_RUN = re.compile(r"[\d\W]+")


class _Scored(NamedTuple):
    """A scored refinement with its position in the tree."""

    critique_index: int
    refinement_index: int
    text: str
    score: float


def is_degenerate(text: str, threshold: int = DEFAULT_DEGENERATE_THRESHOLD) -> bool:
    """True if one word (lower-cased) or one digit/symbol run occurs >= threshold times.

    Catches looping generations ("the the the ...", "a! b! c! ...") that a reward model may still
    score well. Unlike the reference, text without ASCII letters is tokenised the same way (the
    reference counts its single characters, which flags any long non-Latin prose).
    """
    if threshold < 1:
        raise ValueError(f"degenerate threshold must be >= 1, got {threshold}")
    words = Counter(word.lower() for word in _WORD.findall(text))
    symbol_runs = Counter(_SYMBOL_RUN.findall(text.replace(" ", "")))
    return any(count >= threshold for count in chain(words.values(), symbol_runs.values()))


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


def _group_by_critique_text(
    critiques: list[Critique], scored: list[_Scored]
) -> dict[str, list[_Scored]]:
    """Scored refinements keyed by their critique's text, in tree order of each text's first
    critique; critiques without a scored refinement are left out.

    Critiques with identical text are one critique (DESIGN section 5, "Changes"): kept apart they
    could make a critique pair whose chosen equals its rejected.
    """
    groups: dict[str, list[_Scored]] = {critique.text: [] for critique in critiques}
    for item in scored:
        groups[critiques[item.critique_index].text].append(item)
    return {text: items for text, items in groups.items() if items}


def _mean_score(items: list[_Scored]) -> float:
    """A critique's value: the mean score of its scored refinements (order-independent)."""
    return math.fsum(item.score for item in items) / len(items)


def build_preference_pairs(
    tree: RefinementTree, cfg: SelectionConfig, templates: Templates | None = None
) -> list[PreferencePair]:
    """Stage I DPO pairs from one scored tree, in order: generation, critique, refinement.

    The generation pair needs a non-degenerate answer and best refinement with gain(best) > 0.
    The critique and refinement pairs need two critiques of different value, the better one
    non-degenerate with a refinement scoring at least the answer (DESIGN section 5, steps 1-5).
    Critiques are grouped by text, and a pair whose chosen text equals its rejected text is
    skipped on its own (the other pairs are still built).
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

    pairs: list[PreferencePair] = []

    def add_pair(
        kind: PairKind,
        prompt: Conversation,
        chosen: str,
        rejected: str,
        chosen_score: float,
        rejected_score: float,
    ) -> None:
        """Append the pair unless chosen and rejected are the same text (nothing to prefer)."""
        if chosen == rejected:
            return
        pairs.append(
            PreferencePair(
                prompt_id=tree.prompt_id,
                kind=kind,
                prompt=prompt,
                chosen=[_assistant(chosen)],
                rejected=[_assistant(rejected)],
                chosen_score=chosen_score,
                rejected_score=rejected_score,
                lineage=tree.lineage,
            )
        )

    add_pair(
        "generation", list(tree.messages[:-1]), best.text, tree.answer, best.score, answer_score
    )

    groups = _group_by_critique_text(tree.critiques, scored)
    values = {text: _mean_score(items) for text, items in groups.items()}
    # dict order is tree order: strict comparisons keep the first. `scored` is not empty here.
    best_c = worst_c = next(iter(values))
    for text, value in values.items():
        if value > values[best_c]:
            best_c = text
        if value < values[worst_c]:
            worst_c = text
    under_best_c = groups[best_c]
    hi = _first_highest(under_best_c)
    if (
        hi is None
        or best_c == worst_c
        or values[best_c] <= values[worst_c]
        or hi.score < answer_score
        or is_degenerate(best_c, threshold)
    ):
        return pairs

    judge = judge_request(templates)
    if not is_degenerate(worst_c, threshold):
        add_pair(
            "critique", [*tree.messages, judge], best_c, worst_c, values[best_c], values[worst_c]
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
        prompt = [*tree.messages, judge, _assistant(best_c), refine_request(templates)]
        add_pair("refinement", prompt, hi.text, lo.text, hi.score, lo.score)
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


def assemble_trajectory(
    search: GreedySearch, templates: Templates, cfg: SelectionConfig
) -> SFTExample | None:
    """Stage II RSFT: the whole greedy search as one assistant message ending in the final answer.

    Layout (the `trajectory` template): the initial answer; for each improving round its winning
    critique and refinement; the closing critique (from the last, non-improving round); a closing
    line; FINAL_ANSWER_MARKER and the final answer (the winning refinement of the last improving
    round, stripped). A round shows the critique whose refinement scored best in it, first in
    (critique, refinement) order on ties: for an improving round that is the critique of its
    `best`, for the closing round the one that came closest to improving the answer.
    None if the initial answer is degenerate (`cfg.degenerate_repeat_threshold`), if no round
    improved, if the last round improved or has no scored refinement (no closing critique to
    show), or if the final answer could not be read back by `extract_final_answer` (it is blank
    or contains the marker itself). `trajectory_outcome` also says which.
    """
    return trajectory_outcome(search, templates, cfg)[0]


def trajectory_outcome(
    search: GreedySearch, templates: Templates, cfg: SelectionConfig
) -> tuple[SFTExample | None, str]:
    """`assemble_trajectory` and why: (example, KEPT) or (None, the first rule that dropped it),
    one of: no_rounds, last_round_improved, closing_round_unscored, no_improving_round,
    degenerate_initial_answer, unreadable_final_answer."""
    if not search.rounds:
        return None, "no_rounds"
    last = search.rounds[-1]
    if last.best is not None:
        return None, "last_round_improved"
    closing = _first_highest(list(_scored_refinements(last.critiques)))
    if closing is None:
        return None, "closing_round_unscored"
    improving = [(i, r) for i, r in enumerate(search.rounds) if r.best is not None]
    if not improving:
        return None, "no_improving_round"
    initial_answer = search.messages[-1].content
    if is_degenerate(initial_answer, cfg.degenerate_repeat_threshold):
        return None, "degenerate_initial_answer"

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
        return None, "unreadable_final_answer"

    text = templates.render(
        "trajectory",
        initial_answer=initial_answer,
        steps=steps,
        final_critique=last.critiques[closing.critique_index].text,
        marker=FINAL_ANSWER_MARKER,
        final_answer=final_answer,
    )
    if extract_final_answer(text) != final_answer:
        raise ValueError(
            f"template trajectory.jinja in {templates.directory} must end with "
            f"{{{{ marker }}}} followed by {{{{ final_answer }}}}"
        )
    example = SFTExample(
        prompt_id=search.prompt_id,
        messages=[*search.messages[:-1], _assistant(text)],
        kind="trajectory",
        lineage=search.lineage,
    )
    return example, KEPT


def build_length_controlled_pair(sample: CoTSample, cfg: SelectionConfig) -> PreferencePair | None:
    """Stage II DPO: best vs worst sampled response, kept only if the best beats the reference
    answer and the worst, its final answer is no longer than the worst's, and the two responses
    differ.

    Only samples with a parsed final answer and a score take part; best is the first strict
    maximum, worst the first strict minimum. `cfg` is taken for symmetry with the other rules
    (no threshold applies here). `length_controlled_outcome` also says why a pair was not kept.
    """
    return length_controlled_outcome(sample, cfg)[0]


def length_controlled_outcome(
    sample: CoTSample, cfg: SelectionConfig
) -> tuple[PreferencePair | None, str]:
    """`build_length_controlled_pair` and why: (pair, KEPT) or (None, the first rule that failed),
    one of: no_scored_final_answer, reference_unscored, not_above_reference, no_score_spread,
    chosen_longer (the length rule), same_response."""
    # (score, final answer, response) of every sample with a parsed final answer and a score
    candidates = [
        (s.score, s.final_answer, s.response)
        for s in sample.samples
        if s.final_answer is not None and _has_score(s.score)
    ]
    reference = sample.reference_score
    if not candidates:
        return None, "no_scored_final_answer"
    if not _has_score(reference):
        return None, "reference_unscored"
    best = worst = candidates[0]
    for candidate in candidates[1:]:
        if candidate[0] > best[0]:
            best = candidate
        if candidate[0] < worst[0]:
            worst = candidate
    if not best[0] > reference:
        return None, "not_above_reference"
    if not best[0] > worst[0]:
        return None, "no_score_spread"
    if len(best[1]) > len(worst[1]):
        return None, CHOSEN_LONGER
    if best[2] == worst[2]:  # the same response scored twice: nothing to prefer
        return None, "same_response"
    pair = PreferencePair(
        prompt_id=sample.prompt_id,
        kind="trajectory",
        prompt=list(sample.prompt),
        chosen=[_assistant(best[2])],
        rejected=[_assistant(worst[2])],
        chosen_score=best[0],
        rejected_score=worst[0],
        lineage=sample.lineage,
    )
    return pair, KEPT
