"""Fault benchmark: many random kill -9 trials and storage outages, every row accounted for.

Each kill trial runs the fault suite's pipeline (`tests.faults.pipeline`: Stage I's data steps on
the tiny models through the real step protocol) in its own process group, kills the whole group
with SIGKILL at a seeded random moment, re-runs it, and compares every step with a clean run.
Each outage trial runs the pipeline against a local moto S3 server behind a loopback proxy that
refuses connections for the given number of seconds mid-run. Usage:

    python -m benchmarks.faults --trials 30 --outages 60,120
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from avr_core.reporting import text_table
from avr_core.storage import DatasetStore
from tests.faults.harness import (
    PipelineSize,
    kill_trial,
    pipeline_env,
    run_pipeline,
    step_contents,
    step_rows,
)

RUN = "faults"


def _outage_trial(seconds: float, size: PipelineSize, work: Path, reference: dict) -> bool:
    """Whether the pipeline finished, with the reference's rows, through an outage."""
    import os
    import socket
    import uuid

    import s3fs
    from moto.server import ThreadedMotoServer

    from tests.faults.tcp_proxy import TcpProxy

    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s"}
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        if not fs.exists("avr-bench"):  # moto keeps its state across servers in one process
            fs.mkdir("avr-bench")
        root = f"s3://avr-bench/{uuid.uuid4().hex[:8]}"
        with TcpProxy(port) as proxy:
            env = pipeline_env({**options, "endpoint_url": proxy.url})
            proxy.outage_in_background(after_s=5.0, seconds=seconds)
            try:
                run_pipeline(root, RUN, size, env, work / f"outage-{seconds:.0f}.log", 1800)
            except AssertionError:
                return False
        return step_contents(DatasetStore(root, options), RUN) == reference
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--outages", default="60", help="outage lengths in seconds, e.g. 60,120")
    parser.add_argument("--seed", type=int, default=0, help="first trial's seed")
    args = parser.parse_args(argv)
    size = PipelineSize(prompts=args.prompts)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="avr-faults-") as tmp:
        work = Path(tmp)
        clean = run_pipeline(f"file://{work / 'reference'}", RUN, size, pipeline_env(), work / "r")
        store = DatasetStore(f"file://{work / 'reference'}")
        reference, contents = step_rows(store, RUN), step_contents(store, RUN)
        results = []
        for seed in range(args.seed, args.seed + args.trials):
            result = kill_trial(seed, work, size, reference, contents, clean)
            results.append(result)
            print(
                f"trial {seed}: kill after {result.kill_after_s:.1f}s "
                f"({'mid-run' if result.killed_mid_run else 'after the end'}), "
                f"{result.shards_committed_at_kill} shards committed, lost {result.rows_lost}, "
                f"duplicated {result.rows_duplicated}, "
                f"recomputed {result.committed_shards_recomputed}",
                flush=True,
            )
        survived = 0.0
        for seconds in [float(s) for s in args.outages.split(",") if s]:
            if _outage_trial(seconds, size, work, contents):
                survived = max(survived, seconds)
            print(f"outage {seconds:.0f}s: {'survived' if survived >= seconds else 'failed'}")
    rows = [
        ("trials", str(len(results))),
        ("killed mid-run", str(sum(r.killed_mid_run for r in results))),
        ("rows expected (per trial)", str(results[0].rows_expected if results else 0)),
        ("rows lost", str(sum(r.rows_lost for r in results))),
        ("rows duplicated", str(sum(r.rows_duplicated for r in results))),
        (
            "committed shards recomputed (beyond the in-flight ones)",
            str(sum(r.committed_shards_recomputed for r in results)),
        ),
        ("runs identical to the clean run", str(sum(r.content_matches_reference for r in results))),
        ("longest outage survived (s)", f"{survived:.0f}"),
        ("clean run (s)", f"{clean:.1f}"),
        ("total time (s)", f"{time.perf_counter() - started:.0f}"),
    ]
    print()
    print(text_table(rows, ("measure", "value")))


if __name__ == "__main__":
    main()
