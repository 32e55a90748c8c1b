"""Properties of the selection rules over random scored trees, and TRL's acceptance of the pairs."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from avr_core.config import SelectionConfig
from avr_core.schemas import (
    CoTResponse,
    CoTSample,
    Critique,
    GreedySearch,
    Message,
    PreferencePair,
    Refinement,
    RefinementTree,
    Round,
)
from avr_core.selection import (
    assemble_trajectory,
    build_length_controlled_pair,
    build_preference_pairs,
    is_degenerate,
    pick_round_winner,
    select_refinement_sft,
)
from avr_core.templates import (
    BUNDLED_TEMPLATE_DIR,
    FINAL_ANSWER_MARKER,
    extract_final_answer,
    judge_request,
    load_templates,
    refine_request,
)

CFG = SelectionConfig()
TEMPLATES = load_templates()
PROMPT = [Message(role="system", content="Be brief."), Message(role="user", content="Why?")]
DEGENERATE = "again " * CFG.degenerate_repeat_threshold
PROPERTY_SETTINGS = settings(deadline=None, max_examples=300)
# The line of trajectory.jinja that introduces the closing critique.
CLOSING_REVIEW = "Let me review this draft once more."
CLOSING_VERDICT = "Trying to act on this review did not make the answer better"

# A few repeated values make ties common; free floats cover everything else; None is rarer
# than a number so that most trees reach the later pairs.
present_scores = st.one_of(
    st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0]),
    st.sampled_from([0.0, 1.0, 3.0]),
    st.floats(-5, 5, allow_nan=False),
)
scores = st.one_of(st.none(), present_scores, present_scores)
texts = st.one_of(
    st.sampled_from(["ok", "fine answer", "a much longer answer " * 3, "ok", DEGENERATE]),
    st.text(alphabet="ab !1\n", max_size=20),
    st.text(alphabet="cd 2", max_size=10),
)
refinements = st.builds(Refinement, text=texts, score=scores)
critiques = st.builds(
    Critique,
    text=st.one_of(texts, st.just(DEGENERATE)),  # degenerate critiques exercise the skip rules
    refinements=st.lists(refinements, min_size=0, max_size=4),
)


def build_tree(
    answer: str, answer_score: float | None, critiques: list[Critique]
) -> RefinementTree:
    return RefinementTree(
        prompt_id="p",
        messages=[*PROMPT, Message(role="assistant", content=answer)],
        answer_score=answer_score,
        critiques=critiques,
    )


trees = st.builds(
    build_tree,
    answer=texts,
    answer_score=st.one_of(st.none(), present_scores, present_scores, present_scores),
    critiques=st.lists(critiques, min_size=0, max_size=4),
)

# Texts from tiny alphabets, so that critiques share texts and refinements repeat each other or
# the answer: every way for a pair to prefer a text to itself.
few_texts = st.sampled_from(["x", "y", "z"])
few_scores = st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.0]))
few_refinements = st.builds(Refinement, text=few_texts, score=few_scores)
duplicate_trees = st.builds(
    build_tree,
    answer=few_texts,
    answer_score=st.sampled_from([0.0, 1.0]),
    critiques=st.lists(
        st.builds(
            Critique,
            text=st.sampled_from(["c", "d"]),
            refinements=st.lists(few_refinements, max_size=3),
        ),
        max_size=4,
    ),
)


def scored(tree: RefinementTree) -> list[tuple[int, float, str]]:
    """(critique index, score, text) of every scored refinement, in tree order."""
    return [
        (ci, r.score, r.text)
        for ci, c in enumerate(tree.critiques)
        for r in c.refinements
        if r.score is not None
    ]


def best_gain(tree: RefinementTree) -> float | None:
    items = scored(tree)
    if tree.answer_score is None or not items:
        return None
    return max(score for _, score, _ in items) - tree.answer_score


def assert_trl_conversational(pair: PreferencePair) -> None:
    """TRL's conversational preference format: prompt ends with a user turn, one reply each."""
    assert pair.prompt and pair.prompt[-1].role == "user"
    assert all(m.role in ("system", "user", "assistant") for m in pair.prompt)
    for reply in (pair.chosen, pair.rejected):
        assert len(reply) == 1 and reply[0].role == "assistant"


