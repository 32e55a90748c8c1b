"""Tree synthesis: orchestration with scripted engines, and one run over the real tiny model."""

from __future__ import annotations

import math

import pytest

from avr_core.config import TreeConfig
from avr_core.schemas import (
    Constraint,
    Lineage,
    Message,
    PromptRecord,
    RefinementTree,
    Sampling,
    records_to_table,
    table_to_records,
)
from avr_core.synthesis import (
    SynthesisStats,
    derive_seed,
    generate_trees,
    score_gains,
    score_trees,
)
from avr_core.templates import load_templates
from tests.fakes import LengthReward, ScriptedGenerator

TEMPLATES = load_templates()
LINEAGE = Lineage(run="r", stage="stage1", step="trees")


def _prompts(n: int) -> list[PromptRecord]:
    return [
        PromptRecord(
            prompt_id=f"p{i}",
            messages=[Message(role="user", content=f"question {i}")],
            constraints=[Constraint(type="word_count", args={"min": 1, "max": 50})] if i else [],
        )
        for i in range(n)
    ]


def test_one_engine_call_per_level_with_derived_seeds():
    generator = ScriptedGenerator()
    sampling = Sampling(max_tokens=32, seed=11)
    trees, stats = generate_trees(
        generator, _prompts(3), TEMPLATES, TreeConfig(x=2, y=3, sampling=sampling), LINEAGE
    )

    assert [levels for levels, _ in generator.calls] == [
        ["answer"] * 3,
        ["critique"] * 3,
        ["refine"] * 6,  # one request per critique
    ]
    assert [s.n for _, s in generator.calls] == [1, 2, 3]
    seeds = [s.seed for _, s in generator.calls]
    assert len(set(seeds)) == 3 and 11 not in seeds
    assert seeds == [derive_seed(11, level) for level in ("answer", "critique", "refine")]
    assert all(s.max_tokens == 32 for _, s in generator.calls)

    assert [t.prompt_id for t in trees] == ["p0", "p1", "p2"]
    # Every character the engine returned, counted by hand from the scripted outputs.
    answers = 3 * len("answer to question 0")
    critiques = 6 * len("fine [[7]]")
    refinements = sum(
        len(f"refined question {q} via 'fine [[7]]' #{k}")
        for q in range(3)
        for _ in range(2)
        for k in range(3)
    )
    assert stats == SynthesisStats(
        trees=3,
        critiques=6,
        refinements=18,
        engine_calls=3,
        generated_chars=answers + critiques + refinements,
        generated_texts=3 + 6 + 18,
    )
    assert stats.generated_chars == generator.generated_chars
    tree = trees[1]
    assert tree.messages[-1] == Message(role="assistant", content="answer to question 1")
    assert tree.constraints == _prompts(3)[1].constraints
    assert [len(c.refinements) for c in tree.critiques] == [3, 3]
    assert tree.critiques[0].refinements[2].text == "refined question 1 via 'fine [[7]]' #2"
    assert tree.critiques[0].rating == 7
    assert tree.lineage.generator == "fake:scripted"
    assert tree.lineage.template_version == TEMPLATES.version
    assert tree.lineage.sampling == sampling
    # Trees survive the Arrow round trip unchanged.
    table = records_to_table(trees, RefinementTree)
    assert table_to_records(table, RefinementTree) == trees


def test_same_seed_reproduces_and_no_seed_stays_none():
    assert derive_seed(3, "answer") == derive_seed(3, "answer")
    assert derive_seed(3, "answer") != derive_seed(4, "answer")
    assert derive_seed(None, "answer") is None
    generator = ScriptedGenerator()
    generate_trees(
        generator,
        _prompts(1),
        TEMPLATES,
        TreeConfig(x=1, y=1, sampling=Sampling(seed=None)),
        LINEAGE,
    )
    assert [s.seed for _, s in generator.calls] == [None, None, None]


def test_free_text_critiques_are_kept_without_rating():
    generator = ScriptedGenerator(lambda q, attempt: "no rating here")
    trees, stats = generate_trees(
        generator, _prompts(2), TEMPLATES, TreeConfig(x=2, y=1, sampling=Sampling()), LINEAGE
    )
    assert stats.critiques == 4 and stats.format_retries == 0 and stats.dropped_critiques == 0
    assert all(c.rating is None and c.format_retries == 0 for t in trees for c in t.critiques)
    assert len(generator.calls) == 3


def test_unrated_critiques_are_resampled_in_batches_then_dropped():
    # question 0: rated on its 3rd critique attempt; question 1: never rated; question 2: always.
    def critique_text(question: str, attempt: int) -> str:
        if question == "question 0":
            return "ok [[4]]" if attempt >= 2 else "vague"
        if question == "question 1":
            return "never rated"
        return "good [[9]]"

    generator = ScriptedGenerator(critique_text)
    trees, stats = generate_trees(
        generator,
        _prompts(3),
        TEMPLATES,
        TreeConfig(x=2, y=1, sampling=Sampling(seed=5), require_rating=True, max_format_retries=3),
        LINEAGE,
    )
    levels = [levels for levels, _ in generator.calls]
    # Initial critiques (n=2 each) then one batched re-sample call per retry round over the gaps.
    assert levels[1] == ["critique"] * 3
    assert levels[2] == ["critique"] * 4  # q0 attempts 0,1 failed; q1 both failed
    assert levels[3] == ["critique"] * 2  # q0 got attempts 2 and 3 -> rated; q1 still failing
    assert levels[4] == ["critique"] * 2  # round 3 over q1's two slots
    assert levels[5] == ["refine"] * 4  # q0: 2 kept, q2: 2 kept
    retry_seeds = [s.seed for _, s in generator.calls[2:5]]
    assert len(set(retry_seeds)) == 3
    assert all(s.n == 1 for _, s in generator.calls[2:5])

    assert stats.format_retries == 4 + 2 + 2
    assert stats.dropped_critiques == 2
    assert stats.critiques == 4 and stats.refinements == 4
    by_id = {t.prompt_id: t for t in trees}
    assert [(c.rating, c.format_retries) for c in by_id["p0"].critiques] == [(4, 1), (4, 1)]
    assert by_id["p1"].critiques == []  # answer kept: it is still scored
    assert [(c.rating, c.format_retries) for c in by_id["p2"].critiques] == [(9, 0), (9, 0)]
    assert sum(c.format_retries for t in trees for c in t.critiques) + 2 * 3 == (
        stats.format_retries
    )


