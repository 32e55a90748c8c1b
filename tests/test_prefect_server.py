"""Deployments against a real Prefect server: deploy prefect.yaml, run a worker, trigger runs the
way the UI's Run button does, resume a killed run with `prefect flow-run retry`.

The server keeps its state in PostgreSQL when one is reachable at 127.0.0.1:5432 (trust auth:
a fresh database per test session, dropped at the end), as a server with workers should; in
SQLite otherwise. Everything listens on 127.0.0.1 and is stopped at the end (whole process
groups). The flow is `regenerate` on the tiny CPU config (data only: ingest, trees, scores, RSFT
set, pairs) with a few prompts and tiny generations.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import WorkPoolCreate

from avr_core.layout import RunLayout, version_record_path
from avr_core.storage import DatasetStore
from flows.deployments import CPU_POOL, GPU_POOL, NIGHTLY_CRON, PREFECT_YAML
from flows.local_prefect import LocalPrefect, ensure_pool, start_local_prefect
from tests.fixtures_prefect import run_postgres

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEMO_PROMPTS = ROOT / "avr_core" / "data" / "demo_prompts.jsonl"
DEPLOYMENT = "regenerate/tiny"
LATEST = version_record_path("tiny", "latest")


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, postgres_database_url: str | None
) -> Iterator[LocalPrefect]:
    """Server + cpu/gpu process pools + all deployments + a worker on the cpu pool."""
    home = tmp_path_factory.mktemp("prefect-home")
    database_url = postgres_database_url
    extra_env = {"PREFECT_API_DATABASE_CONNECTION_URL": database_url} if database_url else {}
    with start_local_prefect(home, extra_env=extra_env) as local:
        for pool in (CPU_POOL, GPU_POOL):
            ensure_pool(local, pool)
        local.prefect("deploy", "--prefect-file", str(PREFECT_YAML), "--all")
        local.start_worker(CPU_POOL)
        yield local


def _client_call(local: LocalPrefect, fn):  # noqa: ANN001 - an async client function
    """Run `fn(client)` against this server (not the session's test harness)."""

    async def call() -> Any:
        async with PrefectClient(local.api_url) as client:
            return await fn(client)

    return asyncio.run(call())


def _tiny_params(local: LocalPrefect, **changes: Any) -> dict[str, Any]:
    """The tiny deployment's stored parameters with `changes` (what the UI form submits)."""

    async def read(client) -> dict[str, Any]:  # noqa: ANN001
        deployment = await client.read_deployment_by_name(DEPLOYMENT)
        return deployment.parameters

    params = json.loads(json.dumps(_client_call(local, read)["params"]))
    for key, value in changes.items():
        *sections, field = key.split(".")
        target = params
        for section in sections:
            target = target.setdefault(section, {})
        target[field] = value
    return {"params": params}


def _plan(published: dict[str, Any]) -> tuple[int, int, str | None]:
    """(new, reused, previous) of a published version record."""
    plan = published["plan"]
    return plan["new"], plan["reused"], plan["previous"]


def _create_run(local: LocalPrefect, parameters: dict[str, Any]) -> str:
    """POST /deployments/{id}/create_flow_run, as the UI's Run button does; returns the run id."""
    deployment = httpx.get(f"{local.api_url}/deployments/name/{DEPLOYMENT}", timeout=30).json()
    response = httpx.post(
        f"{local.api_url}/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": parameters, "state": {"type": "SCHEDULED"}},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _state(local: LocalPrefect, run_id: str) -> str:
    return httpx.get(f"{local.api_url}/flow_runs/{run_id}", timeout=30).json()["state"]["type"]


def _wait(local: LocalPrefect, run_id: str, done: set[str], timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _state(local, run_id)
        if state in done:
            return state
        time.sleep(1)
    logs = (local.log_dir / "worker-cpu.log").read_text()[-4000:]
    raise AssertionError(f"flow run {run_id} still {state} after {timeout}s; worker log:\n{logs}")


def _prompt_file(path: Path, count: int) -> str:
    lines = DEMO_PROMPTS.read_text().splitlines()[:count]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _shard_mtimes(root: Path, run: str) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in (root / "runs" / run).rglob("part-*.parquet")
    }


def _cheap(local: LocalPrefect, store: Path, prompts: str, version: str, shard_size: int):
    return _tiny_params(
        local,
        **{
            "storage_root": str(store),
            "ingest.prompts": prompts,
            "ingest.shard_size": shard_size,
            "ingest.max_prompts": None,
            "version": version,
            "tree.x": 1,
            "tree.y": 1,
            "tree.sampling.max_tokens": 8,
        },
    )


def test_gpu_job_templates_are_accepted_by_the_server(server: LocalPrefect) -> None:
    """The server validates a pool's base job template (placeholders vs. declared variables)."""
    for name, kind in (("gpu-kubernetes.json", "kubernetes"), ("gpu-docker.json", "docker")):
        template = json.loads((ROOT / "deployments" / "job_templates" / name).read_text())
        pool = WorkPoolCreate(name=f"check-{kind}", type=kind, base_job_template=template)
        created = _client_call(server, lambda client, pool=pool: client.create_work_pool(pool))
        assert created.base_job_template["variables"]["properties"]["image"]["default"] == (
            "avr-factory:gpu"
        )


def test_deployments_match_prefect_yaml(server: LocalPrefect) -> None:
    document = yaml.safe_load(PREFECT_YAML.read_text())

    async def read(client) -> list[Any]:  # noqa: ANN001
        return await client.read_deployments()

    deployed = _client_call(server, read)
    assert len(deployed) == len(document["deployments"])
    (nightly,) = [d for d in deployed if d.name == "nightly"]
    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == NIGHTLY_CRON and schedule.schedule.timezone == "UTC"
    assert nightly.work_pool_name == GPU_POOL


def test_server_state_is_in_postgres_when_reachable(
    server: LocalPrefect, postgres_database_url: str | None
) -> None:
    database_url = postgres_database_url
    if database_url is None:
        pytest.skip("no PostgreSQL at 127.0.0.1:5432: the server keeps its state in SQLite")
    database = database_url.rsplit("/", 1)[1]
    count = asyncio.run(run_postgres("SELECT count(*) FROM deployment", database))
    assert count == len(yaml.safe_load(PREFECT_YAML.read_text())["deployments"])


def test_ui_run_publishes_a_version_and_the_next_reuses_it(
    server: LocalPrefect, tmp_path: Path
) -> None:
    store_dir = tmp_path / "store"
    first = _cheap(server, store_dir, _prompt_file(tmp_path / "p4.jsonl", 4), "20260101", 2)
    run_id = _create_run(server, first)
    assert _wait(server, run_id, {"COMPLETED", "FAILED", "CRASHED"}) == "COMPLETED"

    store = DatasetStore(str(store_dir))
    latest = store.read_json(LATEST)
    assert latest["run"] == "tiny-20260101" and latest["complete"] is True
    assert _plan(latest) == (4, 0, None)
    for step in ("seed_scored", "rsft", "pairs"):
        assert store.read_manifest("tiny-20260101", "stage1", step) is not None, step
    assert store.read_manifest("tiny-20260101", "stage1", "seed_scored").total_rows == 4
    run_json = store.read_json(RunLayout("tiny-20260101").run_record)
    assert run_json["flow"] == "regenerate"
    assert run_json["config"]["tree"]["sampling"]["max_tokens"] == 8

    # Next night: two prompts added, one removed -> only the two new ones are generated.
    lines = DEMO_PROMPTS.read_text().splitlines()
    changed = tmp_path / "p5.jsonl"
    changed.write_text("\n".join(lines[1:6]) + "\n")
    second = _cheap(server, store_dir, str(changed), "20260102", 2)
    run_id = _create_run(server, second)
    assert _wait(server, run_id, {"COMPLETED", "FAILED", "CRASHED"}) == "COMPLETED"
    latest = store.read_json(LATEST)
    assert latest["run"] == "tiny-20260102"
    assert _plan(latest) == (2, 3, "tiny-20260101")
    assert store.read_manifest("tiny-20260102", "inputs", "prompts").total_rows == 2
    scored = store.read_records("tiny-20260102", "stage1", "seed_scored", "RefinementTree")
    assert len(scored) == 5 and len({t.prompt_id for t in scored}) == 5
    reused_lineage = {t.lineage.run for t in scored}
    assert reused_lineage == {"tiny-20260101", "tiny-20260102"}
    assert store.read_json(version_record_path("tiny", "20260101"))["run"] == "tiny-20260101"


def test_killed_run_resumes_with_flow_run_retry(server: LocalPrefect, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    params = _cheap(server, store_dir, _prompt_file(tmp_path / "p4.jsonl", 4), "20260201", 1)
    # Long enough answers that the run is still generating when the cancellation lands.
    params["params"]["tree"]["sampling"]["max_tokens"] = 32
    run_id = _create_run(server, params)

    # Cancel the run (the worker kills its process) once the first tree shard is committed.
    first_tree = (
        store_dir / "runs" / "tiny-20260201" / "stage1" / "seed_trees" / "part-00000.parquet"
    )
    deadline = time.monotonic() + 600
    while not first_tree.exists():
        assert _state(server, run_id) not in ("COMPLETED", "FAILED", "CRASHED"), "ran too fast"
        assert time.monotonic() < deadline, "no tree shard appeared"
        time.sleep(0.2)
    server.prefect("flow-run", "cancel", run_id)
    assert _wait(server, run_id, {"CANCELLED", "COMPLETED", "FAILED", "CRASHED"}) == "CANCELLED"
    time.sleep(2)  # the worker has killed the process group; nothing may be writing now
    store = DatasetStore(str(store_dir))
    assert store.read_manifest("tiny-20260201", "stage1", "seed_trees") is None, "killed midway"
    before = _shard_mtimes(store_dir, "tiny-20260201")
    trees_before = [k for k in before if "/seed_trees/" in k]
    assert 1 <= len(trees_before) < 4

    # What an operator types (docs/operations.md); the worker picks the run up again.
    result = server.prefect("flow-run", "retry", run_id)
    assert "scheduled for retry" in result.stdout
    assert _wait(server, run_id, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}) == "COMPLETED"

    after = _shard_mtimes(store_dir, "tiny-20260201")
    assert {k: after[k] for k in before} == before, "finished shards were rewritten"
    assert len([k for k in after if "/seed_trees/" in k]) == 4
    assert store.read_manifest("tiny-20260201", "stage1", "seed_trees").total_rows == 4
    assert store.read_json(LATEST)["run"] == "tiny-20260201"
