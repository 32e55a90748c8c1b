"""One test per branch of the DESIGN section 5 selection rules."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from avr_core.config import SelectionConfig
from avr_core.schemas import (
    CoTResponse,
    CoTSample,
    Critique,
    GreedySearch,
    Lineage,
    Message,
    Refinement,
    RefinementTree,
    Round,
)
from avr_core.selection import (
    KEPT,
    assemble_trajectory,
    build_length_controlled_pair,
    build_preference_pairs,
    is_degenerate,
    length_controlled_outcome,
    original_sft_example,
    pick_round_winner,
    select_refinement_sft,
    trajectory_outcome,
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
JUDGE = judge_request(TEMPLATES)
REFINE = refine_request(TEMPLATES)
LINEAGE = Lineage(run="r1", stage="stage1", generator="g", reward_model="rm", template_version="v")
DEGENERATE = "loop " * 60
PROMPT = [Message(role="system", content="Be helpful."), Message(role="user", content="Question?")]


def user(text: str) -> Message:
    return Message(role="user", content=text)


def assistant(text: str) -> Message:
    return Message(role="assistant", content=text)


def make_critique(text: str, refinements: list[tuple[str, float | None]]) -> Critique:
    return Critique(text=text, refinements=[Refinement(text=t, score=s) for t, s in refinements])


def make_tree(
    answer_score: float | None,
    critiques: list[tuple[str, list[tuple[str, float | None]]]],
    answer: str = "the answer",
) -> RefinementTree:
    return RefinementTree(
        prompt_id="p1",
        messages=[*PROMPT, assistant(answer)],
        answer_score=answer_score,
        critiques=[make_critique(text, refs) for text, refs in critiques],
        lineage=LINEAGE,
    )


# ---------------------------------------------------------------------------- is_degenerate


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("word " * 59, False),
        ("word " * 60, True),
        ("Word WORD word " * 20, True),  # words compare case-insensitively
        ("the-" * 60, True),  # punctuation splits words (and "-" is a symbol run 60 times)
        # DESIGN deletes the spaces before taking symbol runs, so "!!! " * 60 is one run of 180
        # "!" (it was 60 runs of "!!!" when runs were split at whitespace).
        ("!!! " * 60, False),
        ("a! " * 60, True),  # the word "a", and the symbol run "!" once spaces are deleted
        ("42 " * 60, True),  # digits are word characters: the word "42"
        ("a42b " * 60, True),  # letters and digits form one word
        ("!! !!! " * 40, False),  # one run once spaces are deleted
        ("_ " * 60, True),  # underscore is a word character: the word "_"
        ("день " * 60, True),  # any script's letters form words
        # DESIGN: "x0" and "x1" are different words (this used to count the word "w" 60 times).
        (" ".join(f"w{i}" for i in range(60)), False),
        (" ".join(f"w{i}" for i in range(59)), False),
        ("", False),
    ],
)
def test_is_degenerate(text: str, expected: bool):
    assert is_degenerate(text) is expected


def test_is_degenerate_threshold_is_configurable():
    assert is_degenerate("a b a", threshold=2)
    assert not is_degenerate("a b a", threshold=3)
    with pytest.raises(ValueError, match="threshold"):
        is_degenerate("a", threshold=0)


def test_digit_runs_are_maximal():
    # "12", "34" and "1234" are different words, so 30 copies of each give no word 60 times.
    assert not is_degenerate("12 34 1234 " * 30)
    assert is_degenerate("12 34 1234 " * 60)


def _table(rows: int) -> str:
    header = "| name | size | note |\n|------|------|------|\n"
    return header + "".join(f"| a{i} | b{i} | c{i} |\n" for i in range(rows))


# 30 sentences, 60 times "的" and 0 spaces; the reference's single-character count flags it.
_CHINESE = "".join(f"第{i}个例子说明了我们的方法和它的结果。" for i in range(30))
# 6 sentences of 12 words, 71 spaces; single characters again would flag it.
_CYRILLIC = " ".join(
    f"Сегодня {day} мы снова обсуждали новые книги, старые фильмы и далёкие путешествия."
    for day in ("утром", "днём", "вечером", "ночью", "рано", "поздно")
)
# 60 distinct words with "!!!!\n" after each: no word repeats, the run "!!!!\n" occurs 60 times.
_SYMBOL_LOOP = "".join(f"{a}{b}!!!!\n" for a in "abcdefghij" for b in "klmnop")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # 20 rows of 3 cells: each cell word once; the runs start with the cell's digits ("0|",
        # "0|\n|"), so no run repeats (runs split at spaces would count "|" 80 times).
        (_table(20), False),
        (" ".join(f"x{i}" for i in range(60)), False),  # 60 different words
        ("the " * 60, True),
        (_CHINESE, False),
        (_CYRILLIC, False),
        (_SYMBOL_LOOP, True),
        # Spaces are deleted but newlines are not, so the whole text is ONE run of "!" and "\n",
        # found once: DESIGN's rule does not flag a loop made of symbols and whitespace only.
        ("!!!!\n" * 60, False),
    ],
)
def test_degenerate_tokens_follow_the_reference(text: str, expected: bool):
    """DESIGN section 5: words are lower-cased `\\w+` tokens in every script; symbol runs are the
    `[\\d\\W]+` runs of the text without its spaces. A markdown table, "x0 x1 ..." and long
    non-Latin prose are ordinary text."""
    assert is_degenerate(text) is expected


# ---------------------------------------------------------------------------- RSFT


def test_rsft_keeps_the_best_refinement_after_its_own_critique():
    tree = make_tree(
        0.0,
        [
            ("crit A", [("ref A0", 1.0), ("ref A1", 2.0)]),
            ("crit B", [("ref B0", 5.0), ("ref B1", None)]),
        ],
    )
    example = select_refinement_sft(tree, CFG, TEMPLATES)
    assert example is not None
    assert example.kind == "refinement"
    assert example.prompt_id == "p1"
    assert example.lineage == LINEAGE
    assert example.messages == [
        *tree.messages,
        JUDGE,
        assistant("crit B"),
        REFINE,
        assistant("ref B0"),
    ]


def test_rsft_defaults_to_bundled_templates():
    tree = make_tree(0.0, [("crit", [("better", 1.0)])])
    assert select_refinement_sft(tree, CFG) == select_refinement_sft(tree, CFG, TEMPLATES)


def test_rsft_uses_the_given_templates(tmp_path: Path):
    custom = tmp_path / "t"
    shutil.copytree(BUNDLED_TEMPLATE_DIR, custom)
    (custom / "judge.jinja").write_text("CUSTOM JUDGE")
    tree = make_tree(0.0, [("crit", [("better", 1.0)])])
    example = select_refinement_sft(tree, CFG, load_templates(custom))
    assert example.messages[-4] == user("CUSTOM JUDGE")


def test_rsft_tie_keeps_first_in_tree_order():
    tree = make_tree(
        0.0,
        [("crit A", [("A0", 1.0), ("A1", 3.0), ("A2", 3.0)]), ("crit B", [("B0", 3.0)])],
    )
    example = select_refinement_sft(tree, CFG, TEMPLATES)
    assert example.messages[-1] == assistant("A1")
    assert example.messages[-3] == assistant("crit A")


@pytest.mark.parametrize(
    ("answer_score", "critiques"),
    [
        (None, [("crit", [("ref", 1.0)])]),  # answer unscored
        (0.0, []),  # no critiques
        (0.0, [("crit", [])]),  # no refinements
        (0.0, [("crit", [("ref", None), ("ref2", None)])]),  # nothing scored
        (1.0, [("crit", [("ref", 1.0)])]),  # gain == 0
        (1.0, [("crit", [("ref", 0.5)]), ("crit2", [("ref2", -1.0)])]),  # gain < 0
        (math.nan, [("crit", [("ref", 1.0)])]),  # a failed answer score counts as none
    ],
)
def test_rsft_skips_trees_without_positive_gain(answer_score, critiques):
    assert select_refinement_sft(make_tree(answer_score, critiques), CFG, TEMPLATES) is None


def test_rsft_ignores_nan_refinement_scores():
    tree = make_tree(0.0, [("crit", [("nan", math.nan), ("good", 1.0)])])
    assert select_refinement_sft(tree, CFG, TEMPLATES).messages[-1] == assistant("good")


@pytest.mark.parametrize(
    ("answer_len", "best_len", "kept"),
    [
        (1000, 1399, True),  # extra 399 < 400, though ratio 1.399 >= 1.2
        (1000, 1400, False),  # extra 400 and ratio 1.4: both clauses fail
        (3000, 3400, True),  # extra 400, but ratio 1.133 < 1.2
        (2000, 2400, False),  # extra 400 and ratio exactly 1.2: both fail
        (2000, 2399, True),
        (100, 50, True),  # shorter is always fine
        (0, 399, True),  # empty answer: only the extra-chars clause can keep it
        (0, 400, False),
    ],
)
def test_rsft_length_guard(answer_len: int, best_len: int, kept: bool):
    tree = make_tree(0.0, [("crit", [("b" * best_len, 1.0)])], answer="a" * answer_len)
    assert (select_refinement_sft(tree, CFG, TEMPLATES) is not None) is kept


def test_rsft_length_guard_thresholds_come_from_config():
    tree = make_tree(0.0, [("crit", [("b" * 150, 1.0)])], answer="a" * 100)
    assert select_refinement_sft(tree, CFG, TEMPLATES) is not None
    strict = SelectionConfig(rsft_max_extra_chars=50, rsft_max_length_ratio=1.5)
    assert select_refinement_sft(tree, strict, TEMPLATES) is None
    ratio_ok = SelectionConfig(rsft_max_extra_chars=50, rsft_max_length_ratio=1.51)
    assert select_refinement_sft(tree, ratio_ok, TEMPLATES) is not None


def test_original_sft_example_copies_the_conversation():
    tree = make_tree(None, [])
    example = original_sft_example(tree)
    assert example.kind == "original"
    assert example.messages == tree.messages
    assert example.lineage == LINEAGE


# ---------------------------------------------------------------------------- DPO pairs


def full_tree(**overrides) -> RefinementTree:
    """A tree that yields all three pairs; overrides replace critique texts or refinements."""
    critiques = [
        ("good critique", [("great", 3.0), ("fine", 1.0)]),  # value 2
        ("poor critique", [("meh", 0.5), ("bad", -0.5)]),  # value 0
    ]
    return make_tree(overrides.get("answer_score", 0.0), overrides.get("critiques", critiques))


def kinds(pairs) -> list[str]:
    return [p.kind for p in pairs]


def test_all_three_pairs_in_order():
    tree = full_tree()
    generation, critique, refinement = build_preference_pairs(tree, CFG, TEMPLATES)

    assert generation.kind == "generation"
    assert generation.prompt == PROMPT
    assert generation.chosen == [assistant("great")]
    assert generation.rejected == [assistant("the answer")]
    assert (generation.chosen_score, generation.rejected_score) == (3.0, 0.0)

    assert critique.kind == "critique"
    assert critique.prompt == [*tree.messages, JUDGE]
    assert critique.chosen == [assistant("good critique")]
    assert critique.rejected == [assistant("poor critique")]
    assert (critique.chosen_score, critique.rejected_score) == (2.0, 0.0)

    assert refinement.kind == "refinement"
    assert refinement.prompt == [*tree.messages, JUDGE, assistant("good critique"), REFINE]
    assert refinement.chosen == [assistant("great")]
    assert refinement.rejected == [assistant("fine")]
    assert (refinement.chosen_score, refinement.rejected_score) == (3.0, 1.0)

    for pair in (generation, critique, refinement):
        assert pair.prompt_id == "p1"
        assert pair.lineage == LINEAGE


@pytest.mark.parametrize(
    ("answer_score", "answer", "critiques"),
    [
        (0.0, DEGENERATE, [("c", [("great", 3.0)]), ("d", [("x", 1.0)])]),  # answer degenerate
        (0.0, "ok", [("c", [("great", None)]), ("d", [])]),  # nothing scored
        (None, "ok", [("c", [("great", 3.0)]), ("d", [("x", 1.0)])]),  # answer unscored
        (3.0, "ok", [("c", [("great", 3.0)]), ("d", [("x", 1.0)])]),  # gain == 0
        (4.0, "ok", [("c", [("great", 3.0)]), ("d", [("x", 1.0)])]),  # gain < 0
        (0.0, "ok", [("c", [(DEGENERATE, 3.0)]), ("d", [("x", 1.0)])]),  # best degenerate
    ],
)
def test_no_pairs_on_early_exit(answer_score, answer, critiques):
    tree = make_tree(answer_score, critiques, answer=answer)
    assert build_preference_pairs(tree, CFG, TEMPLATES) == []


def test_generation_pair_picks_first_best_on_tie():
    tree = make_tree(0.0, [("c1", [("x", 1.0), ("first", 3.0)]), ("c2", [("second", 3.0)])])
    assert build_preference_pairs(tree, CFG, TEMPLATES)[0].chosen == [assistant("first")]


def test_only_generation_pair_with_a_single_critique():
    tree = make_tree(0.0, [("only", [("great", 3.0), ("fine", 1.0)])])
    assert kinds(build_preference_pairs(tree, CFG, TEMPLATES)) == ["generation"]


def test_only_generation_pair_when_critique_values_tie():
    tree = make_tree(0.0, [("c1", [("a", 3.0), ("b", 1.0)]), ("c2", [("c", 2.0), ("d", 2.0)])])
    assert kinds(build_preference_pairs(tree, CFG, TEMPLATES)) == ["generation"]


def test_only_generation_pair_when_best_critique_never_reaches_the_answer():
    # c1 has the higher mean (-0.1 vs -2.5) but its best refinement is below the answer's 0.0.
    tree = make_tree(
        0.0, [("c1", [("a", -0.1), ("b", -0.1)]), ("c2", [("top", 5.0), ("low", -10.0)])]
    )
    pairs = build_preference_pairs(tree, CFG, TEMPLATES)
    assert kinds(pairs) == ["generation"]
    assert pairs[0].chosen == [assistant("top")]


def test_best_critique_reaching_exactly_the_answer_score_is_enough():
    # hi under best_c == answer_score is not "< answer_score": the critique pair is built.
    tree = make_tree(
        1.0, [("c1", [("a", 1.0), ("b", 1.0)]), ("c2", [("top", 5.0), ("low", -10.0)])]
    )
    assert kinds(build_preference_pairs(tree, CFG, TEMPLATES)) == ["generation", "critique"]


def test_only_generation_pair_when_best_critique_is_degenerate():
    tree = full_tree(
        critiques=[(DEGENERATE, [("great", 3.0), ("fine", 1.0)]), ("poor", [("meh", 0.0)])]
    )
    assert kinds(build_preference_pairs(tree, CFG, TEMPLATES)) == ["generation"]


def test_degenerate_worst_critique_skips_only_the_critique_pair():
    tree = full_tree(
        critiques=[("good", [("great", 3.0), ("fine", 1.0)]), (DEGENERATE, [("meh", 0.0)])]
    )
    pairs = build_preference_pairs(tree, CFG, TEMPLATES)
    assert kinds(pairs) == ["generation", "refinement"]
    assert pairs[1].prompt[-2] == assistant("good")


def test_critiques_without_scored_refinements_take_no_part():
    tree = make_tree(
        0.0,
        [
            ("unscored", [("u", None)]),
            ("empty", []),
            ("good", [("great", 3.0), ("fine", 1.0)]),
            ("poor", [("meh", 0.5)]),
        ],
    )
    critique = build_preference_pairs(tree, CFG, TEMPLATES)[1]
    assert critique.chosen == [assistant("good")]
    assert critique.rejected == [assistant("poor")]


def test_critique_value_is_the_mean_of_scored_refinements():
    tree = make_tree(
        0.0,
        [
            ("good", [("a", 3.0), ("b", None), ("c", 1.0), ("d", 2.0)]),  # mean 2.0
            ("poor", [("e", 0.25), ("f", 0.75)]),  # mean 0.5
        ],
    )
    critique = build_preference_pairs(tree, CFG, TEMPLATES)[1]
    assert (critique.chosen_score, critique.rejected_score) == (2.0, 0.5)


def test_critique_ties_keep_the_first_critique():
    tree = make_tree(
        0.0,
        [
            ("best first", [("a", 3.0), ("b", 1.0)]),  # 2
            ("best second", [("c", 2.0)]),  # 2
            ("worst first", [("d", 0.0)]),  # 0
            ("worst second", [("e", -1.0), ("f", 1.0)]),  # 0
        ],
    )
    _, critique, refinement = build_preference_pairs(tree, CFG, TEMPLATES)
    assert critique.chosen == [assistant("best first")]
    assert critique.rejected == [assistant("worst first")]
    assert refinement.prompt[-2] == assistant("best first")


def test_refinement_pair_ties_keep_the_first_refinement():
    tree = make_tree(
        0.0,
        [
            ("good", [("hi1", 3.0), ("lo1", 1.0), ("hi2", 3.0), ("lo2", 1.0)]),
            ("poor", [("x", 0.0)]),
        ],
    )
    refinement = build_preference_pairs(tree, CFG, TEMPLATES)[2]
    assert refinement.chosen == [assistant("hi1")]
    assert refinement.rejected == [assistant("lo1")]


@pytest.mark.parametrize(
    ("good_refinements", "answer_score"),
    [
        ([("great", 3.0), ("unscored", None)], 0.0),  # fewer than 2 scored under best_c
        ([("same", 2.0), ("same too", 2.0)], 0.0),  # hi.score == lo.score
        ([("great", 3.0), ("at answer", 1.0)], 1.0),  # lo.score == answer_score
        ([("great", 3.0), (DEGENERATE, 1.0)], 0.0),  # lo degenerate
    ],
)
def test_refinement_pair_conditions(good_refinements, answer_score):
    tree = make_tree(answer_score, [("good", good_refinements), ("poor", [("meh", -5.0)])])
    assert kinds(build_preference_pairs(tree, CFG, TEMPLATES)) == ["generation", "critique"]


def test_no_refinement_pair_when_hi_is_degenerate():
    # The global best sits under the worse critique, so a degenerate hi under best_c
    # does not stop the generation pair.
    tree = make_tree(
        0.0,
        [("good", [(DEGENERATE, 2.0), ("fine", 1.0)]), ("poor", [("top", 10.0), ("x", -9.5)])],
    )
    pairs = build_preference_pairs(tree, CFG, TEMPLATES)
    assert kinds(pairs) == ["generation", "critique"]
    assert pairs[0].chosen == [assistant("top")]


def test_critiques_with_identical_text_are_one_critique():
    # Apart, the two "same" critiques would be best_c (3.0) and worst_c (-2.0): a critique pair
    # "same" vs "same". Pooled, "same" is worth 0.5 and loses to "other" (1.0).
    tree = make_tree(
        0.0,
        [("same", [("a", 3.0)]), ("other", [("b", 1.0)]), ("same", [("c", -2.0)])],
    )
    _, critique = build_preference_pairs(tree, CFG, TEMPLATES)
    assert critique.chosen == [assistant("other")]
    assert critique.rejected == [assistant("same")]
    assert (critique.chosen_score, critique.rejected_score) == (1.0, 0.5)

    # Pooled, the best critique has two refinements, so it also gets a refinement pair.
    tree = make_tree(
        0.0,
        [("same", [("a", 3.0)]), ("other", [("b", -1.0)]), ("same", [("c", 1.0)])],
    )
    *_, refinement = build_preference_pairs(tree, CFG, TEMPLATES)
    assert refinement.prompt[-2] == assistant("same")
    assert (refinement.chosen, refinement.rejected) == ([assistant("a")], [assistant("c")])


def test_no_pair_has_chosen_equal_to_rejected():
    # The best refinement repeats the answer, and the best critique's hi and lo are one text:
    # the generation and refinement pairs would prefer a text to itself, so only the critique
    # pair is left.
    tree = make_tree(
        0.0,
        [("good", [("the answer", 3.0), ("the answer", 1.0)]), ("poor", [("x", -1.0)])],
    )
    pairs = build_preference_pairs(tree, CFG, TEMPLATES)
    assert kinds(pairs) == ["critique"]
    assert pairs[0].chosen != pairs[0].rejected
    # The same response sampled twice and scored differently makes no length-controlled pair.
    sample = make_cot(0.0, [("same", "a", 2.0), ("same", "a", 1.0)])
    assert build_length_controlled_pair(sample, CFG) is None


def test_degenerate_threshold_comes_from_config():
    tree = make_tree(0.0, [("c", [("yes yes yes", 3.0)]), ("d", [("x", 1.0)])])
    assert build_preference_pairs(tree, CFG, TEMPLATES) != []
    strict = SelectionConfig(degenerate_repeat_threshold=3)
    assert build_preference_pairs(tree, strict, TEMPLATES) == []


# ---------------------------------------------------------------------------- Stage II


def test_pick_round_winner_returns_first_best_above_current():
    critiques = [
        make_critique("c0", [("a", 1.0), ("b", None)]),
        make_critique("c1", [("c", 2.0), ("d", 2.0)]),
        make_critique("c2", [("e", 2.0)]),
    ]
    assert pick_round_winner(critiques, 0.0) == (1, 0, 2.0)


@pytest.mark.parametrize("current", [2.0, 3.0])
def test_pick_round_winner_none_unless_strictly_better(current: float):
    critiques = [make_critique("c0", [("a", 2.0)])]
    assert pick_round_winner(critiques, current) is None


def test_pick_round_winner_none_without_scores():
    assert pick_round_winner([], 0.0) is None
    assert pick_round_winner([make_critique("c", [("a", None)])], 0.0) is None


def test_pick_round_winner_needs_a_current_score():
    with pytest.raises(ValueError, match="current_score"):
        pick_round_winner([make_critique("c", [("a", 1.0)])], None)


def make_round(answer: str, critiques: list[Critique], best: tuple[int, int] | None) -> Round:
    score = critiques[best[0]].refinements[best[1]].score if best else None
    return Round(answer=answer, critiques=critiques, best=best, best_score=score)


def make_search(rounds: list[Round], initial: str = "INITIAL") -> GreedySearch:
    return GreedySearch(
        prompt_id="p2",
        messages=[*PROMPT, assistant(initial)],
        initial_score=0.0,
        rounds=rounds,
        lineage=LINEAGE,
    )


def two_improving_rounds(final_text: str = "SECOND") -> list[Round]:
    return [
        make_round(
            "INITIAL",
            [
                make_critique("CRIT 0-0", [("r", 0.5)]),
                make_critique("CRIT 0-1", [("x", 0.1), ("FIRST", 1.0)]),
            ],
            (1, 1),
        ),
        make_round("FIRST", [make_critique("CRIT 1-0", [(final_text, 2.0)])], (0, 0)),
        make_round(
            final_text,
            [make_critique("CLOSING", [("worse", 1.0)]), make_critique("OTHER", [("w", 0.5)])],
            None,
        ),
    ]


def test_trajectory_layout():
    search = make_search(two_improving_rounds())
    example = assemble_trajectory(search, TEMPLATES, CFG)
    assert example.kind == "trajectory"
    assert example.prompt_id == "p2"
    assert example.lineage == LINEAGE
    assert example.messages[:-1] == PROMPT
    text = example.messages[-1].content
    assert example.messages[-1].role == "assistant"
    order = ["INITIAL", "CRIT 0-1", "FIRST", "CRIT 1-0", "SECOND", "CLOSING", FINAL_ANSWER_MARKER]
    positions = [text.index(part) for part in order]
    assert positions == sorted(positions)
    for absent in ("CRIT 0-0", "OTHER", "worse"):
        assert absent not in text
    assert extract_final_answer(text) == "SECOND"
    assert text.endswith(f"{FINAL_ANSWER_MARKER}\nSECOND")


def test_trajectory_final_answer_reads_back_exactly():
    final = "Line one.\n\n- item\n- item [[9]]"
    example = assemble_trajectory(make_search(two_improving_rounds(final)), TEMPLATES, CFG)
    assert extract_final_answer(example.messages[-1].content) == final


def test_trajectory_final_answer_is_stripped():
    search = make_search(two_improving_rounds("  padded \n"))
    example = assemble_trajectory(search, TEMPLATES, CFG)
    assert extract_final_answer(example.messages[-1].content) == "padded"


@pytest.mark.parametrize("final", ["   ", f"see {FINAL_ANSWER_MARKER} here"])
def test_trajectory_none_when_final_answer_cannot_be_read_back(final: str):
    assert assemble_trajectory(make_search(two_improving_rounds(final)), TEMPLATES, CFG) is None


def test_trajectory_none_without_rounds():
    assert assemble_trajectory(make_search([]), TEMPLATES, CFG) is None


def test_trajectory_none_when_no_round_improved():
    rounds = [make_round("INITIAL", [make_critique("c", [("r", -1.0)])], None)]
    assert assemble_trajectory(make_search(rounds), TEMPLATES, CFG) is None


def test_trajectory_none_when_last_round_improved():
    rounds = two_improving_rounds()[:2]
    assert assemble_trajectory(make_search(rounds), TEMPLATES, CFG) is None


def test_trajectory_none_when_closing_round_has_no_critique():
    rounds = [*two_improving_rounds()[:2], make_round("SECOND", [], None)]
    assert assemble_trajectory(make_search(rounds), TEMPLATES, CFG) is None


def test_trajectory_closing_critique_is_the_best_scoring_one():
    rounds = two_improving_rounds()
    closing = [
        make_critique("CLOSING 0", [("w0", 0.5), ("w1", None)]),
        make_critique("CLOSING 1", [("w2", math.nan), ("w3", 1.5)]),
        make_critique("CLOSING 2", [("w4", 1.5)]),  # ties with CLOSING 1: the first one stays
    ]
    rounds[-1] = make_round("SECOND", closing, None)
    text = assemble_trajectory(make_search(rounds), TEMPLATES, CFG).messages[-1].content
    assert "CLOSING 1" in text
    assert "CLOSING 0" not in text
    assert "CLOSING 2" not in text


@pytest.mark.parametrize(
    "closing",
    [
        [make_critique("c", [("w", None)]), make_critique("d", [("v", math.nan)])],
        [make_critique("c", [])],
    ],
)
def test_trajectory_none_when_closing_round_has_no_scored_refinement(closing: list[Critique]):
    rounds = [*two_improving_rounds()[:2], make_round("SECOND", closing, None)]
    assert assemble_trajectory(make_search(rounds), TEMPLATES, CFG) is None


def test_trajectory_none_when_initial_answer_is_degenerate():
    search = make_search(two_improving_rounds(), initial=DEGENERATE)
    assert assemble_trajectory(search, TEMPLATES, CFG) is None
    strict = SelectionConfig(degenerate_repeat_threshold=1)  # "INITIAL" once is already too much
    assert assemble_trajectory(make_search(two_improving_rounds()), TEMPLATES, strict) is None


def test_trajectory_rejects_a_best_index_outside_the_round():
    rounds = two_improving_rounds()
    rounds[0] = Round(answer="INITIAL", critiques=rounds[0].critiques, best=(1, 5), best_score=1)
    with pytest.raises(ValueError, match=r"p2.*round 0"):
        assemble_trajectory(make_search(rounds), TEMPLATES, CFG)


def test_trajectory_template_without_marker_is_an_error(tmp_path: Path):
    custom = tmp_path / "t"
    shutil.copytree(BUNDLED_TEMPLATE_DIR, custom)
    (custom / "trajectory.jinja").write_text("{{ initial_answer }} {{ final_answer }}")
    with pytest.raises(ValueError, match="trajectory.jinja"):
        assemble_trajectory(make_search(two_improving_rounds()), load_templates(custom), CFG)


def make_cot(reference: float | None, samples: list[tuple[str, str | None, float | None]]):
    return CoTSample(
        prompt_id="p3",
        prompt=PROMPT,
        reference_score=reference,
        samples=[CoTResponse(response=r, final_answer=f, score=s) for r, f, s in samples],
        lineage=LINEAGE,
    )


def test_length_controlled_pair():
    sample = make_cot(
        0.0,
        [("mid full", "mid", 1.0), ("best full", "short", 3.0), ("worst full", "longer", -1.0)],
    )
    pair = build_length_controlled_pair(sample, CFG)
    assert pair.kind == "trajectory"
    assert pair.prompt == PROMPT
    assert pair.chosen == [assistant("best full")]
    assert pair.rejected == [assistant("worst full")]
    assert (pair.chosen_score, pair.rejected_score) == (3.0, -1.0)
    assert pair.prompt_id == "p3"
    assert pair.lineage == LINEAGE


def test_length_controlled_pair_ignores_unparsed_and_unscored_samples():
    sample = make_cot(
        0.0,
        [
            ("no answer", None, 9.0),
            ("no score", "x", None),
            ("best", "a", 2.0),
            ("worst", "bb", 1.0),
        ],
    )
    pair = build_length_controlled_pair(sample, CFG)
    assert pair.chosen == [assistant("best")]
    assert pair.rejected == [assistant("worst")]


def test_length_controlled_pair_ties_keep_the_first():
    sample = make_cot(
        0.0,
        [("best1", "a", 2.0), ("worst1", "bb", 1.0), ("best2", "a", 2.0), ("worst2", "bb", 1.0)],
    )
    pair = build_length_controlled_pair(sample, CFG)
    assert pair.chosen == [assistant("best1")]
    assert pair.rejected == [assistant("worst1")]


def test_length_controlled_pair_equal_final_lengths_are_kept():
    sample = make_cot(0.0, [("best", "ab", 2.0), ("worst", "cd", 1.0)])
    assert build_length_controlled_pair(sample, CFG) is not None


@pytest.mark.parametrize(
    ("reference", "samples"),
    [
        (0.0, []),  # no samples
        (0.0, [("r", None, 1.0), ("s", "x", None)]),  # no candidate
        (None, [("best", "a", 2.0), ("worst", "bb", 1.0)]),  # no reference score
        (2.0, [("best", "a", 2.0), ("worst", "bb", 1.0)]),  # best == reference
        (3.0, [("best", "a", 2.0), ("worst", "bb", 1.0)]),  # best < reference
        (0.0, [("one", "a", 2.0)]),  # a single candidate is both best and worst
        (0.0, [("a", "a", 2.0), ("b", "bb", 2.0)]),  # all scores equal
        (0.0, [("best", "longer", 2.0), ("worst", "bb", 1.0)]),  # best's final answer longer
    ],
)
def test_length_controlled_pair_none(reference, samples):
    assert build_length_controlled_pair(make_cot(reference, samples), CFG) is None


@pytest.mark.parametrize(
    ("samples", "reference", "why"),
    [
        ([("a", None, 1.0)], 0.0, "no_scored_final_answer"),
        ([("a", "a", 1.0)], None, "reference_unscored"),
        ([("a", "a", 1.0), ("b", "b", 0.5)], 1.0, "not_above_reference"),
        ([("a", "a", 1.0), ("b", "b", 1.0)], 0.0, "no_score_spread"),
        ([("a", "long", 2.0), ("b", "s", 1.0)], 0.0, "chosen_longer"),
        ([("a", "s", 2.0), ("b", "long", 1.0)], 0.0, KEPT),
    ],
)
def test_length_controlled_outcome_names_the_rule_that_dropped_a_sample(samples, reference, why):
    pair, outcome = length_controlled_outcome(make_cot(reference, samples), CFG)
    assert outcome == why
    assert (pair is not None) == (why == KEPT)


def test_trajectory_outcome_names_the_rule_that_dropped_a_search():
    rounds = two_improving_rounds()
    assert trajectory_outcome(make_search([]), TEMPLATES, CFG) == (None, "no_rounds")
    assert trajectory_outcome(make_search(rounds[:2]), TEMPLATES, CFG)[1] == "last_round_improved"
    unscored_close = [*rounds[:2], make_round("SECOND", [make_critique("C", [("w", None)])], None)]
    assert trajectory_outcome(make_search(unscored_close), TEMPLATES, CFG)[1] == (
        "closing_round_unscored"
    )
    assert trajectory_outcome(make_search(rounds[2:]), TEMPLATES, CFG)[1] == "no_improving_round"
    degenerate = make_search(rounds, initial="the " * 60)
    assert trajectory_outcome(degenerate, TEMPLATES, CFG)[1] == "degenerate_initial_answer"
    example, outcome = trajectory_outcome(make_search(rounds), TEMPLATES, CFG)
    assert outcome == KEPT and example == assemble_trajectory(make_search(rounds), TEMPLATES, CFG)
