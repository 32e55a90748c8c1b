"""Scale-out benchmark: one generate-trees step with 1 worker vs N workers, on the same prompts.

Starts a Prefect server on 127.0.0.1 (state in a temporary directory), a `gpu` process pool with
`step-slice/gpu` deployed from deployments/prefect.yaml, and N process workers with `--limit 1`
and one torch thread each (the commands `avr workers` prints, with OMP_NUM_THREADS=1 so the
workers do not fight over the cores). Then, with `avr run generate-trees` as a user types it:

1. `execution.workers=1`: every shard in the `avr run` process (one torch thread too);
2. `execution.workers=N`: the shards dealt into N slices, each a child flow run on a worker.

Both wall times are the step's own (`_records/.../seed_trees.json`, from planning to the
manifest), so the CLI's start-up is left out; beside them, the sum of the shards' compute seconds
(from their footers) and their ratio, the workers busy at once on average: on an idle machine
with N free cores the sum stays near the 1-worker figure while the wall time drops N-fold; on a
loaded one each shard runs slower and the sum grows. The per-child overhead is what a child
costs beyond computing its shards, in two parts: from its creation until it runs (a worker picks
it up, starts a process, imports the flow code) and, while running, all but the compute (engine
load, shard writes, state reports). The load average is printed: other processes on the machine
take cores from the workers. Usage:

    python -m benchmarks.scale_out --prompts 8 --max-tokens 48 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

from avr_core.ingest import bundled_prompts_path, read_prompts
from avr_core.layout import RunLayout
from avr_core.reporting import text_table
from avr_core.schemas import PromptRecord
from avr_core.steps import ShardOutput, Stage1Steps, plan_step, run_step, split_into_shards
from avr_core.storage import DatasetStore
from flows.config_files import PROJECT_DIR
from flows.deployments import GPU_POOL, PREFECT_YAML
from flows.local_prefect import LocalPrefect, ensure_pool, start_local_prefect
from tests.commands import ONE_THREAD, SLICE_DEPLOYMENT, generate_trees_command

TREES = Stage1Steps.SEED_TREES
SLICES = SLICE_DEPLOYMENT


def _ingest(store: DatasetStore, run: str, count: int) -> None:
    """`count` bundled prompts as the run's prompts step, one prompt per shard."""
    prompts = read_prompts(str(bundled_prompts_path("train"))).prompts[:count]
    shards = split_into_shards(prompts, 1)
    plan = plan_step(
        store, run, Stage1Steps.PROMPTS, PromptRecord, {"n": count}, shard_count=len(shards)
    )
    run_step(plan, lambda index, _: ShardOutput(shards[index]))


def _generate(local: LocalPrefect, root: Path, run: str, workers: int, max_tokens: int) -> None:
    """`avr run generate-trees` against the server; fails with its output if it fails."""
    command = generate_trees_command(root, run, workers, max_tokens)
    done = subprocess.run(
        command,
        cwd=PROJECT_DIR,
        env={**local.env, **ONE_THREAD},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"avr run {run} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")


def _children(local: LocalPrefect, run: str) -> list[Any]:
    async def read() -> list[Any]:
        async with PrefectClient(local.api_url) as client:
            return await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["step-slice", run]))
            )

    return asyncio.run(read())


def _compute_seconds(store: DatasetStore, run: str) -> dict[int, float]:
    """Compute seconds of each shard of the run's trees step, from the shard footers."""
    manifest = store.read_manifest(run, *TREES)
    assert manifest is not None
    committed = store.committed_shards(run, *TREES, manifest.fingerprint)
    return {i: c.stats.get("seconds", {}).get("compute", 0.0) for i, c in committed.items()}


def _overheads(compute: dict[int, float], children: list[Any]) -> list[tuple[float, float]]:
    """(before running, running beyond compute) seconds per child."""
    result = []
    for child in children:
        own = sum(compute[i] for i in child.parameters["shards"])
        before = (child.start_time - child.created).total_seconds()
        running = (child.end_time - child.start_time).total_seconds()
        result.append((before, running - own))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8, help="prompts (one per shard)")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per generation")
    parser.add_argument("--workers", type=int, default=2, help="workers of the scaled-out run")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="avr-scale-out-") as work:
        root = Path(work) / "store"
        store = DatasetStore(f"file://{root}")
        with start_local_prefect(
            Path(work) / "prefect", extra_env={"PREFECT_WORKER_QUERY_SECONDS": "1"}
        ) as local:
            ensure_pool(local, GPU_POOL)
            local.prefect("deploy", "--prefect-file", str(PREFECT_YAML), "--name", SLICES)
            for k in range(args.workers):
                env = {"AVR_WORKER_ID": f"gpu-{k}", **ONE_THREAD}
                local.start_worker(GPU_POOL, name=f"gpu-{k}", limit=1, env=env)
            load = os.getloadavg()[0]
            walls, computes = {}, {}
            for workers in (1, args.workers):
                run = f"bench-{workers}"
                _ingest(store, run, args.prompts)
                _generate(local, root, run, workers, args.max_tokens)
                record = store.read_json(RunLayout(run).step_record(TREES))
                walls[workers] = record["wall_seconds"]
                computes[workers] = _compute_seconds(store, run)
            scaled = f"bench-{args.workers}"
            overheads = _overheads(computes[args.workers], _children(local, scaled))

    one, many = walls[1], walls[args.workers]
    before = [b for b, _ in overheads]
    during = [d for _, d in overheads]
    # Shard compute / wall = how many workers computed at once on average: what the factory
    # achieves, apart from how fast each shard ran on a machine shared with other processes.
    rows = [
        (
            label,
            f"{walls[n]:.1f}",
            f"{sum(computes[n].values()):.1f}",
            f"{sum(computes[n].values()) / walls[n]:.2f}",
            f"{one / walls[n]:.2f}",
        )
        for label, n in (
            ("1 worker (in the parent)", 1),
            (f"{args.workers} workers (child flow runs)", args.workers),
        )
    ]
    print(
        f"generate-trees, {args.prompts} prompts (1 per shard), x=y=1, "
        f"max_tokens={args.max_tokens}, 1 torch thread per process; {os.cpu_count()} CPUs, "
        f"load average {load:.1f} before the runs"
    )
    header = ("step", "wall s", "shard compute s (sum)", "busy workers", "speed-up")
    print(text_table(rows, header))
    print(
        f"per-child overhead: {statistics.fmean(before) + statistics.fmean(during):.1f} s = "
        f"{statistics.fmean(before):.1f} s until it runs (worker pick-up, process start, "
        f"imports) + {statistics.fmean(during):.1f} s beside the compute (engine load, writes, "
        f"state reports); {len(overheads)} children; speed-up {one / many:.2f}x"
    )


if __name__ == "__main__":
    main()