def test_zero_retries_drops_unrated_at_once():
    generator = ScriptedGenerator(lambda q, attempt: "unrated")
    trees, stats = generate_trees(
        generator,
        _prompts(2),
        TEMPLATES,
        TreeConfig(x=2, y=2, sampling=Sampling(), require_rating=True, max_format_retries=0),
        LINEAGE,
    )
    assert stats.dropped_critiques == 4 and stats.format_retries == 0
    assert all(t.critiques == [] for t in trees)
    # No refinement call is made for an empty level.
    assert len(generator.calls) == 2


def test_engine_returning_wrong_count_fails_clearly():
    class Short(ScriptedGenerator):
        def chat(self, conversations, sampling):
            return super().chat(conversations, sampling)[:-1]

    with pytest.raises(ValueError, match="returned 1 outputs for 2 conversations"):
        generate_trees(
            Short(), _prompts(2), TEMPLATES, TreeConfig(x=1, y=1, sampling=Sampling()), LINEAGE
        )


def test_prompt_must_end_with_user_turn():
    bad = PromptRecord(
        prompt_id="bad",
        messages=[Message(role="user", content="q"), Message(role="assistant", content="a")],
    )
    with pytest.raises(ValueError, match="prompt 0 \\(bad\\)"):
        generate_trees(
            ScriptedGenerator(),
            [bad],
            TEMPLATES,
            TreeConfig(x=1, y=1, sampling=Sampling()),
            LINEAGE,
        )


def test_score_trees_one_call_over_answers_and_refinements():
    trees, _ = generate_trees(
        ScriptedGenerator(),
        _prompts(2),
        TEMPLATES,
        TreeConfig(x=2, y=2, sampling=Sampling()),
        LINEAGE,
    )
    reward = LengthReward()
    scored = score_trees(reward, trees)

    assert len(reward.calls) == 1
    conversations, constraints = reward.calls[0]
    assert len(conversations) == 2 * (1 + 4)
    # Candidate conversations: prompt turns + the candidate, never the critique turns.
    assert conversations[0] == trees[0].messages
    assert conversations[1] == [
        *trees[0].messages[:-1],
        Message(role="assistant", content=trees[0].critiques[0].refinements[0].text),
    ]
    assert constraints[0] == [] and constraints[5] == trees[1].constraints

    for tree in scored:
        assert tree.answer_score == float(len(tree.answer))
        for critique in tree.critiques:
            assert all(r.score == float(len(r.text)) for r in critique.refinements)
        assert tree.lineage.reward_model == "fake:length"
    gains = score_gains(scored)
    assert len(gains) == 2 and all(g > 0 for g in gains)
    assert trees[0].answer_score is None  # inputs are not mutated


def test_score_trees_rejects_short_score_list_and_handles_empty():
    class Broken(LengthReward):
        def score(self, conversations, constraints=None):
            return [0.0]

    trees, _ = generate_trees(
        ScriptedGenerator(),
        _prompts(1),
        TEMPLATES,
        TreeConfig(x=1, y=1, sampling=Sampling()),
        LINEAGE,
    )
    with pytest.raises(ValueError, match="returned 1 scores for 2 conversations"):
        score_trees(Broken(), trees)
    assert score_trees(Broken(), []) == []


def test_score_gains_ignores_nan_and_unscored():
    tree = RefinementTree(
        prompt_id="p",
        messages=[Message(role="user", content="q"), Message(role="assistant", content="a")],
        answer_score=1.0,
        critiques=[{"text": "c", "refinements": [{"text": "r", "score": math.nan}]}],
    )
    assert score_gains([tree]) == []


@pytest.mark.slow
def test_tiny_transformers_generator_with_rules_reward(tiny_generator):
    from avr_core.config import ExecutionConfig, RulesModel
    from avr_core.engines import load_reward_model

    prompts = _prompts(2)
    sampling = Sampling(max_tokens=12, seed=0)
    trees, stats = generate_trees(
        tiny_generator,
        prompts,
        TEMPLATES,
        TreeConfig(x=2, y=2, sampling=sampling),
        LINEAGE,
    )
    assert stats.engine_calls == 3
    assert stats.critiques == 4 and stats.refinements == 8
    assert all(t.answer.strip() for t in trees)
    assert all(r.text for t in trees for c in t.critiques for r in c.refinements)

    reward = load_reward_model(RulesModel(), ExecutionConfig())
    scored = score_trees(reward, trees)
    scores = [t.answer_score for t in scored] + [
        r.score for t in scored for c in t.critiques for r in c.refinements
    ]
    assert all(isinstance(s, float) and not math.isnan(s) for s in scores)

    # Same base seed, same trees: runs reproduce.
    again, _ = generate_trees(
        tiny_generator,
        prompts,
        TEMPLATES,
        TreeConfig(x=2, y=2, sampling=sampling),
        LINEAGE,
    )
    assert [t.answer for t in again] == [t.answer for t in trees]
