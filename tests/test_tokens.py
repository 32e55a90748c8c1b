"""Token accounting: every generated text carries the engine's counts, summed per shard, step, run.

Scripted engines that report counts (`Counted`: words + 1 per text, words of the conversation per
prompt) check the plumbing of every step kind fast; the tiny model checks the transformers
backend's counts against a re-tokenisation of the stored texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from avr_core.config import LongResponseConfig, SearchConfig, TreeConfig
from avr_core.engines.base import Completion, Generator, messages_as_dicts, token_usage
from avr_core.engines.transformers_backend import TransformersGenerator, generated_lengths
from avr_core.layout import StepRef
from avr_core.recursive import greedy_search, sample_long_responses
from avr_core.schemas import (
    ArrowRecord,
    Conversation,
    Lineage,
    Message,
    PromptRecord,
    RefinementTree,
    Sampling,
    text_at,
)
from avr_core.step_kinds import tree_shards
from avr_core.steps import Source, plan_step, run_step
from avr_core.storage import DatasetStore, token_totals
from avr_core.synthesis import generate_trees, token_counts
from avr_core.templates import FINAL_ANSWER_MARKER, load_templates
from avr_core.testtime import own_starting_answers, refine_answers, think
from flows.inspect_runs import run_tokens
from tests.fakes import LengthReward, ScriptedGenerator

TEMPLATES = load_templates()
SAMPLING = Sampling(max_tokens=16, seed=3)


def _words(conversation: Conversation) -> int:
    return sum(len(message.content.split()) for message in conversation)


class Counted:
    """Wraps a scripted generator so it reports counts as a real engine does: the conversation's
    words as prompt tokens, a text's words plus one (the stop token) as its completion tokens."""

    def __init__(self, inner: Generator) -> None:
        self.inner = inner
        self.model_id = inner.model_id

    def chat(self, conversations: list[Conversation], sampling: Sampling) -> list[list[str]]:
        outputs = self.inner.chat(conversations, sampling)
        return [
            [Completion(text, _words(c), len(text.split()) + 1) for text in samples]
            for c, samples in zip(conversations, outputs, strict=True)
        ]

    def close(self) -> None:
        self.inner.close()


def _prompts(n: int) -> list[PromptRecord]:
    return [
        PromptRecord(
            prompt_id=f"p{i}", messages=[Message(role="user", content=f"question {i} please")]
        )
        for i in range(n)
    ]


def _check_counts_name_their_texts(records: Sequence[ArrowRecord]) -> int:
    """Every count names a text of its record whose words match; the records' completion sum."""
    total = 0
    for record in records:
        counts = record.token_counts  # type: ignore[attr-defined]
        assert counts, f"{record.prompt_id}: no token counts"  # type: ignore[attr-defined]
        assert len({c.text for c in counts}) == len(counts), "each text counted once"
        for count in counts:
            assert count.completion_tokens == len(text_at(record, count.text).split()) + 1
            total += count.completion_tokens
    return total


# ---- the pieces ----------------------------------------------------------------------------------


def test_completion_is_a_str_that_carries_its_counts_through_pickle() -> None:
    import pickle

    text = Completion("hello there", 7, 3)
    assert text == "hello there" and isinstance(text, str)
    assert token_usage(text) == (7, 3)
    assert token_usage(pickle.loads(pickle.dumps(text))) == (7, 3)
    assert token_usage(text.strip()) is None  # a transformed text is a plain str
    assert token_usage("scripted") is None


def test_generated_lengths_stop_at_the_first_stop_token() -> None:
    eos, pad = 2, 2  # SmolLM2 pads with its EOS: padding after the stop is not generated
    rows = [[5, 6, eos, pad, pad], [5, 6, 7, 8, 9], [eos, pad, pad, pad, pad]]
    assert generated_lengths(rows, frozenset({eos})) == [3, 5, 1]
    assert generated_lengths([[5, 1, 6, 3]], frozenset({1, 3})) == [2]


def test_text_at_resolves_paths_and_names_a_missing_one() -> None:
    tree = RefinementTree(
        prompt_id="p",
        messages=[Message(role="user", content="q"), Message(role="assistant", content="a")],
        critiques=[{"text": "c0", "refinements": [{"text": "r00"}, {"text": "r01"}]}],
    )
    assert text_at(tree, "messages[1].content") == "a"
    assert text_at(tree, "critiques[0].refinements[1].text") == "r01"
    with pytest.raises(KeyError, match="no text at 'critiques\\[1\\].text'"):
        text_at(tree, "critiques[1].text")
    with pytest.raises(KeyError, match="not a text"):
        text_at(tree, "critiques[0].refinements")


