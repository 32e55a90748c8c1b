"""DatasetStore on a local disk (file://) and on S3 (a moto server): shards, manifests, resume."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from avr_core.checkpoints import download_dir, model_revision, upload_dir
from avr_core.config import SelectionConfig
from avr_core.fingerprint import config_fingerprint
from avr_core.layout import RunLayout, StepRef
from avr_core.schemas import (
    Constraint,
    CoTResponse,
    CoTSample,
    Critique,
    GreedySearch,
    Lineage,
    Message,
    PreferencePair,
    PromptRecord,
    Refinement,
    RefinementTree,
    Round,
    Sampling,
    SchemaMismatchError,
    SFTExample,
)
from avr_core.storage import (
    DatasetStore,
    StepIncompleteError,
    StepStatus,
    StorageError,
    StorageUnreachableError,
)
from tests.fixtures_s3 import S3Location

RUN, STAGE, STEP = "run-1", "stage1", "trees"
FP = "a" * 16
OTHER_FP = "b" * 16


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> DatasetStore:
    """An empty store on each backend."""
    if request.param == "file":
        return DatasetStore((tmp_path / "store").as_uri())
    location: S3Location = request.getfixturevalue("s3_location")
    return DatasetStore(location.root, location.storage_options)


def user(text: str) -> Message:
    return Message(role="user", content=text)


def assistant(text: str) -> Message:
    return Message(role="assistant", content=text)


LINEAGE = Lineage(
    run=RUN, stage=STAGE, step=STEP, generator="gen", reward_model="rm", sampling=Sampling(n=2)
)


def make_tree(i: int) -> RefinementTree:
    return RefinementTree(
        prompt_id=f"p{i}",
        messages=[Message(role="system", content="be brief"), user(f"q{i}"), assistant(f"a{i}")],
        answer_score=None if i % 2 else 0.5 * i,
        critiques=[
            Critique(
                text=f"critique {i}",
                rating=None,
                refinements=[Refinement(text="r1", score=None), Refinement(text="r2", score=-1.25)],
            ),
            Critique(text="second", rating=7, refinements=[], format_retries=2),
        ],
        constraints=[Constraint(type="word_count", args={"min": 5, "max": 20})],
        lineage=LINEAGE,
    )


def make_records(record_type: type, count: int = 3) -> list:
    """`count` records of each type, with nested lists, Nones and constraints filled in."""
    builders = {
        PromptRecord: lambda i: PromptRecord(
            prompt_id=f"p{i}",
            messages=[user(f"question {i} ü")],
            constraints=[Constraint(type="keyword", args={"words": ["x", "y"], "n": i})],
            source="demo.jsonl",
        ),
        RefinementTree: make_tree,
        SFTExample: lambda i: SFTExample(
            prompt_id=f"p{i}", messages=[user("q"), assistant("a")], kind="refinement"
        ),
        PreferencePair: lambda i: PreferencePair(
            prompt_id=f"p{i}",
            kind="generation",
            prompt=[user(f"q{i}")],
            chosen=[assistant("good")],
            rejected=[assistant("bad")],
            chosen_score=1.5,
            rejected_score=-0.5,
            lineage=LINEAGE,
        ),
        GreedySearch: lambda i: GreedySearch(
            prompt_id=f"p{i}",
            messages=[user("q"), assistant("a0")],
            initial_score=0.1,
            rounds=[
                Round(
                    answer="a0",
                    critiques=[Critique(text="c", refinements=[Refinement(text="a1", score=0.3)])],
                    best=(0, 0),
                    best_score=0.3,
                ),
                Round(answer="a1", critiques=[], best=None, best_score=None),
            ],
        ),
        CoTSample: lambda i: CoTSample(
            prompt_id=f"p{i}",
            prompt=[user("q")],
            reference_score=None,
            samples=[
                CoTResponse(response="think... answer", final_answer="answer", score=0.2),
                CoTResponse(response="rambling", final_answer=None, score=None),
            ],
            constraints=[],
        ),
    }
    return [builders[record_type](i) for i in range(count)]


RECORD_TYPES = [PromptRecord, RefinementTree, SFTExample, PreferencePair, GreedySearch, CoTSample]


@pytest.mark.parametrize("record_type", RECORD_TYPES, ids=lambda t: t.__name__)
def test_every_record_type_round_trips(store: DatasetStore, record_type: type) -> None:
    records = make_records(record_type, 4)
    store.write_shard(RUN, STAGE, STEP, 0, records[:3], record_type, FP)
    store.write_shard(RUN, STAGE, STEP, 1, records[3:], record_type, FP)
    assert store.read_shard_records(RUN, STAGE, STEP, 0, record_type) == records[:3]
    assert store.read_records(RUN, STAGE, STEP, record_type) == records
    # The content digest written with the rows matches the rows read back from Parquet.
    assert sorted(store.completed_shards(RUN, STAGE, STEP, FP)) == [0, 1]
    store.write_manifest(RUN, STAGE, STEP, record_type, FP)
    assert store.read_records(RUN, STAGE, STEP, record_type.__name__) == records


def test_shard_uris_follow_the_layout(store: DatasetStore) -> None:
    info = store.write_shard(RUN, STAGE, STEP, 7, make_records(SFTExample, 1), SFTExample, FP)
    assert info.path == f"{store.root}/runs/{RUN}/{STAGE}/{STEP}/part-00007.parquet"
    assert store.fs.exists(store.fs._strip_protocol(info.path))
    assert store.checkpoint_uri(RUN, "sft") == f"{store.root}/runs/{RUN}/checkpoints/sft"
    with pytest.raises(ValueError, match="step"):
        store.step_uri(RUN, STAGE, "../escape")


def test_completed_shards_filter_by_fingerprint(store: DatasetStore) -> None:
    records = make_records(PromptRecord, 2)
    store.write_shard(RUN, STAGE, STEP, 0, records, PromptRecord, FP)
    store.write_shard(RUN, STAGE, STEP, 1, records[:1], PromptRecord, FP)
    store.write_shard(RUN, STAGE, STEP, 2, records, PromptRecord, OTHER_FP)
    done = store.completed_shards(RUN, STAGE, STEP, FP)
    assert sorted(done) == [0, 1]
    assert [done[0].rows, done[1].rows] == [2, 1]
    assert sorted(store.completed_shards(RUN, STAGE, STEP, OTHER_FP)) == [2]
    # Recomputing shard 1 under another config replaces it.
    store.write_shard(RUN, STAGE, STEP, 1, records, PromptRecord, OTHER_FP)
    assert sorted(store.completed_shards(RUN, STAGE, STEP, FP)) == [0]
    assert sorted(store.completed_shards(RUN, STAGE, STEP, OTHER_FP)) == [1, 2]
    assert store.completed_shards(RUN, STAGE, "never-written", FP) == {}


def test_manifest_lists_completed_shards_with_file_hashes(store: DatasetStore) -> None:
    trees = make_records(RefinementTree, 5)
    # Written out of order: reading still follows shard order.
    store.write_shard(RUN, STAGE, STEP, 1, trees[3:], RefinementTree, FP)
    store.write_shard(RUN, STAGE, STEP, 0, trees[:3], RefinementTree, FP)
    store.write_shard(RUN, STAGE, STEP, 2, trees[:1], RefinementTree, OTHER_FP)
    assert store.read_manifest(RUN, STAGE, STEP) is None

    manifest = store.write_manifest(RUN, STAGE, STEP, RefinementTree, FP, expected_shards=2)
    assert [s.index for s in manifest.shards] == [0, 1]
    assert manifest.total_rows == 5
    assert manifest.fingerprint == FP and manifest.record_type == "RefinementTree"
    for shard in manifest.shards:
        data = store.fs.cat_file(store.fs._strip_protocol(shard.path))
        assert shard.sha256 == hashlib.sha256(data).hexdigest()
    assert store.read_manifest(RUN, STAGE, STEP) == manifest
    assert store.read_records(RUN, STAGE, STEP, RefinementTree) == trees

    # A manifest from another config is refused when the caller names its fingerprint.
    with pytest.raises(StorageError, match="fingerprint"):
        store.read_table(RUN, STAGE, STEP, RefinementTree, fingerprint=OTHER_FP)
    with pytest.raises(StepIncompleteError, match=r"shards \[2, 3\]"):
        store.write_manifest(RUN, STAGE, STEP, RefinementTree, FP, expected_shards=4)


def test_writing_a_shard_reopens_a_sealed_step(store: DatasetStore) -> None:
    trees = make_records(RefinementTree, 2)
    store.write_shard(RUN, STAGE, STEP, 0, trees, RefinementTree, FP)
    store.write_manifest(RUN, STAGE, STEP, RefinementTree, FP)
    store.write_shard(RUN, STAGE, STEP, 0, trees[:1], RefinementTree, FP)
    assert store.read_manifest(RUN, STAGE, STEP) is None
    assert store.read_records(RUN, STAGE, STEP, RefinementTree) == trees[:1]


def test_a_shard_changed_behind_the_manifest_is_detected(store: DatasetStore) -> None:
    pairs = make_records(PreferencePair, 2)
    info = store.write_shard(RUN, STAGE, STEP, 0, pairs, PreferencePair, FP)
    store.write_manifest(RUN, STAGE, STEP, PreferencePair, FP)
    other = io.BytesIO()
    pq.write_table(pa.table({"x": [1]}), other)
    store.fs.pipe_file(store.fs._strip_protocol(info.path), other.getvalue())
    with pytest.raises(StorageError, match="changed after the manifest"):
        store.read_table(RUN, STAGE, STEP, PreferencePair)


def test_read_dataset_gives_trl_conversational_rows(store: DatasetStore) -> None:
    pairs = make_records(PreferencePair, 3)
    store.write_shard(RUN, STAGE, "dpo", 0, pairs[:2], PreferencePair, FP)
    store.write_shard(RUN, STAGE, "dpo", 1, pairs[2:], PreferencePair, FP)
    store.write_manifest(RUN, STAGE, "dpo", PreferencePair, FP)
    dataset = store.read_dataset(RUN, STAGE, "dpo", PreferencePair)
    assert dataset.num_rows == 3
    assert dataset["prompt_id"] == ["p0", "p1", "p2"]
    assert dataset[1]["prompt"] == [{"role": "user", "content": "q1"}]
    assert dataset[1]["chosen"] == [{"role": "assistant", "content": "good"}]
    assert dataset[0]["lineage"]["sampling"]["n"] == 2


def test_empty_step_reads_as_empty_table(store: DatasetStore) -> None:
    table = store.read_table(RUN, STAGE, "nothing-yet", SFTExample)
    assert table.num_rows == 0
    assert table.schema.equals(SFTExample.arrow_schema)


def test_a_crash_during_write_leaves_no_complete_shard(
    store: DatasetStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = make_records(PromptRecord, 2)
    store.write_shard(RUN, STAGE, STEP, 0, prompts, PromptRecord, FP)
    step_path = store.fs._strip_protocol(store.step_uri(RUN, STAGE, STEP))

    class Crash(RuntimeError):
        pass

    if isinstance(store.fs, LocalFileSystem):
        # Die when the temporary file holds half the bytes, before the rename.
        def write_half_then_crash(path_from: str, path_to: str) -> None:
            Path(path_from).write_bytes(Path(path_from).read_bytes()[:100])
            raise Crash("killed mid-write")

        monkeypatch.setattr(os, "replace", write_half_then_crash)
    else:

        def crash_put(path: str, data: bytes, **kwargs: object) -> None:
            raise Crash("connection dropped during PUT")

        monkeypatch.setattr(store.fs, "pipe_file", crash_put)
    with pytest.raises(Crash):
        store.write_shard(RUN, STAGE, STEP, 1, prompts, PromptRecord, FP)
    monkeypatch.undo()

    assert sorted(store.completed_shards(RUN, STAGE, STEP, FP)) == [0]
    names = [os.path.basename(p) for p in store.fs.ls(step_path, detail=False)]
    assert "part-00001.parquet" not in names
    assert store.read_records(RUN, STAGE, STEP, PromptRecord) == prompts


def test_a_truncated_shard_file_is_not_complete(store: DatasetStore) -> None:
    prompts = make_records(PromptRecord, 3)
    good = store.write_shard(RUN, STAGE, STEP, 0, prompts, PromptRecord, FP)
    data = store.fs.cat_file(store.fs._strip_protocol(good.path))
    truncated_uri = store.shard_uri(RUN, STAGE, STEP, 1)
    store.fs.pipe_file(store.fs._strip_protocol(truncated_uri), data[: len(data) - 20])
    # A stray hidden temp file (a killed local writer) is not a shard either.
    step = store.fs._strip_protocol(store.step_uri(RUN, STAGE, STEP))
    store.fs.pipe_file(f"{step}/.part-00002.parquet.tmp-dead", data)

    assert sorted(store.completed_shards(RUN, STAGE, STEP, FP)) == [0]
    manifest = store.write_manifest(RUN, STAGE, STEP, PromptRecord, FP)
    assert [s.index for s in manifest.shards] == [0]
    assert store.read_records(RUN, STAGE, STEP, PromptRecord) == prompts
    with pytest.raises(StorageError, match="part-00001"):
        store.read_shard_records(RUN, STAGE, STEP, 1, PromptRecord)


def test_schema_mismatch_names_the_step_and_field(store: DatasetStore) -> None:
    bad = RefinementTree.arrow_schema.set(
        RefinementTree.arrow_schema.get_field_index("answer_score"),
        pa.field("answer_score", pa.string()),
    )
    table = pa.Table.from_pylist(
        [{"prompt_id": "p", "messages": [], "answer_score": "high", "critiques": []}], schema=bad
    ).replace_schema_metadata({b"avr.fingerprint": FP.encode(), b"avr.rows": b"1"})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    store.fs.makedirs(store.fs._strip_protocol(store.step_uri(RUN, STAGE, STEP)), exist_ok=True)
    store.fs.pipe_file(
        store.fs._strip_protocol(store.shard_uri(RUN, STAGE, STEP, 0)), sink.getvalue()
    )
    with pytest.raises(SchemaMismatchError, match=r"answer_score.*string") as err:
        store.read_table(RUN, STAGE, STEP, RefinementTree)
    assert f"{RUN}/{STAGE}/{STEP}" in str(err.value)


def test_reading_a_step_as_another_record_type_fails(store: DatasetStore) -> None:
    store.write_shard(RUN, STAGE, STEP, 0, make_records(SFTExample, 1), SFTExample, FP)
    with pytest.raises(SchemaMismatchError, match="kind|prompt"):
        store.read_table(RUN, STAGE, STEP, PreferencePair)
    with pytest.raises(SchemaMismatchError, match="SFTExample"):
        store.write_manifest(RUN, STAGE, STEP, PreferencePair, FP)
    store.write_manifest(RUN, STAGE, STEP, SFTExample, FP)
    with pytest.raises(SchemaMismatchError, match="holds SFTExample"):
        store.read_table(RUN, STAGE, STEP, PreferencePair)


def test_mixed_fingerprints_without_manifest_need_a_fingerprint(store: DatasetStore) -> None:
    prompts = make_records(PromptRecord, 2)
    store.write_shard(RUN, STAGE, STEP, 0, prompts[:1], PromptRecord, FP)
    store.write_shard(RUN, STAGE, STEP, 1, prompts[1:], PromptRecord, OTHER_FP)
    with pytest.raises(StorageError, match="mixed fingerprints"):
        store.read_table(RUN, STAGE, STEP, PromptRecord)
    assert store.read_records(RUN, STAGE, STEP, PromptRecord, fingerprint=OTHER_FP) == prompts[1:]


def test_json_files_and_runs(store: DatasetStore) -> None:
    assert store.list_runs() == []
    assert store.read_json("runs/r1/run.json") is None
    store.write_json("runs/r1/run.json", {"selection": SelectionConfig(), "b": [1, 2]})
    store.write_json("runs/r0/run.json", SelectionConfig(rsft_include_original=True))
    loaded = store.read_json("runs/r1/run.json")
    assert loaded["selection"]["degenerate_repeat_threshold"] == 60
    assert loaded["b"] == [1, 2]
    assert store.read_json(f"{store.root}/runs/r0/run.json")["rsft_include_original"] is True
    store.write_shard("r2", STAGE, STEP, 0, make_records(SFTExample, 1), SFTExample, FP)
    assert store.list_runs() == ["r0", "r1", "r2"]


def test_checkpoint_directory_round_trip(store: DatasetStore, tmp_path: Path) -> None:
    local = tmp_path / "checkpoint-4"
    (local / "sub").mkdir(parents=True)
    (local / "model.safetensors").write_bytes(os.urandom(3000))
    (local / "trainer_state.json").write_text('{"global_step": 4}')
    (local / "sub" / "optimizer.pt").write_bytes(b"\x00" * 100)
    uri = store.checkpoint_uri(RUN, "sft") + "/checkpoint-4"

    assert upload_dir(store.files, local, uri) == 3
    assert upload_dir(store.files, local, uri) == 0  # unchanged files are not sent again
    (local / "trainer_state.json").write_text('{"global_step": 5}')
    assert upload_dir(store.files, local, uri) == 1

    restored = download_dir(store.files, uri, tmp_path / "restored")
    for name in ["model.safetensors", "trainer_state.json", "sub/optimizer.pt"]:
        assert (restored / name).read_bytes() == (local / name).read_bytes()

    # A file changed on storage after its upload is refused, not copied.
    store.files.write_bytes(f"{store.files.relative(uri)}/sub/optimizer.pt", b"tampered")
    with pytest.raises(StorageError, match="changed since it was uploaded"):
        download_dir(store.files, uri, tmp_path / "again")


def test_an_interrupted_upload_is_not_downloadable(
    store: DatasetStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = tmp_path / "ckpt"
    local.mkdir()
    for i in range(3):
        (local / f"f{i}.bin").write_bytes(bytes([i]) * 10)
    uri = store.checkpoint_uri(RUN, "dpo")
    upload_dir(store.files, local, uri)
    (local / "f2.bin").write_bytes(b"new contents")
    sent: list[str] = []
    real_put = store.files.put_file

    def put_then_die(local_file: Path, where: str) -> None:
        if sent:
            raise ConnectionError("killed during upload")
        sent.append(where)
        real_put(local_file, where)

    monkeypatch.setattr(store.files, "put_file", put_then_die)
    (local / "f1.bin").write_bytes(b"also new")
    with pytest.raises(ConnectionError):
        upload_dir(store.files, local, uri)
    monkeypatch.undo()
    assert len(sent) == 1  # one changed file went up before the "crash"
    with pytest.raises(FileNotFoundError, match="no completed upload"):
        download_dir(store.files, uri, tmp_path / "out")


def test_check_reachable_accepts_a_usable_root(store: DatasetStore) -> None:
    store.check_reachable()
    assert store.list_runs() == []  # the probe leaves nothing behind


def test_unreachable_roots_fail_clearly(tmp_path: Path, s3_location: S3Location) -> None:
    missing_bucket = DatasetStore("s3://no-such-bucket-avr/x", s3_location.storage_options)
    with pytest.raises(StorageUnreachableError, match="no-such-bucket-avr"):
        missing_bucket.check_reachable()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageUnreachableError, match="a-file"):
        DatasetStore(str(blocker / "store")).check_reachable()


def test_plain_local_paths_are_local_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = DatasetStore("relative-store")
    assert store.root == str(tmp_path / "relative-store")
    store.write_shard(RUN, STAGE, STEP, 0, make_records(SFTExample, 2), SFTExample, FP)
    assert (tmp_path / "relative-store/runs/run-1/stage1/trees/part-00000.parquet").is_file()
    assert len(store.read_records(RUN, STAGE, STEP, SFTExample)) == 2


def test_config_fingerprint_is_stable_and_sensitive() -> None:
    base = SelectionConfig()
    assert config_fingerprint(base) == config_fingerprint(base.model_dump(mode="json"))
    assert config_fingerprint({"a": 1, "b": {"c": 2, "d": 3}}) == config_fingerprint(
        {"b": {"d": 3, "c": 2}, "a": 1}
    )
    changed = SelectionConfig(rsft_max_extra_chars=300)
    assert config_fingerprint(changed) != config_fingerprint(base)
    fingerprint = config_fingerprint({"model": base, "path": Path("/x")})
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    with pytest.raises(TypeError, match="object"):
        config_fingerprint({"x": object()})


def test_shard_stats_live_in_the_footer(store: DatasetStore) -> None:
    prompts = make_records(PromptRecord, 3)
    stats0 = {"counts": {"trees": 2}, "values": {"gain": [0.5, -1.0]}, "seconds": {"compute": 1.5}}
    stats1 = {"counts": {"trees": 1}, "values": {}, "seconds": {}}
    store.write_shard(RUN, STAGE, STEP, 0, prompts[:2], PromptRecord, FP, stats=stats0)
    store.write_shard(RUN, STAGE, STEP, 1, prompts[2:], PromptRecord, FP, stats=stats1)
    store.write_shard(RUN, STAGE, STEP, 2, prompts, PromptRecord, FP)  # no stats given

    committed = store.committed_shards(RUN, STAGE, STEP, FP)
    assert {i: c.stats for i, c in committed.items()} == {0: stats0, 1: stats1, 2: {}}
    assert [committed[i].info.rows for i in range(3)] == [2, 1, 3]
    assert store.committed_shards(RUN, STAGE, STEP, OTHER_FP) == {}

    manifest, shard_stats = store.seal(RUN, StepRef(STAGE, STEP), PromptRecord, FP, [0, 1])
    assert [s.index for s in manifest.shards] == [0, 1] and manifest.total_rows == 3
    assert shard_stats == {0: stats0, 1: stats1}
    # Nothing beside the shards and the manifest: no stats sidecar to drift from its shard.
    step = RunLayout(RUN).step(StepRef(STAGE, STEP))
    assert store.files.list_names(step) == [
        "_manifest.json",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert store.files.list_names(RunLayout(RUN).directory) == [STAGE]

    # Rewriting a shard replaces its stats with the new ones.
    store.write_shard(RUN, STAGE, STEP, 1, prompts[2:], PromptRecord, FP, stats=stats0)
    assert store.committed_shards(RUN, STAGE, STEP, FP)[1].stats == stats0


def test_seal_names_missing_shards(store: DatasetStore) -> None:
    prompts = make_records(PromptRecord, 1)
    store.write_shard(RUN, STAGE, STEP, 1, prompts, PromptRecord, FP)
    store.write_shard(RUN, STAGE, STEP, 2, prompts, PromptRecord, OTHER_FP)
    with pytest.raises(StepIncompleteError, match=r"shards \[0, 2\]") as err:
        store.seal(RUN, StepRef(STAGE, STEP), PromptRecord, FP, range(3))
    assert FP in str(err.value)
    assert store.read_manifest(RUN, STAGE, STEP) is None


def test_list_steps_reports_complete_partial_and_empty(store: DatasetStore) -> None:
    assert store.list_steps(RUN) == []
    trees = make_records(RefinementTree, 3)
    store.write_shard(RUN, STAGE, "trees", 0, trees[:2], RefinementTree, FP)
    store.write_shard(RUN, STAGE, "trees", 1, trees[2:], RefinementTree, FP)
    store.write_manifest(RUN, STAGE, "trees", RefinementTree, FP)
    store.write_shard(RUN, STAGE, "pairs", 3, make_records(PreferencePair, 1), PreferencePair, FP)
    store.write_shard(RUN, "inputs", "prompts", 0, make_records(PromptRecord, 1), PromptRecord, FP)
    # A step directory holding only a dead writer's temp file has no shard yet.
    store.files.write_bytes(f"{RunLayout(RUN).step(StepRef(STAGE, 'empty'))}/.part-00000.tmp", b"x")
    # Not steps: checkpoints, step records, rejects beside a stage's steps.
    store.files.write_bytes(f"{RunLayout(RUN).checkpoints('sft')}/final/model.bin", b"w")
    store.write_json(RunLayout(RUN).step_record(StepRef(STAGE, "trees")), {"rows": 3})
    store.files.write_bytes(RunLayout(RUN).rejects(StepRef("inputs", "prompts")), b"{}\n")
    store.write_json(RunLayout(RUN).run_record, {"run": RUN})

    assert store.list_steps(RUN) == [
        StepStatus(stage="inputs", step="prompts", status="partial", shards=1),
        StepStatus(stage=STAGE, step="empty", status="empty", shards=0),
        StepStatus(stage=STAGE, step="pairs", status="partial", shards=1),
        StepStatus(
            stage=STAGE,
            step="trees",
            status="complete",
            rows=3,
            shards=2,
            record_type="RefinementTree",
            fingerprint=FP,
        ),
    ]


def test_model_revision_reads_the_completion_marker(store: DatasetStore) -> None:
    layout = RunLayout(RUN)
    final = store.uri(layout.final_model("sft"))
    options = store.storage_options
    store.files.write_bytes(f"{layout.final_model('sft')}/config.json", b"{}")
    assert model_revision(final, options) is None  # trained, but not marked complete yet
    store.write_json(layout.complete_marker("sft"), {"fingerprint": "f00d" * 4, "rows": 3})
    assert model_revision(final, options) == "f00d" * 4
    assert model_revision(final + "/", options) == "f00d" * 4
    # Only a `.../final` directory beside a marker has a revision.
    assert model_revision(store.uri(layout.checkpoints("sft")), options) is None
    assert model_revision(store.uri(layout.checkpoint("sft", 4)), options) is None
    assert model_revision("smollm2-135m-instruct", options) is None
    store.write_json(layout.complete_marker("dpo"), {"rows": 3})
    assert model_revision(store.uri(layout.final_model("dpo")), options) is None
