"""Dataset cards (avr_core.cards): README.md beside a sealed step's shards.

Fast: a step written through the real store gets a card whose YAML header makes
`datasets.load_dataset(step_dir)` load exactly its shards (not `_manifest.json`, `_plan.json`,
`_config.yaml` or other files), and whose body shows provenance, the reproduce command (its
`_config.yaml` validates back into the flow's parameters), lineage, counts and drop reasons,
length and token statistics, and the license; a card failure leaves the step sealed and the
store's checks undisturbed.

Slow (a Prefect API): the ingest-prompts flow writes the card through tasks/step_runner.py.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import datasets
import pytest
import yaml

import avr_core.cards
from avr_core.cards import (
    CARD_CONFIG_NAME,
    CARD_NAME,
    CardInfo,
    SealedBy,
    build_card_info,
    length_stats,
    lineage_values,
    prompt_license,
    render_dataset_card,
    token_stats,
    write_step_card,
)
from avr_core.layout import CHECKPOINTS, RunLayout, StepRef
from avr_core.reporting import COUNT_LABELS, ShardStats
from avr_core.results import StepResult
from avr_core.schemas import (
    Critique,
    Lineage,
    Message,
    PreferencePair,
    PromptRecord,
    Refinement,
    RefinementTree,
    Sampling,
)
from avr_core.steps import (
    ShardOutput,
    Source,
    StepPlan,
    plan_step,
    run_step,
    split_into_shards,
)
from avr_core.storage import DatasetStore
from flows.config_files import build_params, load_config
from flows.params import BuildPairsParams
from tests.fixtures_s3 import S3Location

RUN = "card-test"
PROMPTS = StepRef("inputs", "prompts")
PAIRS = StepRef("stage1", "pairs")
LINEAGE = Lineage(
    run=RUN,
    stage="stage1",
    step="pairs",
    generator="smollm2-135m-instruct",
    reward_model="rules",
    template_version="avr-v1",
    sampling=Sampling(temperature=0.7, top_p=0.8, max_tokens=96, seed=0),
)
CODE = {"git_commit": "abc123", "package_version": "0.1.0"}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`load_dataset` caches what it prepares: under the test's directory, not the home's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def store(tmp_path: Path) -> DatasetStore:
    return DatasetStore(f"file://{tmp_path}/store")


def _prompt(i: int) -> PromptRecord:
    return PromptRecord(
        prompt_id=f"p{i}",
        messages=[Message(role="user", content="q" * (i + 1))],
        source=f"bundled#{i}",
    )


def _pairs(index: int, inputs: tuple[list[Any], ...]) -> ShardOutput:
    """One pair per prompt but the first of each shard (dropped: no score spread)."""
    (prompts,) = inputs
    pairs = [
        PreferencePair(
            prompt_id=p.prompt_id,
            kind="refinement",
            prompt=p.messages,
            chosen=[Message(role="assistant", content="c" * 10)],
            rejected=[Message(role="assistant", content="r" * (4 + index))],
            chosen_score=1.0,
            rejected_score=0.0,
            lineage=LINEAGE,
        )
        for p in prompts[1:]
    ]
    counts = {
        "pairs": len(pairs),
        "dropped_no_score_spread": len(prompts) - len(pairs),
        "prompt_tokens": 10 * len(prompts),
        "completion_tokens": 7 * len(prompts),
    }
    return ShardOutput(pairs, ShardStats(counts=counts))


def _params(store: DatasetStore) -> BuildPairsParams:
    return BuildPairsParams(run_name=RUN, storage_root=store.root, source=PROMPTS, target=PAIRS)


def _sealed_pairs(store: DatasetStore, prompts: int = 6) -> tuple[StepPlan, StepResult]:
    """inputs/prompts (3 shards) and stage1/pairs from it, sealed through the step protocol."""
    shards = split_into_shards([_prompt(i) for i in range(prompts)], 2)
    inputs = plan_step(store, RUN, PROMPTS, PromptRecord, {"p": 1}, shard_count=len(shards))
    run_step(inputs, lambda index, _: ShardOutput(shards[index]))
    plan = plan_step(
        store, RUN, PAIRS, PreferencePair, {"rule": "spread"}, [Source(PROMPTS, PromptRecord)]
    )
    # What execute_plan writes first, so the step directory holds every file it has in a run.
    store.write_json(RunLayout(RUN).step_plan(PAIRS), {"shards": len(plan.indices)})
    return plan, run_step(plan, _pairs)


def _sealed_by(store: DatasetStore) -> SealedBy:
    return SealedBy("build-pairs", {"params": _params(store)}, CODE)


def _step_dir(store: DatasetStore, ref: StepRef) -> Path:
    return Path(store.files.path(RunLayout(RUN).step(ref)))


def _split_card(text: str) -> tuple[dict[str, Any], str]:
    assert text.startswith("---\n")
    header, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(header), body


# ---- the card of a sealed step -----------------------------------------------------------------


def test_the_card_loads_exactly_the_shards_with_datasets(store: DatasetStore) -> None:
    plan, result = _sealed_pairs(store)
    uri = write_step_card(plan, result, lambda: _sealed_by(store))
    step_dir = _step_dir(store, PAIRS)
    assert uri == store.uri(f"{RunLayout(RUN).step(PAIRS)}/{CARD_NAME}")
    # Files that are not data: a loader that took them as rows would fail or add rows.
    (step_dir / "notes.json").write_text('{"not": "data"}')
    names = sorted(p.name for p in step_dir.iterdir())
    assert {"_manifest.json", "_plan.json", CARD_CONFIG_NAME, CARD_NAME} <= set(names)

    header, _ = _split_card((step_dir / CARD_NAME).read_text())
    assert header["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "part-*.parquet"}]}
    ]
    assert header["license"] == "other" and header["pretty_name"] and "dpo" in header["tags"]

    loaded = datasets.load_dataset(str(step_dir))
    assert list(loaded) == ["train"]
    table = store.read_table(RUN, *PAIRS, PreferencePair)
    assert loaded["train"].num_rows == result.rows == table.num_rows == 3
    assert list(loaded["train"]["prompt_id"]) == table.column("prompt_id").to_pylist()
    assert loaded["train"][0]["chosen"] == [{"role": "assistant", "content": "c" * 10}]


def test_the_card_shows_provenance_counts_lineage_lengths_and_tokens(
    store: DatasetStore,
) -> None:
    plan, result = _sealed_pairs(store)
    write_step_card(plan, result, lambda: _sealed_by(store))
    _, body = _split_card((_step_dir(store, PAIRS) / CARD_NAME).read_text())
    manifest = store.read_manifest(RUN, *PAIRS)
    assert manifest is not None
    for shown in (
        manifest.fingerprint,
        manifest.content_digest,
        "`inputs/prompts`",  # built from
        "abc123",  # code version
        COUNT_LABELS["dropped_no_score_spread"] + " | 3 |",  # dropped, and why
        "Kept: **3** rows",
        "smollm2-135m-instruct",  # lineage: generator, reward model, template, sampling
        "| reward model | rules |",
        "avr-v1",
        "temperature=0.7 top_p=0.8 max_tokens=96 seed=0",
        "| chosen | 3 | 10 | 10 | 10 | 10 |",  # lengths: every chosen text has 10 characters
        "| rejected | 3 | 4 | 5 | 5 | 6 |",  # 4 + shard index characters
        # Token counters: total and per kept row.
        f"| {COUNT_LABELS.get('prompt_tokens', 'prompt tokens')} | 60 | 20.0 |",
        f"| {COUNT_LABELS.get('completion_tokens', 'completion tokens')} | 42 | 14.0 |",
    ):
        assert shown in body, shown


def test_the_reproduce_command_and_its_config_give_the_flow_its_parameters(
    store: DatasetStore,
) -> None:
    plan, result = _sealed_pairs(store)
    write_step_card(plan, result, lambda: _sealed_by(store))
    step_dir = _step_dir(store, PAIRS)
    body = (step_dir / CARD_NAME).read_text()
    command = f"avr run build-pairs --config {CARD_CONFIG_NAME} --set run_name={RUN}"
    assert f"{command} --set storage_root={store.root}\n" in body
    # What `avr run build-pairs --config _config.yaml` validates: the parameters it ran with.
    params = build_params(BuildPairsParams, load_config(step_dir / CARD_CONFIG_NAME))
    assert params == _params(store)


def test_without_a_flow_run_the_run_record_names_the_flow(store: DatasetStore) -> None:
    plan, result = _sealed_pairs(store)
    write_step_card(plan, result, lambda: _sealed_by(store))
    step_dir = _step_dir(store, PAIRS)
    # No flow run and no run record: no command, and the earlier config is not left behind.
    write_step_card(plan, result)
    body = (step_dir / CARD_NAME).read_text()
    assert "no `avr run` command can be given" in body and "_config.yaml" not in body
    assert not (step_dir / CARD_CONFIG_NAME).exists()

    config = _params(store).model_dump(mode="json")
    store.write_json(
        RunLayout(RUN).run_record, {"flow": "stage1", "config": config, "code_version": CODE}
    )
    write_step_card(plan, result)
    body = (step_dir / CARD_NAME).read_text()
    assert "avr run stage1 --config _config.yaml" in body and "run record" in body
    assert "abc123" in body


def test_the_card_leaves_the_store_as_it_was(store: DatasetStore) -> None:
    plan, result = _sealed_pairs(store)
    write_step_card(plan, result, lambda: _sealed_by(store))
    again = plan_step(
        store, RUN, PAIRS, PreferencePair, {"rule": "spread"}, [Source(PROMPTS, PromptRecord)]
    )
    assert again.pending == [], "every shard still counts as committed"
    (status,) = [s for s in store.list_steps(RUN) if s.step == "pairs"]
    assert status.status == "complete" and status.rows == 3 and status.shards == 3
    assert len(store.read_records(RUN, *PAIRS, PreferencePair)) == 3

    # Re-sealed (another attempt, nothing to compute): the card is written again.
    card = _step_dir(store, PAIRS) / CARD_NAME
    card.write_text("stale")
    resealed = run_step(again, _pairs)
    assert write_step_card(again, resealed, lambda: _sealed_by(store))
    assert card.read_text().startswith("---\nlicense:")


def test_the_card_is_written_on_s3(s3_location: S3Location) -> None:
    store = DatasetStore(s3_location.root, s3_location.storage_options)
    plan, result = _sealed_pairs(store)
    uri = write_step_card(plan, result, lambda: _sealed_by(store))
    assert uri == f"{plan.uri}/{CARD_NAME}"
    card = store.files.read_bytes(f"{RunLayout(RUN).step(PAIRS)}/{CARD_NAME}")
    assert card is not None
    header, body = _split_card(card.decode())
    assert f"--set storage_root={s3_location.root}" in body
    assert store.files.exists(f"{RunLayout(RUN).step(PAIRS)}/{CARD_CONFIG_NAME}")
    # The header's data files, globbed on the object store as a loader does: the shards only.
    # (`datasets` itself refuses s3:// under the tests' HF_HUB_OFFLINE=1.)
    (data_files,) = header["configs"][0]["data_files"]
    step_path = store.files.path(RunLayout(RUN).step(PAIRS))
    found = sorted(
        name.rsplit("/", 1)[1] for name in store.fs.glob(f"{step_path}/{data_files['path']}")
    )
    assert found == [f"part-{i:05d}.parquet" for i in range(3)]


def test_a_card_failure_leaves_the_step_sealed(
    store: DatasetStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    plan, result = _sealed_pairs(store)
    write_step_card(plan, result, lambda: _sealed_by(store))
    card = _step_dir(store, PAIRS) / CARD_NAME

    def broken(info: CardInfo) -> str:
        raise RuntimeError("no card today")

    monkeypatch.setattr(avr_core.cards, "render_dataset_card", broken)
    with caplog.at_level(logging.WARNING, logger="avr_core.cards"):
        assert write_step_card(plan, result, lambda: _sealed_by(store)) is None
    assert "dataset card not written: RuntimeError: no card today" in caplog.text
    assert not card.exists(), "an earlier card may describe other shards: removed"
    assert store.read_manifest(RUN, *PAIRS) is not None
    assert len(store.read_records(RUN, *PAIRS, PreferencePair)) == 3

    def no_flow_run() -> SealedBy:
        raise ConnectionError("Prefect API unreachable")

    assert write_step_card(plan, result, no_flow_run) is None
    assert store.read_manifest(RUN, *PAIRS) is not None


def test_a_slice_result_or_a_training_step_gets_no_card(store: DatasetStore) -> None:
    plan, result = _sealed_pairs(store)
    assert write_step_card(plan, result.model_copy(update={"sealed": False})) is None
    training = dataclasses.replace(plan, target=StepRef(CHECKPOINTS, "stage1_dpo"))
    assert write_step_card(training, result) is None
    assert not (_step_dir(store, PAIRS) / CARD_NAME).exists()


def test_a_prompts_step_card_names_its_sources_and_the_bundled_license(
    store: DatasetStore,
) -> None:
    shards = split_into_shards([_prompt(i) for i in range(3)], 2)
    plan = plan_step(store, RUN, PROMPTS, PromptRecord, {"p": 1}, shard_count=len(shards))
    result = run_step(
        plan,
        lambda index, _: ShardOutput(shards[index]),
        extra_counts={"prompts_in": 3, "rejected_rows": 1, "duplicates": 2},
    )
    ingest = {"params": {"run_name": RUN, "storage_root": store.root, "ingest": {}}}
    write_step_card(plan, result, lambda: SealedBy("ingest-prompts", ingest, CODE))
    header, body = _split_card((_step_dir(store, PROMPTS) / CARD_NAME).read_text())
    assert header["license"] == "other" and "synthetic" not in header["tags"]
    assert "bundled prompts `bundled:train`" in body
    assert "| prompt source | bundled |" in body
    assert "| rejected rows | 1 |" in body and "| duplicate prompts | 2 |" in body
    assert "| prompt | 3 | 1 | 2 | 2 | 3 |" in body
    assert "## Tokens" not in body, "no token counters, no token table"


# ---- pure parts ----------------------------------------------------------------------------------


def test_license_comes_from_the_prompt_source(monkeypatch: pytest.MonkeyPatch) -> None:
    assert prompt_license(None)[0] == "other"
    license_id, note, source = prompt_license({"prompts": None})
    assert (license_id, source) == ("other", "bundled:train") and "declares no license" in note
    license_id, note, _ = prompt_license({"prompts": "s3://b/p.jsonl"})
    assert license_id == "other" and "s3://b/p.jsonl" in note and note.startswith("unknown")
    assert prompt_license({"prompts": "p.jsonl", "license": "cc-by-4.0"})[0] == "cc-by-4.0"
    monkeypatch.setattr(avr_core.cards, "_package_license", lambda: "apache-2.0")
    assert prompt_license({"prompts": "bundled:heldout"})[0] == "apache-2.0"


def test_length_stats_measure_every_text_of_a_tree() -> None:
    tree = RefinementTree(
        prompt_id="p",
        messages=[Message(role="user", content="qq"), Message(role="assistant", content="aaaa")],
        critiques=[
            Critique(text="c", refinements=[Refinement(text="r" * 3), Refinement(text="r")]),
            Critique(text="ccc"),
        ],
    )
    stats = {s.field: s for s in length_stats([tree])}
    assert list(stats) == ["prompt", "answer", "critique", "refinement"]
    assert (stats["critique"].count, stats["critique"].min, stats["critique"].max) == (2, 1, 3)
    assert stats["refinement"].median == 2 and stats["answer"].mean == 4


def test_token_stats_come_from_the_records_token_counts() -> None:
    if "token_counts" not in RefinementTree.model_fields:
        pytest.skip("records do not carry token counts yet")
    tree = RefinementTree.model_validate(
        {
            "prompt_id": "p",
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "token_counts": [
                {"text": "messages[1].content", "prompt_tokens": 10, "completion_tokens": 3},
                {"text": "critiques[0].text", "prompt_tokens": 30, "completion_tokens": 5},
            ],
        }
    )
    stats = {s.field: s for s in token_stats([tree])}
    assert (stats["prompt_tokens"].min, stats["prompt_tokens"].max) == (10, 30)
    assert stats["completion_tokens"].mean == 4 and stats["completion_tokens"].count == 2
    assert token_stats([_prompt(0)]) == []


def test_lineage_lists_distinct_values_and_says_how_many_more() -> None:
    pairs = [
        PreferencePair(
            prompt_id="p",
            kind="generation",
            prompt=[Message(role="user", content="q")],
            chosen=[Message(role="assistant", content="a")],
            rejected=[Message(role="assistant", content="b")],
            chosen_score=1,
            rejected_score=0,
            lineage=Lineage(generator=f"model-{i % 12}", reward_model="rm"),
        )
        for i in range(30)
    ]
    lineage = lineage_values(pairs)
    assert lineage["reward model"] == ["rm"] and "template version" not in lineage
    assert lineage["generator"][:2] == ["model-0", "model-1"]
    assert lineage["generator"][-1] == "... and 2 more" and len(lineage["generator"]) == 11


def test_the_header_is_valid_yaml_whatever_the_names(store: DatasetStore) -> None:
    plan, result = _sealed_pairs(store)
    info = build_card_info(plan, result, _sealed_by(store)).model_copy(
        update={"license_note": "a: b # 'c' \"d\"", "run": "r: x"}
    )
    header, _ = _split_card(render_dataset_card(info))
    assert header["pretty_name"] == "avr-factory r: x: stage1/pairs"
    assert header["size_categories"] == ["n<1K"] and header["license_name"] == "unknown"


# ---- through the Prefect task ------------------------------------------------------------------


@pytest.mark.slow  # starts a Prefect API server
def test_the_ingest_flow_writes_the_card_and_a_card_failure_does_not_fail_it(
    prefect_harness: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from avr_core.config import IngestConfig
    from flows.params import IngestParams
    from flows.steps import ingest_prompts_flow

    params = IngestParams(
        run_name=RUN,
        storage_root=f"file://{tmp_path}/store",
        ingest=IngestConfig(max_prompts=10, shard_size=4),
    )
    store = DatasetStore(params.storage_root)
    card = _step_dir(store, PROMPTS) / CARD_NAME

    def broken(info: CardInfo) -> str:
        raise RuntimeError("no card today")

    with monkeypatch.context() as patch:
        patch.setattr(avr_core.cards, "render_dataset_card", broken)
        result = ingest_prompts_flow(params)
    assert result.sealed and result.rows == 10 and not card.exists()
    assert store.read_manifest(RUN, *PROMPTS) is not None

    # The same flow again: the step is re-sealed (nothing to compute) and gets its card.
    assert ingest_prompts_flow(params).rows == 10
    header, body = _split_card(card.read_text())
    assert header["configs"][0]["data_files"] == [{"split": "train", "path": "part-*.parquet"}]
    assert f"avr run ingest-prompts --config _config.yaml --set run_name={RUN}" in body
    assert "bundled prompts `bundled:train`" in body and "| prompts in | 10 |" in body
    reproduced = build_params(IngestParams, load_config(card.parent / CARD_CONFIG_NAME))
    assert reproduced == params
    loaded = datasets.load_dataset(str(card.parent))
    assert loaded["train"].num_rows == 10