def test_token_counts_leave_out_texts_without_counts() -> None:
    counts = token_counts([("a", Completion("x y", 4, 3)), ("b", "plain"), ("c", None)])
    assert [(c.text, c.prompt_tokens, c.completion_tokens) for c in counts] == [("a", 4, 3)]


# ---- every step kind that generates --------------------------------------------------------------


def test_trees_count_every_text_and_the_stats_add_up() -> None:
    generator = Counted(ScriptedGenerator(templates=TEMPLATES))
    tree = TreeConfig(x=2, y=2, sampling=SAMPLING)
    trees, stats = generate_trees(generator, _prompts(3), TEMPLATES, tree, Lineage())
    assert all(len(t.token_counts) == 1 + 2 + 2 * 2 for t in trees)  # answer, 2 critiques, 4
    assert stats.format_retries == 0
    # No retries: what the records carry is everything generated.
    assert _check_counts_name_their_texts(trees) == stats.completion_tokens > 0
    # Prompt tokens count each conversation once per call (what an API bills): per tree, its
    # answer prompt, one critique prompt (the x critiques are samples of it), and one refine
    # prompt per critique (its y refinements are samples of it).
    by_path = [{c.text: c.prompt_tokens for c in t.token_counts} for t in trees]
    assert stats.prompt_tokens == sum(
        counts["messages[1].content"]
        + counts["critiques[0].text"]
        + sum(counts[f"critiques[{k}].refinements[0].text"] for k in range(2))
        for counts in by_path
    )


def test_retried_critiques_count_in_the_stats_not_in_the_records() -> None:
    # The first attempt of every critique has no rating: one re-sample each.
    generator = Counted(
        ScriptedGenerator(
            critique_text=lambda q, attempt: "no rating" if attempt == 0 else "ok [[6]]",
            templates=TEMPLATES,
        )
    )
    tree = TreeConfig(x=1, y=1, sampling=SAMPLING, require_rating=True, max_format_retries=2)
    trees, stats = generate_trees(generator, _prompts(2), TEMPLATES, tree, Lineage())
    assert stats.format_retries == 2
    kept = _check_counts_name_their_texts(trees)
    assert stats.completion_tokens == kept + 2 * (len(["no", "rating"]) + 1)


def test_search_long_responses_refine_and_think_count_their_texts() -> None:
    prompts = _prompts(2)
    reward = LengthReward()
    search = SearchConfig(x=2, y=1, max_rounds=2, sampling=SAMPLING)
    searches, search_stats = greedy_search(
        Counted(ScriptedGenerator(templates=TEMPLATES)),
        reward,
        prompts,
        TEMPLATES,
        search,
        Lineage(),
    )
    assert _check_counts_name_their_texts(searches) <= search_stats.completion_tokens
    assert any(c.text.startswith("rounds[1].critiques[1]") for c in searches[0].token_counts)

    final = f"thinking {FINAL_ANSWER_MARKER} done"
    answering = Counted(ScriptedGenerator(templates=TEMPLATES))
    answering.inner.chat = lambda conversations, sampling: [  # type: ignore[method-assign]
        [final] * sampling.n for _ in conversations
    ]
    long = LongResponseConfig(k=3, sampling=SAMPLING)
    samples, long_stats = sample_long_responses(answering, searches, long, Lineage())
    assert _check_counts_name_their_texts(samples) == long_stats.completion_tokens
    assert [c.text for c in samples[0].token_counts] == [f"samples[{k}].response" for k in range(3)]

    thoughts, think_stats = think(answering, prompts, SAMPLING, 2, Lineage())
    assert _check_counts_name_their_texts(thoughts) == think_stats.completion_tokens

    generator = Counted(ScriptedGenerator(templates=TEMPLATES))
    starts, start_stats = own_starting_answers(generator, prompts, SAMPLING, Lineage())
    refined, refine_stats = refine_answers(generator, starts, TEMPLATES, 2, SAMPLING)
    assert [c.text for c in refined[0].token_counts] == [
        "rounds[0].answer",
        "rounds[1].critique",
        "rounds[1].refinement",
        "rounds[2].critique",
        "rounds[2].refinement",
    ]
    assert _check_counts_name_their_texts(refined) == (
        start_stats.completion_tokens + refine_stats.completion_tokens
    )


def test_scripted_engines_without_counts_leave_records_uncounted() -> None:
    tree = TreeConfig(x=1, y=1, sampling=SAMPLING)
    trees, stats = generate_trees(
        ScriptedGenerator(templates=TEMPLATES), _prompts(1), TEMPLATES, tree, Lineage()
    )
    assert trees[0].token_counts == [] and stats.completion_tokens == stats.prompt_tokens == 0


