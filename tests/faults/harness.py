"""Kill, compare and account: what the fault suite and `benchmarks/faults.py` share.

A trial runs `tests.faults.pipeline` in its own process group, kills the whole group with SIGKILL
after a seeded random delay, notes which shards were committed at that moment (inode and mtime:
a rewrite makes a new file), re-runs the pipeline to the end, and compares every step's rows with
a clean reference run: rows lost, rows duplicated, and committed shards that were recomputed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avr_core.storage import META_CONTENT, DatasetStore
from tests.faults.pipeline import STEPS

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class PipelineSize:
    prompts: int = 4
    shard_size: int = 1
    max_tokens: int = 8

    def args(self) -> list[str]:
        return [
            f"--prompts={self.prompts}",
            f"--shard-size={self.shard_size}",
            f"--max-tokens={self.max_tokens}",
        ]


def pipeline_env(storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["AVR_STORAGE_OPTIONS"] = json.dumps(storage_options or {})
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    env["TQDM_DISABLE"] = "1"
    return env


def start_pipeline(
    root: str, run: str, size: PipelineSize, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """The pipeline in a new session (its own process group), output to `log`."""
    handle = open(log, "ab")  # noqa: SIM115 - closed with the process by the caller
    return subprocess.Popen(
        [sys.executable, "-m", "tests.faults.pipeline", root, run, *size.args()],
        cwd=REPO_ROOT,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def run_pipeline(
    root: str, run: str, size: PipelineSize, env: dict[str, str], log: Path, timeout: float = 900
) -> float:
    """Run the pipeline to the end; its wall time. Fails with the log's tail."""
    started = time.perf_counter()
    process = start_pipeline(root, run, size, env, log)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        raise
    if code != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise AssertionError(f"pipeline {run} exited {code}:\n{tail}")
    return time.perf_counter() - started


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the whole process group (the pipeline and anything it started)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def step_rows(store: DatasetStore, run: str) -> dict[str, list[str]]:
    """Every row of every step that has a manifest, as its identifying key."""
    rows: dict[str, list[str]] = {}
    for name, (ref, record_type, key) in STEPS.items():
        if store.read_manifest(run, *ref) is None:
            continue
        rows[name] = [key(record) for record in store.read_records(run, *ref, record_type)]
    return rows


def step_contents(store: DatasetStore, run: str) -> dict[str, list[str]]:
    """Every row of every sealed step, as JSON (for exact comparison with a clean run)."""
    contents: dict[str, list[str]] = {}
    for name, (ref, record_type, _) in STEPS.items():
        if store.read_manifest(run, *ref) is None:
            continue
        records = store.read_records(run, *ref, record_type)
        contents[name] = sorted(
            json.dumps(r.model_dump(mode="json", exclude={"lineage"}), sort_keys=True)
            for r in records
        )
    return contents


def committed_shard_files(store: DatasetStore, run: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every committed shard file of a local store's run."""
    files: dict[str, tuple[int, int]] = {}
    for _, (ref, _, _) in STEPS.items():
        directory = Path(store.files.path(store.step_uri(run, *ref)))
        for path in sorted(directory.glob("part-*.parquet")):
            # A torn file (killed mid-write on a disk without atomic rename) is not committed.
            if _footer_ok(path):
                stat = path.stat()
                files[str(path)] = (stat.st_ino, stat.st_mtime_ns)
    return files


def _footer_ok(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(path).metadata or {}
    except Exception:  # noqa: BLE001 - a torn file is simply not committed
        return False
    return META_CONTENT in metadata


@dataclass
class TrialResult:
    seed: int
    kill_after_s: float
    killed_mid_run: bool
    rows_expected: int
    rows_lost: int
    rows_duplicated: int
    shards_committed_at_kill: int
    committed_shards_recomputed: int
    content_matches_reference: bool


def compare(reference: dict[str, list[str]], found: dict[str, list[str]]) -> tuple[int, int, int]:
    """(rows expected, rows lost, rows duplicated) of `found` against the clean reference."""
    expected = lost = duplicated = 0
    for step, keys in reference.items():
        want, have = Counter(keys), Counter(found.get(step, []))
        expected += sum(want.values())
        lost += sum((want - have).values())
        duplicated += sum((have - want).values())
    return expected, lost, duplicated


def kill_trial(
    seed: int,
    root_dir: Path,
    size: PipelineSize,
    reference: dict[str, list[str]],
    reference_contents: dict[str, list[str]],
    clean_seconds: float,
) -> TrialResult:
    """Kill the pipeline at a seeded random moment, re-run it, and account for every row."""
    rng = random.Random(seed)
    kill_after = rng.uniform(0.5, clean_seconds)
    root = f"file://{root_dir / f'trial-{seed}'}"
    store = DatasetStore(root)
    run, env = "faults", pipeline_env()
    log = root_dir / f"trial-{seed}.log"
    process = start_pipeline(root, run, size, env, log)
    try:
        process.wait(timeout=kill_after)
        killed_mid_run = False  # it finished before the kill
    except subprocess.TimeoutExpired:
        killed_mid_run = True
    kill_group(process)
    before = committed_shard_files(store, run)
    run_pipeline(root, run, size, env, log)
    after = committed_shard_files(store, run)
    recomputed = sum(1 for path, identity in before.items() if after.get(path) != identity)
    expected, lost, duplicated = compare(reference, step_rows(store, run))
    return TrialResult(
        seed=seed,
        kill_after_s=round(kill_after, 2),
        killed_mid_run=killed_mid_run,
        rows_expected=expected,
        rows_lost=lost,
        rows_duplicated=duplicated,
        shards_committed_at_kill=len(before),
        committed_shards_recomputed=recomputed,
        content_matches_reference=step_contents(store, run) == reference_contents,
    )