@PROPERTY_SETTINGS
@given(trees)
def test_pairs_prefer_the_higher_score_and_follow_the_format(tree: RefinementTree):
    pairs = build_preference_pairs(tree, CFG, TEMPLATES)
    # Each kind at most once, in order; any of them may be missing (a pair whose chosen equals
    # its rejected is skipped on its own).
    kinds = [p.kind for p in pairs]
    assert kinds == [k for k in ("generation", "critique", "refinement") if k in kinds]
    for pair in pairs:
        assert pair.chosen_score > pair.rejected_score
        assert_trl_conversational(pair)
        assert not is_degenerate(pair.chosen[0].content)
        assert not is_degenerate(pair.rejected[0].content)
        if pair.kind == "generation":
            assert pair.prompt == PROMPT
            assert pair.chosen_score == max(score for _, score, _ in scored(tree))
            assert pair.rejected == [tree.messages[-1]]
        else:
            assert pair.prompt[: len(tree.messages) + 1] == [
                *tree.messages,
                judge_request(TEMPLATES),
            ]
        if pair.kind == "refinement":
            assert pair.prompt[-1] == refine_request(TEMPLATES)


@PROPERTY_SETTINGS
@given(st.one_of(trees, duplicate_trees))
def test_no_pair_prefers_a_text_to_itself(tree: RefinementTree):
    for pair in build_preference_pairs(tree, CFG, TEMPLATES):
        assert pair.chosen[0].content != pair.rejected[0].content


@PROPERTY_SETTINGS
@given(st.one_of(trees, duplicate_trees))
def test_critique_pair_values_are_extreme_critique_means(tree: RefinementTree):
    # Critiques with the same text are one critique: their refinements are pooled.
    by_critique: dict[str, list[float]] = {}
    for ci, score, _ in scored(tree):
        by_critique.setdefault(tree.critiques[ci].text, []).append(score)
    means = [math.fsum(v) / len(v) for v in by_critique.values()]
    for pair in build_preference_pairs(tree, CFG, TEMPLATES):
        if pair.kind == "critique":
            assert pair.chosen_score == max(means)
            assert pair.rejected_score == min(means)


@PROPERTY_SETTINGS
@given(trees)
def test_nothing_is_selected_without_positive_gain(tree: RefinementTree):
    gain = best_gain(tree)
    pairs = build_preference_pairs(tree, CFG, TEMPLATES)
    example = select_refinement_sft(tree, CFG, TEMPLATES)
    if gain is None or gain <= 0:
        assert pairs == []
        assert example is None
    if example is not None:
        best_score = max(score for _, score, _ in scored(tree))
        best_texts = [text for _, score, text in scored(tree) if score == best_score]
        assert example.messages[-1] == Message(role="assistant", content=best_texts[0])
        assert example.messages[: len(tree.messages)] == tree.messages
        assert example.messages[-2] == refine_request(TEMPLATES)


@PROPERTY_SETTINGS
@given(st.lists(critiques, max_size=4), st.floats(-5, 5, allow_nan=False))
def test_round_winner_is_the_strictly_better_maximum(round_critiques, current):
    winner = pick_round_winner(round_critiques, current)
    all_scores = [r.score for c in round_critiques for r in c.refinements if r.score is not None]
    if not all_scores or max(all_scores) <= current:
        assert winner is None
        return
    ci, ri, score = winner
    assert score == max(all_scores) == round_critiques[ci].refinements[ri].score


@st.composite
def searches(draw) -> GreedySearch:
    """A greedy search: some improving rounds, then maybe a closing non-improving one (whose
    refinements may all be unscored); the initial answer is sometimes degenerate."""
    rounds = []
    for _ in range(draw(st.integers(0, 3))):
        round_critiques = draw(st.lists(critiques, min_size=1, max_size=3))
        ci = draw(st.integers(0, len(round_critiques) - 1))
        winner = Refinement(text=draw(texts), score=1.0)
        round_critiques[ci].refinements.append(winner)
        ri = len(round_critiques[ci].refinements) - 1
        rounds.append(Round(answer="x", critiques=round_critiques, best=(ci, ri), best_score=1.0))
    if draw(st.booleans()):
        rounds.append(Round(answer="x", critiques=draw(st.lists(critiques, max_size=3))))
    initial = draw(st.sampled_from(["draft", "draft", DEGENERATE]))
    return GreedySearch(
        prompt_id="s", messages=[*PROMPT, Message(role="assistant", content=initial)], rounds=rounds
    )


def test_closing_review_is_the_bundled_template_line():
    template = (BUNDLED_TEMPLATE_DIR / "trajectory.jinja").read_text()
    assert CLOSING_REVIEW in template and CLOSING_VERDICT in template