# ---- stored: per shard, step and run -------------------------------------------------------------


def test_step_totals_reach_the_manifest_and_avr_runs(tmp_path: Path) -> None:
    store = DatasetStore(str(tmp_path))
    prompts_ref, trees_ref = StepRef("inputs", "prompts"), StepRef("stage1", "seed_trees")
    shards = [_prompts(4)[:2], _prompts(4)[2:]]
    for index, shard in enumerate(shards):
        store.write_shard("r", *prompts_ref, index, shard, PromptRecord, "fp")
    store.seal("r", prompts_ref, PromptRecord, "fp", [0, 1])
    plan = plan_step(
        store,
        "r",
        trees_ref,
        RefinementTree,
        {"step": "trees"},
        [Source(prompts_ref, PromptRecord)],
    )
    tree = TreeConfig(x=2, y=1, sampling=SAMPLING)
    compute = tree_shards(
        lambda: Counted(ScriptedGenerator(templates=TEMPLATES)), TEMPLATES, tree, Lineage()
    )
    result = run_step(plan, compute)

    records = store.read_records("r", *trees_ref, RefinementTree)
    stored = _check_counts_name_their_texts(records)  # the counts survive Parquet
    manifest = store.read_manifest("r", *trees_ref)
    assert manifest is not None
    shard_stats = [
        s.stats for s in store.committed_shards("r", *trees_ref, plan.fingerprint).values()
    ]
    assert manifest.tokens == token_totals(shard_stats)
    assert manifest.tokens["completion_tokens"] == stored == result.counts["completion_tokens"]
    steps = store.list_steps("r")
    assert run_tokens(steps) == manifest.tokens  # the prompts step generated nothing
    assert next(s for s in steps if s.step == "prompts").tokens == {}


def test_trees_stored_before_token_accounting_still_read(tmp_path: Path) -> None:
    tree = RefinementTree(
        prompt_id="old",
        messages=[Message(role="user", content="q"), Message(role="assistant", content="a")],
    )
    table = pa.Table.from_pylist([tree.to_row()], schema=RefinementTree.arrow_schema)
    old = table.drop_columns(["token_counts"])
    path = tmp_path / "old.parquet"
    pq.write_table(old, path)
    from avr_core.schemas import table_to_records

    (record,) = table_to_records(pq.read_table(path), RefinementTree)
    assert isinstance(record, RefinementTree) and record.token_counts == []


# ---- the real tiny model -------------------------------------------------------------------------


@pytest.mark.slow
def test_transformers_counts_match_a_retokenisation(tiny_generator: TransformersGenerator) -> None:
    conversations = [
        [Message(role="user", content="Name a colour.")],
        [
            Message(role="system", content="Be brief."),
            Message(role="user", content="Say hello in French and explain the word."),
        ],
    ]
    max_tokens = 48
    outputs = tiny_generator.chat(conversations, Sampling(n=2, max_tokens=max_tokens, seed=1))
    tokenizer = tiny_generator.tokenizer
    totals: list[tuple[int, int]] = []
    for conversation, samples in zip(conversations, outputs, strict=True):
        rendered = tokenizer.apply_chat_template(
            messages_as_dicts(conversation),
            tokenize=True,
            add_generation_prompt=True,
            return_dict=True,
        )["input_ids"]
        for text in samples:
            usage = token_usage(text)
            assert usage is not None
            prompt_tokens, completion_tokens = usage
            assert prompt_tokens == len(rendered)  # padding in the batch is not counted
            stopped = completion_tokens < max_tokens  # else it ran out of tokens, no stop token
            again = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + stopped
            # The engine trims the decoded text (whitespace tokens at its ends are counted, not
            # stored), and re-encoding may merge or split one token at a trimmed edge.
            assert -1 <= completion_tokens - again <= 3, (text, completion_tokens, again)
            totals.append((completion_tokens, again))
    generated, retokenised = (sum(column) for column in zip(*totals, strict=True))
    assert abs(generated - retokenised) <= 0.05 * generated


def test_training_records_its_steps_and_the_tokens_trl_counted() -> None:
    from avr_core.training import tokens_seen, trained_counts

    history = [{"loss": 1.2, "num_tokens": 561.0}, {"loss": 0.9, "num_tokens": 1122.0}, {"x": 1}]
    assert tokens_seen(history) == 1122
    assert tokens_seen([{"loss": 1.0}]) is None
    assert trained_counts({"global_step": 12, "tokens_seen": 1122}) == {
        "global_step": 12,
        "tokens_seen": 1122,
    }
    assert trained_counts(None) == {"global_step": None, "tokens_seen": None}
