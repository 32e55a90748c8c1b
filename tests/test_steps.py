"""The shard protocol without Prefect: plan, skip, fail one shard, run a subset, seal.

This is the factory's checkpointing contract (DESIGN section 2) driven directly, with scripted
shard computations over a file:// store, so the fast (`-m "not slow"`) loop checks it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Collection
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from avr_core.config import TreeConfig
from avr_core.reporting import ShardStats
from avr_core.schemas import Lineage, Message, PromptRecord, RefinementTree, SFTExample
from avr_core.steps import (
    ShardCompute,
    ShardEvent,
    ShardOutput,
    ShardsFailedError,
    Source,
    Stage1Steps,
    StepIncompleteError,
    StepIO,
    StepPlan,
    StepRef,
    UpstreamMissingError,
    plan_step,
    run_shards,
    run_step,
    seal_step,
    split_into_shards,
)
from avr_core.storage import DatasetStore
from avr_core.synthesis import generate_trees
from avr_core.templates import load_templates
from tests.fakes import EngineCall, RecordingGenerator

RUN = "steps-test"
PROMPTS = StepRef("inputs", "prompts")
ANSWERS = StepRef("test", "answers")
TARGET = StepRef("test", "sft")
CONFIG = {"step": "sft", "style": "echo"}


@pytest.fixture
def store(tmp_path: Path) -> DatasetStore:
    return DatasetStore(f"file://{tmp_path}/store")


def prompt(i: int) -> PromptRecord:
    return PromptRecord(prompt_id=f"p{i}", messages=[Message(role="user", content=f"q{i}")])


def write_prompts(
    store: DatasetStore, count: int = 5, shard_size: int = 2, config: dict | None = None
) -> list[list[PromptRecord]]:
    """An ingested prompts step (no sources): `count` prompts in shards of `shard_size`."""
    shards = split_into_shards([prompt(i) for i in range(count)], shard_size)
    plan = plan_step(
        store,
        RUN,
        PROMPTS,
        PromptRecord,
        config or {"step": "prompts"},
        shard_count=len(shards),
    )
    run_step(plan, lambda index, inputs: ShardOutput(shards[index]))
    return shards


def answer(p: PromptRecord) -> SFTExample:
    return SFTExample(
        prompt_id=p.prompt_id,
        messages=[*p.messages, Message(role="assistant", content=f"echo {p.messages[-1].content}")],
        kind="refinement",
        lineage=Lineage(run=RUN, stage=TARGET.stage, step=TARGET.step),
    )


class EchoCompute:
    """A scripted shard computation: SFT examples echoing each prompt; records what it got.

    Stats per shard: counts {"examples": rows, "shards": 1}, values {"gain": [index]}.
    Raises on the shard indices in `failing`.
    """

    def __init__(self, failing: Collection[int] = ()) -> None:
        self.failing = set(failing)
        self.calls: list[int] = []
        self.inputs: dict[int, tuple[list, ...]] = {}

    def __call__(self, index: int, inputs: tuple[list, ...]) -> ShardOutput:
        self.calls.append(index)
        self.inputs[index] = inputs
        if index in self.failing:
            raise RuntimeError(f"boom on shard {index}")
        (prompts,) = inputs
        return ShardOutput(
            [answer(p) for p in prompts],
            ShardStats(
                counts={"examples": len(prompts), "shards": 1}, values={"gain": [float(index)]}
            ),
        )


def plan_target(store: DatasetStore, config: dict | None = None) -> StepPlan:
    return plan_step(
        store, RUN, TARGET, SFTExample, config or CONFIG, [Source(PROMPTS, PromptRecord)]
    )


def shard_files(store: DatasetStore, ref: StepRef) -> dict[str, tuple[int, bytes]]:
    """mtime (ns) and bytes of every shard file of a step."""
    directory = Path(store.files.path(store.step_uri(RUN, *ref)))
    return {
        path.name: (path.stat().st_mtime_ns, path.read_bytes())
        for path in sorted(directory.glob("part-*.parquet"))
    }


# ---- plan ----------------------------------------------------------------------------------------


def test_plan_lists_every_shard_and_none_done_at_first(store: DatasetStore) -> None:
    write_prompts(store, count=5, shard_size=2)
    plan = plan_target(store)
    assert plan.indices == (0, 1, 2)
    assert plan.done == frozenset() and plan.pending == [0, 1, 2]
    assert len(plan.fingerprint) == 16 and int(plan.fingerprint, 16) >= 0
    assert plan.uri == f"{store.root}/runs/{RUN}/test/sft"
    assert store.read_manifest(RUN, *TARGET) is None
    assert shard_files(store, TARGET) == {}  # planning writes nothing


def test_a_source_without_manifest_names_the_step_to_run(store: DatasetStore) -> None:
    store.write_shard(RUN, *PROMPTS, 0, [prompt(0)], PromptRecord, "f" * 16)  # not sealed
    with pytest.raises(UpstreamMissingError, match=r"inputs/prompts.*first"):
        plan_target(store)


def test_a_step_without_sources_needs_shard_count(store: DatasetStore) -> None:
    with pytest.raises(ValueError, match="needs shard_count"):
        plan_step(store, RUN, PROMPTS, PromptRecord, {"step": "prompts"})
    plan = plan_step(store, RUN, PROMPTS, PromptRecord, {"step": "prompts"}, shard_count=3)
    assert plan.indices == (0, 1, 2) and plan.sources == ()
    calls: list[tuple[int, tuple]] = []

    def compute(index: int, inputs: tuple) -> ShardOutput:
        calls.append((index, inputs))
        return ShardOutput([prompt(index)])

    result = run_step(plan, compute)
    assert calls == [(0, ()), (1, ()), (2, ())]
    assert (result.rows, result.shards) == (3, 3)


# ---- run_step / skip -----------------------------------------------------------------------------


def test_run_step_commits_every_shard_and_seals(store: DatasetStore) -> None:
    prompt_shards = write_prompts(store, count=5, shard_size=2)
    compute = EchoCompute()
    events: list[ShardEvent] = []
    result = run_step(plan_target(store), compute, progress=events.append)

    assert compute.calls == [0, 1, 2]
    manifest = store.read_manifest(RUN, *TARGET)
    assert manifest is not None and manifest.fingerprint == result.fingerprint
    assert [s.index for s in manifest.shards] == [0, 1, 2]
    assert [s.rows for s in manifest.shards] == [2, 2, 1]
    assert manifest.total_rows == sum(s.rows for s in manifest.shards) == 5
    assert store.read_records(RUN, *TARGET, SFTExample) == [
        answer(p) for shard in prompt_shards for p in shard
    ]
    assert (result.stage, result.step, result.uri) == ("test", "sft", plan_target(store).uri)
    assert (result.rows, result.shards, result.shards_computed, result.shards_skipped) == (
        5,
        3,
        3,
        0,
    )
    assert result.counts == {"examples": 5, "shards": 3}
    assert (result.gain_mean, result.gain_median) == (1.0, 1.0)
    assert set(result.seconds) == {"compute"}
    assert [(e.index, e.position, e.total, e.rows, e.error) for e in events] == [
        (0, 1, 3, 2, None),
        (1, 2, 3, 2, None),
        (2, 3, 3, 1, None),
    ]


def test_extra_counts_are_added_to_the_summary(store: DatasetStore) -> None:
    write_prompts(store)
    result = run_step(plan_target(store), EchoCompute(), extra_counts={"prompts_read": 5})
    assert result.counts == {"examples": 5, "shards": 3, "prompts_read": 5}


def test_a_finished_step_is_skipped_whole(store: DatasetStore) -> None:
    write_prompts(store)
    first = run_step(plan_target(store), EchoCompute())
    before = shard_files(store, TARGET)

    plan = plan_target(store)
    assert plan.done == frozenset({0, 1, 2}) and plan.pending == []
    compute = EchoCompute()
    ran = run_shards(plan, compute)
    assert (ran.computed, ran.failed, compute.calls) == ([], {}, [])
    again = run_step(plan, compute)
    assert compute.calls == []
    assert (again.shards_computed, again.shards_skipped) == (0, 3)
    # The summary still covers every shard: its stats come from the committed footers.
    assert (again.rows, again.counts, again.fingerprint) == (5, first.counts, first.fingerprint)
    assert shard_files(store, TARGET) == before  # nothing rewritten


# ---- failures ------------------------------------------------------------------------------------


def test_one_failing_shard_fails_only_that_shard(store: DatasetStore) -> None:
    write_prompts(store, count=6, shard_size=2)
    plan = plan_target(store)
    events: list[ShardEvent] = []
    with pytest.raises(ShardsFailedError, match=r"1 of 3 shards failed") as err:
        run_step(plan, EchoCompute(failing={1}), progress=events.append)
    assert "shard 1: RuntimeError: boom on shard 1" in str(err.value)
    assert plan.uri in str(err.value)
    assert sorted(store.completed_shards(RUN, *TARGET, plan.fingerprint)) == [0, 2]
    assert store.read_manifest(RUN, *TARGET) is None
    assert [(e.index, e.error) for e in events] == [
        (0, None),
        (1, "RuntimeError: boom on shard 1"),
        (2, None),
    ]

    # A re-run computes the failed shard only, then seals.
    committed = shard_files(store, TARGET)
    replan = plan_target(store)
    assert replan.fingerprint == plan.fingerprint and replan.pending == [1]
    compute = EchoCompute()
    result = run_step(replan, compute)
    assert compute.calls == [1]
    assert (result.shards_computed, result.shards_skipped, result.rows) == (1, 2, 6)
    assert result.counts == {"examples": 6, "shards": 3}
    after = shard_files(store, TARGET)
    assert {name: after[name] for name in committed} == committed


def test_run_shards_reports_failures_instead_of_raising(store: DatasetStore) -> None:
    write_prompts(store, count=6, shard_size=2)
    ran = run_shards(plan_target(store), EchoCompute(failing={0, 2}))
    assert ran.computed == [1]
    assert ran.failed == {0: "RuntimeError: boom on shard 0", 2: "RuntimeError: boom on shard 2"}
    assert store.read_manifest(RUN, *TARGET) is None


def test_a_shard_that_cannot_be_committed_fails_only_that_shard(store: DatasetStore) -> None:
    write_prompts(store, count=6, shard_size=2)
    plan = plan_target(store)
    calls: list[int] = []

    def compute(index: int, inputs: tuple[list, ...]) -> ShardOutput:
        calls.append(index)
        (prompts,) = inputs
        if index == 1:
            return ShardOutput(prompts)  # PromptRecords for an SFTExample step
        return ShardOutput([answer(p) for p in prompts])

    ran = run_shards(plan, compute)
    assert calls == [0, 1, 2]
    assert ran.computed == [0, 2] and list(ran.failed) == [1]
    assert "expected SFTExample" in ran.failed[1]


def test_an_engine_failure_fails_only_the_shard_it_was_working_on(store: DatasetStore) -> None:
    write_prompts(store, count=6, shard_size=2)  # shards: q0 q1 | q2 q3 | q4 q5
    trees_step = StepRef("test", "trees")
    templates = load_templates()

    def trees_with(generator: RecordingGenerator) -> ShardCompute:
        def compute(index: int, inputs: tuple[list, ...]) -> ShardOutput:
            (prompts,) = inputs
            lineage = Lineage(run=RUN, stage=trees_step.stage, step=trees_step.step)
            built, stats = generate_trees(generator, prompts, templates, TreeConfig(), lineage)
            return ShardOutput(built, ShardStats(counts={"trees": stats.trees}))

        return compute

    def plan() -> StepPlan:
        sources = [Source(PROMPTS, PromptRecord)]
        return plan_step(store, RUN, trees_step, RefinementTree, {"step": "trees"}, sources)

    calls: list[EngineCall] = []
    first = RecordingGenerator({"q2"}, calls=calls, attempt=1)
    with pytest.raises(ShardsFailedError, match=r"shard 1: EngineError: injected failure"):
        run_step(plan(), trees_with(first))
    # Three levels (answer, critique, refine) per shard; shard 1 fails at its first call.
    assert [(c.attempt, sorted(c.prompts)) for c in calls] == [
        *[(1, ["q0", "q1"])] * 3,
        (1, ["q2", "q3"]),
        *[(1, ["q4", "q5"])] * 3,
    ]

    second = RecordingGenerator(calls=calls, attempt=2)
    result = run_step(plan(), trees_with(second))
    assert [sorted(c.prompts) for c in calls if c.attempt == 2] == [["q2", "q3"]] * 3
    assert second.prompts_seen == first.prompts_seen  # one shared call log
    assert (result.shards_computed, result.shards_skipped, result.rows) == (1, 2, 6)
    assert result.counts == {"trees": 6}


# ---- subsets, several workers, seal --------------------------------------------------------------


def test_a_subset_run_commits_exactly_those_and_does_not_seal(store: DatasetStore) -> None:
    write_prompts(store, count=8, shard_size=2)
    plan = plan_target(store)
    compute = EchoCompute()
    ran = run_shards(plan, compute, indices=[1, 3])
    assert ran.computed == [1, 3] and compute.calls == [1, 3]
    assert sorted(store.completed_shards(RUN, *TARGET, plan.fingerprint)) == [1, 3]
    assert store.read_manifest(RUN, *TARGET) is None

    with pytest.raises(ValueError, match=r"shards \[4, 7\] are not part of this step"):
        run_shards(plan, compute, indices=[0, 4, 7])
    assert compute.calls == [1, 3]  # checked before anything runs

    # A later worker handed shards some of which are done computes only the missing ones.
    later = EchoCompute()
    assert run_shards(plan_target(store), later, indices=[2, 3]).computed == [2]
    assert later.calls == [2]


def test_seal_waits_for_every_shard_and_merges_all_workers_stats(store: DatasetStore) -> None:
    write_prompts(store, count=7, shard_size=2)
    plan = plan_target(store)
    assert plan.indices == (0, 1, 2, 3)
    run_shards(plan, EchoCompute(), indices=[0, 2])  # worker A

    with pytest.raises(StepIncompleteError, match=r"shards \[1, 3\]"):
        seal_step(plan)
    assert store.read_manifest(RUN, *TARGET) is None

    # Worker B plans for itself, as another process would, and runs the rest.
    worker_b = plan_target(store)
    assert worker_b.fingerprint == plan.fingerprint and worker_b.pending == [1, 3]
    run_shards(worker_b, EchoCompute(), indices=[1, 3])
    result = seal_step(plan)
    assert (result.rows, result.shards) == (7, 4)
    assert result.counts == {"examples": 7, "shards": 4}  # summed over both workers' shards
    assert (result.gain_mean, result.gain_median) == (1.5, 1.5)  # values 0, 1, 2, 3
    manifest = store.read_manifest(RUN, *TARGET)
    assert manifest is not None and manifest.total_rows == 7
    assert [s.index for s in manifest.shards] == [0, 1, 2, 3]


# ---- what counts as done -------------------------------------------------------------------------


def test_a_torn_shard_is_never_done(store: DatasetStore) -> None:
    write_prompts(store, count=6, shard_size=2)
    run_step(plan_target(store), EchoCompute())
    path = Path(store.files.path(store.shard_uri(RUN, *TARGET, 1)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    plan = plan_target(store)
    assert plan.done == frozenset({0, 2}) and plan.pending == [1]
    with pytest.raises(StepIncompleteError, match=r"shards \[1\]"):
        seal_step(plan)
    compute = EchoCompute()
    result = run_step(plan, compute)
    assert compute.calls == [1]
    assert result.rows == 6
    assert path.read_bytes() != data[: len(data) // 2]
    assert len(store.read_records(RUN, *TARGET, SFTExample)) == 6


def test_a_shard_from_another_config_is_pending(store: DatasetStore) -> None:
    write_prompts(store, count=6, shard_size=2)
    stale = plan_target(store, {**CONFIG, "style": "old"})
    run_shards(stale, EchoCompute(), indices=[0])
    plan = plan_target(store)
    assert plan.fingerprint != stale.fingerprint
    assert plan.done == frozenset() and plan.pending == [0, 1, 2]
    run_shards(plan, EchoCompute(), indices=[1, 2])
    with pytest.raises(StepIncompleteError, match=r"shards \[0\]"):
        seal_step(plan)
    assert run_step(plan_target(store), EchoCompute()).shards_computed == 1
    assert store.completed_shards(RUN, *TARGET, stale.fingerprint) == {}


def test_fingerprint_follows_the_config_and_the_upstream(store: DatasetStore) -> None:
    write_prompts(store, config={"step": "prompts", "source": "a"})
    base = plan_target(store)
    assert plan_target(store).fingerprint == base.fingerprint
    assert plan_target(store, dict(reversed(CONFIG.items()))).fingerprint == base.fingerprint
    assert plan_target(store, {**CONFIG, "style": "shout"}).fingerprint != base.fingerprint
    run_step(base, EchoCompute())

    # The same prompts re-ingested under another config: the upstream manifest changed, so
    # every shard downstream is stale.
    write_prompts(store, config={"step": "prompts", "source": "b"})
    after = plan_target(store)
    assert after.fingerprint != base.fingerprint
    assert after.done == frozenset() and after.pending == [0, 1, 2]


def rewrite_keeping_footer(path: Path, keep_rows: slice) -> None:
    """Rewrite a shard as valid Parquet with the same footer metadata but other rows.

    What a hand edit (or a buggy tool) does: the fingerprint in the footer still matches.
    """
    table = pq.read_table(path)
    pq.write_table(table.slice(keep_rows.start, keep_rows.stop), path)
    rewritten = pq.read_table(path).replace_schema_metadata(table.schema.metadata)
    pq.write_table(rewritten, path)


def test_a_shard_changed_after_sealing_is_recomputed_not_resealed(store: DatasetStore) -> None:
    write_prompts(store, count=4, shard_size=2)
    run_step(plan_target(store), EchoCompute())
    path = Path(store.files.path(store.shard_uri(RUN, *TARGET, 0)))
    rewrite_keeping_footer(path, slice(0, 1))

    plan = plan_target(store)
    assert plan.done == frozenset({1}) and plan.pending == [0]
    compute = EchoCompute()
    result = run_step(plan, compute)
    assert compute.calls == [0]
    assert result.rows == 4
    assert len(store.read_records(RUN, *TARGET, SFTExample)) == 4


def test_a_changed_shard_of_an_unsealed_step_fails_its_content_digest(
    store: DatasetStore,
) -> None:
    write_prompts(store, count=4, shard_size=2)
    run_shards(plan_target(store), EchoCompute())  # committed, never sealed: no manifest
    rewrite_keeping_footer(Path(store.files.path(store.shard_uri(RUN, *TARGET, 1))), slice(1, 2))

    plan = plan_target(store)
    assert plan.pending == [1]
    with pytest.raises(StepIncompleteError, match=r"shards \[1\]"):
        seal_step(plan)
    assert run_step(plan, EchoCompute()).rows == 4


def test_a_recomputed_upstream_shard_re_derives_only_the_shards_that_read_it(
    store: DatasetStore,
) -> None:
    write_prompts(store, count=6, shard_size=2)
    run_step(plan_target(store), EchoCompute())

    # Upstream shard 1 is recomputed with other rows under the same config (a sampled step
    # re-run after a loss): its manifest now lists another sha256 for shard 1.
    prompts_shard = Path(store.files.path(store.shard_uri(RUN, *PROMPTS, 1)))
    prompts_shard.unlink()
    other = [prompt(10), prompt(11)]
    plan = plan_step(store, RUN, PROMPTS, PromptRecord, {"step": "prompts"}, shard_count=3)
    run_step(plan, lambda index, _: ShardOutput(other))

    downstream = plan_target(store)
    assert downstream.pending == [1]
    compute = EchoCompute()
    run_step(downstream, compute)
    assert compute.calls == [1]
    ids = [r.prompt_id for r in store.read_records(RUN, *TARGET, SFTExample)]
    assert ids == ["p0", "p1", "p10", "p11", "p4", "p5"]


def test_an_upstream_shard_recomputed_with_the_same_rows_re_derives_nothing(
    store: DatasetStore,
) -> None:
    shards = write_prompts(store, count=4, shard_size=2)
    run_step(plan_target(store), EchoCompute())
    Path(store.files.path(store.shard_uri(RUN, *PROMPTS, 0))).unlink()
    plan = plan_step(store, RUN, PROMPTS, PromptRecord, {"step": "prompts"}, shard_count=2)
    # Same rows, other statistics in the footer: other file bytes, same rows digest.
    run_step(plan, lambda index, _: ShardOutput(shards[index], ShardStats(counts={"x": 1})))
    assert plan_target(store).pending == []


def test_a_source_shard_changed_after_planning_fails_that_shard(store: DatasetStore) -> None:
    write_prompts(store, count=4, shard_size=2)
    plan = plan_target(store)
    rewrite_keeping_footer(Path(store.files.path(store.shard_uri(RUN, *PROMPTS, 0))), slice(0, 1))
    ran = run_shards(plan, EchoCompute())
    assert ran.computed == [1]
    assert "changed after the manifest was written" in ran.failed[0]


def test_an_unreadable_manifest_does_not_block_a_re_run(store: DatasetStore) -> None:
    write_prompts(store, count=4, shard_size=2)
    run_step(plan_target(store), EchoCompute())
    manifest = Path(store.files.path(store.step_uri(RUN, *TARGET))) / "_manifest.json"
    manifest.write_text("{ edited by hand")
    plan = plan_target(store)
    assert plan.pending == []  # every shard's own digest still checks out
    assert seal_step(plan).rows == 4


# ---- several sources -----------------------------------------------------------------------------


def test_sources_are_zipped_by_shard_index(store: DatasetStore) -> None:
    prompt_shards = write_prompts(store, count=5, shard_size=2)
    answers = plan_step(
        store, RUN, ANSWERS, SFTExample, {"step": "answers"}, [Source(PROMPTS, PromptRecord)]
    )
    run_step(answers, EchoCompute())

    received: dict[int, tuple[list, ...]] = {}

    def pair_up(index: int, inputs: tuple[list, ...]) -> ShardOutput:
        received[index] = inputs
        prompts, examples = inputs
        assert [p.prompt_id for p in prompts] == [e.prompt_id for e in examples]
        return ShardOutput(
            [e.model_copy(update={"kind": "original"}) for e in examples],
            ShardStats(counts={"pairs": len(prompts)}),
        )

    sources = [Source(PROMPTS, PromptRecord), Source(ANSWERS, SFTExample)]
    result = run_step(plan_step(store, RUN, TARGET, SFTExample, CONFIG, sources), pair_up)
    assert sorted(received) == [0, 1, 2]
    for index, (prompts, examples) in received.items():
        assert prompts == prompt_shards[index]
        assert examples == store.read_shard_records(RUN, *ANSWERS, index, SFTExample)
    assert (result.rows, result.counts) == (5, {"pairs": 5})

    # Which sources a step reads is part of its fingerprint.
    one_source = plan_step(store, RUN, TARGET, SFTExample, CONFIG, sources[:1])
    assert one_source.fingerprint != result.fingerprint


def test_sources_sharded_differently_fail_clearly(store: DatasetStore) -> None:
    write_prompts(store, count=6, shard_size=2)  # 3 shards
    other = split_into_shards([prompt(i) for i in range(6)], 3)  # 2 shards
    plan = plan_step(store, RUN, ANSWERS, PromptRecord, {"step": "other"}, shard_count=len(other))
    run_step(plan, lambda index, inputs: ShardOutput(other[index]))
    sources = [Source(PROMPTS, PromptRecord), Source(ANSWERS, PromptRecord)]
    with pytest.raises(ValueError, match=r"different shards \(3 vs 2\).*sharded alike"):
        plan_step(store, RUN, TARGET, SFTExample, CONFIG, sources)


# ---- helpers -------------------------------------------------------------------------------------


def test_split_into_shards_keeps_order() -> None:
    prompts = [prompt(i) for i in range(10)]
    shards = split_into_shards(prompts, 4)
    assert [len(s) for s in shards] == [4, 4, 2]
    assert [p for shard in shards for p in shard] == prompts
    assert split_into_shards(prompts, 10) == [prompts]
    assert split_into_shards(range(3), 1) == [[0], [1], [2]]
    assert split_into_shards([], 3) == []
    with pytest.raises(ValueError, match="shard_size"):
        split_into_shards(prompts, 0)


def test_step_io_names_its_one_source() -> None:
    io = StepIO(storage_root="file:///x", run=RUN, target=TARGET, sources=(PROMPTS,))
    assert io.source == PROMPTS
    for sources in [(), (PROMPTS, ANSWERS)]:
        with pytest.raises(ValueError, match=f"reads {len(sources)} sources"):
            _ = StepIO(storage_root="file:///x", run=RUN, target=TARGET, sources=sources).source


def test_stage1_step_names_are_distinct() -> None:
    refs = [value for name, value in vars(Stage1Steps).items() if name.isupper()]
    assert len(refs) == 9 and len(set(refs)) == len(refs)
    assert all(isinstance(ref, StepRef) for ref in refs)


def test_importing_steps_loads_neither_prefect_nor_vllm() -> None:
    code = (
        "import sys, avr_core.steps\n"
        "heavy = sorted(m for m in sys.modules if m.partition('.')[0] in ('prefect', 'vllm'))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