@PROPERTY_SETTINGS
@given(searches())
def test_trajectory_ends_with_a_readable_final_answer(search: GreedySearch):
    example = assemble_trajectory(search, TEMPLATES, CFG)
    improving = [r for r in search.rounds if r.best is not None]
    closes = bool(search.rounds) and search.rounds[-1].best is None
    # (score, critique text) of the closing round's refinements, in tree order
    closing_scores = [
        (r.score, c.text)
        for c in (search.rounds[-1].critiques if closes else [])
        for r in c.refinements
        if r.score is not None
    ]
    if not improving or not closing_scores or is_degenerate(search.messages[-1].content):
        assert example is None
        return
    last = improving[-1]
    final = last.critiques[last.best[0]].refinements[last.best[1]].text.strip()
    if not final or FINAL_ANSWER_MARKER in final:
        assert example is None
        return
    assert example.kind == "trajectory"
    assert example.messages[:-1] == PROMPT
    text = example.messages[-1].content
    assert extract_final_answer(text) == final
    assert text.count(CLOSING_REVIEW) == 1
    # The closing critique is the one whose refinement scored best, the first on ties.
    top = max(score for score, _ in closing_scores)
    closing_critique = next(critique for score, critique in closing_scores if score == top)
    # Exactly that critique stands between the closing review line and the line after it (an
    # empty critique or one that is a prefix of another would pass a startswith check).
    after_review = text.split(CLOSING_REVIEW)[1]
    shown = after_review.split(CLOSING_VERDICT)[0]
    assert shown.strip() == closing_critique.strip()


cot_samples = st.builds(
    lambda reference, samples: CoTSample(
        prompt_id="c", prompt=PROMPT, reference_score=reference, samples=samples
    ),
    reference=scores,
    samples=st.lists(
        st.builds(CoTResponse, response=texts, final_answer=st.none() | texts, score=scores),
        max_size=5,
    ),
)


duplicate_cot_samples = st.builds(
    lambda reference, samples: CoTSample(
        prompt_id="c", prompt=PROMPT, reference_score=reference, samples=samples
    ),
    reference=st.sampled_from([0.0, 1.0]),
    samples=st.lists(
        st.builds(
            CoTResponse,
            response=few_texts,
            final_answer=st.one_of(st.none(), few_texts),
            score=few_scores,
        ),
        max_size=5,
    ),
)


@PROPERTY_SETTINGS
@given(st.one_of(cot_samples, duplicate_cot_samples))
def test_length_controlled_pair_never_prefers_a_response_to_itself(sample: CoTSample):
    pair = build_length_controlled_pair(sample, CFG)
    if pair is not None:
        assert pair.chosen[0].content != pair.rejected[0].content


@PROPERTY_SETTINGS
@given(cot_samples)
def test_length_controlled_pair_prefers_better_and_not_longer(sample: CoTSample):
    pair = build_length_controlled_pair(sample, CFG)
    if pair is None:
        return
    assert_trl_conversational(pair)
    assert pair.chosen_score > pair.rejected_score
    assert pair.chosen_score > sample.reference_score
    candidates = [s for s in sample.samples if s.final_answer is not None and s.score is not None]
    best = next(s for s in candidates if s.score == pair.chosen_score)
    worst = next(s for s in candidates if s.score == pair.rejected_score)
    assert pair.chosen[0].content == best.response
    assert pair.rejected[0].content == worst.response
    assert len(best.final_answer) <= len(worst.final_answer)


def test_pairs_load_into_datasets_and_trl_chat_templates():
    """All three pair kinds go through datasets and TRL's conversational helpers unchanged."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    from avr_core.models import ensure_tiny_model

    tree = RefinementTree(
        prompt_id="p",
        messages=[*PROMPT, Message(role="assistant", content="Because.")],
        answer_score=0.0,
        critiques=[
            Critique(
                text="Too short. [[3]]",
                refinements=[
                    Refinement(text="Because of physics.", score=2.0),
                    Refinement(text="Because, well.", score=1.0),
                ],
            ),
            Critique(text="Fine. [[8]]", refinements=[Refinement(text="Because!", score=-1.0)]),
        ],
    )
    pairs = build_preference_pairs(tree, CFG, TEMPLATES)
    assert [p.kind for p in pairs] == ["generation", "critique", "refinement"]

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model())
    rows = [p.model_dump(include={"prompt", "chosen", "rejected"}) for p in pairs]
    dataset = Dataset.from_list(rows)
    assert set(dataset.column_names) == {"prompt", "chosen", "rejected"}
    for row, pair in zip(dataset, pairs, strict=True):
        assert is_conversational(row)
        rendered = maybe_apply_chat_template(row, tokenizer)
        assert set(rendered) == {"prompt", "chosen", "rejected"}
        assert all(isinstance(rendered[key], str) for key in rendered)
        # The prompt's last user turn is rendered, and the reply continues it.
        assert pair.prompt[-1].content in rendered["prompt"]
        assert rendered["chosen"].startswith(pair.chosen[0].content)
        assert rendered["rejected"].startswith(pair.rejected[0].content)
