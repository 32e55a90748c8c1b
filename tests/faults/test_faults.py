"""Fault injection, for real: kill -9, a storage outage, corruption, two writers, secrets.

Marker `faults` (run in CI by the default command). Every test drives `tests.faults.pipeline`
(Stage I's data steps on the tiny models, through the real step protocol and storage) in its own
process group. `AVR_FAULT_TRIALS` sets the number of random kills (default 3) and
`AVR_FAULT_OUTAGE_S` the storage outage (default 60 s); `benchmarks/faults.py` runs many more.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from avr_core.storage import DatasetStore
from tests.faults.harness import (
    REPO_ROOT,
    PipelineSize,
    committed_shard_files,
    kill_group,
    kill_trial,
    pipeline_env,
    run_pipeline,
    start_pipeline,
    step_contents,
    step_rows,
)
from tests.faults.tcp_proxy import TcpProxy
from tests.fixtures_s3 import S3Location

pytestmark = [pytest.mark.faults, pytest.mark.timeout(1800)]

SIZE = PipelineSize()
RUN = "faults"


class Reference:
    def __init__(self, root_dir: Path, seconds: float) -> None:
        self.root_dir, self.seconds = root_dir, seconds
        store = DatasetStore(f"file://{root_dir}")
        self.rows = step_rows(store, RUN)
        self.contents = step_contents(store, RUN)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """One clean run: the rows every faulted run must end with, and how long a run takes."""
    root_dir = tmp_path_factory.mktemp("reference")
    seconds = run_pipeline(f"file://{root_dir}", RUN, SIZE, pipeline_env(), root_dir / "log")
    reference = Reference(root_dir, seconds)
    assert set(reference.rows) == {"prompts", "seed_trees", "seed_scored", "rsft", "pairs"}
    assert len(reference.rows["seed_scored"]) == SIZE.prompts
    return reference


def _copy_run(reference: Reference, target: Path) -> DatasetStore:
    shutil.copytree(reference.root_dir, target, ignore=shutil.ignore_patterns("log"))
    return DatasetStore(f"file://{target}")


def test_random_kills_of_the_whole_process_group_lose_and_duplicate_nothing(
    reference: Reference, tmp_path: Path
) -> None:
    trials = int(os.environ.get("AVR_FAULT_TRIALS", "3"))
    results = [
        kill_trial(seed, tmp_path, SIZE, reference.rows, reference.contents, reference.seconds)
        for seed in range(trials)
    ]
    for result in results:
        assert result.rows_lost == 0 and result.rows_duplicated == 0, result
        assert result.committed_shards_recomputed == 0, result
        assert result.content_matches_reference, result
    assert any(r.killed_mid_run for r in results), results


def test_a_storage_outage_of_a_minute_is_ridden_out(
    reference: Reference, s3_location: S3Location, tmp_path: Path
) -> None:
    outage = float(os.environ.get("AVR_FAULT_OUTAGE_S", "60"))
    port = int(s3_location.endpoint_url.rsplit(":", 1)[1])
    with TcpProxy(port) as proxy:
        options = {**s3_location.storage_options, "endpoint_url": proxy.url}
        env = pipeline_env(options)
        # Cut the store off a few seconds in (once the models load, mid-generation), for a minute.
        proxy.outage_in_background(after_s=min(5.0, reference.seconds / 3), seconds=outage)
        started = time.perf_counter()
        run_pipeline(s3_location.root, RUN, SIZE, env, tmp_path / "log", timeout=900)
        elapsed = time.perf_counter() - started
    assert elapsed > outage, "the outage happened while the pipeline ran"
    log = (tmp_path / "log").read_text()
    assert "retrying" in log.lower(), "each retry is logged"
    store = DatasetStore(s3_location.root, s3_location.storage_options)
    assert step_contents(store, RUN) == reference.contents


def _rewrite_keeping_footer(path: Path, rows: slice) -> None:
    table = pq.read_table(path)
    pq.write_table(
        table.slice(rows.start, rows.stop).replace_schema_metadata(table.schema.metadata), path
    )


def test_corrupted_shards_and_manifests_are_detected_and_recomputed(
    reference: Reference, tmp_path: Path
) -> None:
    store = _copy_run(reference, tmp_path / "store")
    steps = tmp_path / "store" / "runs" / RUN / "stage1"
    # A shard edited behind the factory's back (valid Parquet, same footer, a row fewer) ...
    _rewrite_keeping_footer(steps / "seed_trees" / "part-00001.parquet", slice(0, 0))
    # ... one truncated, a manifest edited by hand, and one deleted.
    scored = steps / "seed_scored" / "part-00002.parquet"
    scored.write_bytes(scored.read_bytes()[:100])
    (steps / "rsft" / "_manifest.json").write_text("{ edited")
    (steps / "pairs" / "_manifest.json").unlink()
    before = committed_shard_files(store, RUN)

    run_pipeline(store.root, RUN, SIZE, pipeline_env(), tmp_path / "log")
    assert step_contents(store, RUN) == reference.contents
    after = committed_shard_files(store, RUN)
    rewritten = sorted(
        Path(path).relative_to(steps).as_posix()
        for path, identity in after.items()
        if before.get(path) != identity
    )
    # Exactly the damaged shards; a recomputed tree equal to the old one re-derives nothing.
    assert rewritten == ["seed_scored/part-00002.parquet", "seed_trees/part-00001.parquet"]


def test_two_runs_with_one_name_never_write_together(reference: Reference, tmp_path: Path) -> None:
    root = f"file://{tmp_path / 'store'}"
    env = pipeline_env()
    first = start_pipeline(root, RUN, SIZE, env, tmp_path / "first.log")
    time.sleep(1.0)
    second = start_pipeline(root, RUN, SIZE, env, tmp_path / "second.log")
    try:
        assert second.wait(timeout=300) != 0
        assert first.wait(timeout=900) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        for process in (first, second):
            if process.poll() is None:
                kill_group(process)
    refused = (tmp_path / "second.log").read_text()
    assert "is being written by flow 'faults-pipeline'" in refused
    assert f"pid {first.pid}" in refused
    assert step_contents(DatasetStore(root), RUN) == reference.contents


_KILLED_TRAINER = """
import sys
from pathlib import Path
from avr_core.config import TrainingConfig
from avr_core.training import TrainJob, run_training_subprocess
import json
job = TrainJob(kind="sft", store_root=sys.argv[1], run="faults", dataset_stage="stage1",
               dataset_step="rsft", train_step="secrets_sft",
               training=TrainingConfig(max_steps=50, save_steps=1), device="cpu")
run_training_subprocess(job, 0, storage_options=json.loads(sys.argv[2]),
                        work_root=Path(sys.argv[3]))
"""


def _files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def test_no_credentials_are_left_on_disk_by_a_run_or_a_killed_training(
    reference: Reference, s3_location: S3Location, tmp_path: Path
) -> None:
    key, secret = "AKIAFAULTSUITE000001", "fault-suite-secret-do-not-store"
    options: dict[str, Any] = {**s3_location.storage_options, "key": key, "secret": secret}
    temp, work = tmp_path / "tmp", tmp_path / "work"
    temp.mkdir()
    env = {**pipeline_env(options), "TMPDIR": str(temp)}
    run_pipeline(s3_location.root, RUN, SIZE, env, tmp_path / "pipeline.log")

    # A training killed with -9 once its child runs (its job file exists).
    trainer = subprocess.Popen(
        [sys.executable, "-c", _KILLED_TRAINER, s3_location.root, json.dumps(options), str(work)],
        cwd=REPO_ROOT,
        env=env,
        stdout=open(tmp_path / "trainer.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(temp.glob("avr-train-*/job.json")):
        time.sleep(0.2)
    assert list(temp.glob("avr-train-*/job.json")), (tmp_path / "trainer.log").read_text()
    time.sleep(2.0)
    kill_group(trainer)

    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_location.storage_options)
    stored = {name: fs.cat_file(name) for name in fs.find(s3_location.root)}
    assert stored, "the run wrote to the bucket"
    local = [*_files_under(temp), *_files_under(work), *tmp_path.glob("*.log")]
    assert list(temp.glob("avr-train-*/job.json")), "the killed training left its job file"
    for needle in (key, secret):
        leaks = [name for name, data in stored.items() if needle.encode() in data]
        leaks += [str(p) for p in local if needle.encode() in p.read_bytes()]
        assert leaks == [], f"{needle} found in {leaks}"
