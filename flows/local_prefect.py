"""Local Prefect servers and process workers: `avr ui`, `avr run`'s API, and deploy tests.

`start_local_prefect` starts `prefect server start` on 127.0.0.1 with its state in a directory of
its own and analytics off; `LocalPrefect` runs `prefect` commands against it and starts workers;
on exit every process it started is stopped, with the flow runs the workers started.
`temporary_api` is the API of a flow run in this process (`avr run`, `avr demo`) when none is
configured: what Prefect's own ephemeral server would be, but started here.

Process hygiene: every server and worker started here gets SIGTERM from Linux when this process
dies, however it dies (`die_with_parent`; kill -9 included), and SIGTERM stops these commands the
way Ctrl-C does (`interrupt_on_sigterm`), so `kill`, `docker stop` and systemd stop them cleanly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx
import prefect
import prefect.context
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

from avr_core.processes import die_with_parent
from flows.config_files import PROJECT_DIR
from flows.deployments import CPU_POOL, GPU_POOL, PREFECT_YAML

__all__ = [
    "LocalPrefect",
    "Terminated",
    "die_with_parent",
    "ensure_pool",
    "free_port",
    "interrupt_on_sigterm",
    "run_ui",
    "start_local_prefect",
    "temporary_api",
    "worker_commands",
]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt: the same cleanup runs
    (`avr run` and `avr demo` then exit with 128 + SIGTERM = 143, `avr ui` with 0)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextlib.contextmanager
def interrupt_on_sigterm(also_sigint: bool = False) -> Iterator[None]:
    """Inside, SIGTERM raises `Terminated`; with `also_sigint`, Ctrl-C raises KeyboardInterrupt
    even if this process was started with SIGINT ignored (a shell's background job). The
    previous handlers come back on exit (a no-op outside the main thread, where Python cannot
    set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _raise_terminated)
    if also_sigint:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _stop_signals_ignored() -> Iterator[None]:
    """While stopping (bounded by timeouts), a second Ctrl-C or SIGTERM (systemd signals every
    process of a unit; impatient users press twice) must not cut the cleanup short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalPrefect:
    """A Prefect server (and optionally a worker) started by `start_local_prefect`."""

    api_url: str
    ui_url: str
    env: dict[str, str]
    processes: list[subprocess.Popen]
    log_dir: Path

    def prefect(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        """Run a `prefect` CLI command against this server, from the project directory."""
        result = subprocess.run(
            [_prefect_bin(), "--no-prompt", *args],
            cwd=PROJECT_DIR,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def start_worker(
        self,
        pool: str,
        name: str = "avr-local",
        limit: int | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen:
        """Start a process worker on `pool` in the background (logs in log_dir), running at
        most `limit` flow runs at once, with `env` added to its environment (and its runs')."""
        log = open(self.log_dir / f"worker-{pool}.log", "ab")  # noqa: SIM115 - lives with the process
        command = [_prefect_bin(), "worker", "start", "--pool", pool, "--type", "process"]
        command += ["--name", name] + ([] if limit is None else ["--limit", str(limit)])
        process = subprocess.Popen(
            die_with_parent(command),
            cwd=PROJECT_DIR,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        """Stop every process started here, and the flow runs workers started (own sessions)."""
        with _stop_signals_ignored():
            self._stop()

    def _stop(self) -> None:
        pids = [p.pid for p in self.processes if p.poll() is None]
        groups = {os.getpgid(pid) for pid in _with_descendants(pids) if _alive(pid)}
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        for process in self.processes:
            process.wait(timeout=10)
        self.processes.clear()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _with_descendants(pids: Sequence[int]) -> list[int]:
    """`pids` and all their descendants (from /proc; a process worker runs each flow run in a
    new session, so killing the worker's process group alone would leave the flow run behind)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # Fields after the ")" that closes the command name: state, ppid, ...
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _prefect_bin() -> str:
    """The `prefect` executable of this environment."""
    candidate = Path(sys.executable).with_name("prefect")
    return str(candidate) if candidate.exists() else (shutil.which("prefect") or "prefect")


def _wait_healthy(api_url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"prefect server at {api_url} not healthy after {timeout:.0f}s")


@contextlib.contextmanager
def start_local_prefect(
    home: Path,
    port: int | None = None,
    extra_env: dict[str, str] | None = None,
    startup_timeout: float = 120,
) -> Iterator[LocalPrefect]:
    """A Prefect server on 127.0.0.1 with its state in `home`; everything stopped on exit."""
    port = port or free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "AVR_PROJECT_DIR": str(PROJECT_DIR),
        **(extra_env or {}),
    }
    env.pop("PREFECT_PROFILE", None)
    log_dir = home / "logs"
    log_dir.mkdir(exist_ok=True)
    server_log = open(log_dir / "server.log", "ab")  # noqa: SIM115 - lives with the process
    server = subprocess.Popen(
        die_with_parent(
            [_prefect_bin(), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        ),
        cwd=PROJECT_DIR,
        env=env,
        stdout=server_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    local = LocalPrefect(api_url, f"http://127.0.0.1:{port}", env, [server], log_dir)
    try:
        _wait_healthy(api_url, server, startup_timeout)
        yield local
    finally:
        local.stop()
        server_log.close()


def ensure_pool(local: LocalPrefect, pool: str) -> None:
    """Create a process work pool unless it exists."""
    if local.prefect("work-pool", "inspect", pool, check=False).returncode != 0:
        local.prefect("work-pool", "create", pool, "--type", "process")


def worker_commands(gpus: int, pool: str = GPU_POOL, gpus_per_worker: int = 1) -> list[str]:
    """Shell lines that start one process worker per GPU (or per `gpus_per_worker` GPUs, for
    tensor-parallel models) on one box, each with its own GPU concurrency limit.

    A process worker's flow runs inherit its environment: `CUDA_VISIBLE_DEVICES` keeps each
    slice's engine on that worker's GPUs, `AVR_WORKER_ID` names its limit `gpu:{id}` (and the
    shards it computes), and `--limit 1` gives the worker one flow run at a time.
    """
    if gpus < 1 or gpus_per_worker < 1 or gpus % gpus_per_worker:
        raise ValueError(
            f"--gpus ({gpus}) must be a positive multiple of --gpus-per-worker ({gpus_per_worker})"
        )
    workers = gpus // gpus_per_worker
    names = [f"{pool}-{k}" for k in range(workers)]
    lines = [
        f"# {workers} process worker(s) on pool {pool!r}, {gpus_per_worker} GPU(s) each; run "
        "with PREFECT_API_URL set, and AVR_PROJECT_DIR at the flow code.",
        "# Once: the pool (if it does not exist yet) and one GPU limit per worker.",
        f"prefect work-pool create {pool} --type process",
        *[f"prefect gcl create gpu:{name} --limit 1" for name in names],
        "# Then each worker in its own shell or service unit:",
    ]
    for k, name in enumerate(names):
        devices = ",".join(str(k * gpus_per_worker + g) for g in range(gpus_per_worker))
        lines.append(
            f"CUDA_VISIBLE_DEVICES={devices} AVR_WORKER_ID={name} prefect worker start "
            f"--pool {pool} --type process --name {name} --limit 1"
        )
    lines.append(
        f"# Steps then run with execution.workers={workers} and "
        f"execution.slice_deployment=step-slice/{pool}."
    )
    return lines


def run_ui(port: int | None, home: str | None, deploy: bool) -> int:
    """`avr ui`: server + cpu/gpu process pools + deployments + one worker per pool, until Ctrl-C
    or SIGTERM, which stop them all and exit with 0 (also while starting). 1 if the server or a
    worker exits on its own (the others are stopped then too)."""
    state = Path(home) if home else Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    # A shell may start this command with SIGINT ignored, e.g. in the background.
    with interrupt_on_sigterm(also_sigint=True):
        try:
            with start_local_prefect(state, port) as local:
                for pool in (CPU_POOL, GPU_POOL):
                    ensure_pool(local, pool)
                if deploy:
                    local.prefect("deploy", "--prefect-file", str(PREFECT_YAML), "--all")
                for pool in (CPU_POOL, GPU_POOL):
                    local.start_worker(pool, name=f"avr-{pool}")
                print(
                    f"Prefect UI: {local.ui_url}   (API {local.api_url}; logs in {local.log_dir})"
                )
                print("Open a deployment and press Run. Ctrl-C stops the server and the workers.")
                while all(p.poll() is None for p in local.processes):
                    time.sleep(1)
                exited = next(p for p in local.processes if p.poll() is not None)
                what = "the Prefect server" if exited is local.processes[0] else "a worker"
                print(
                    f"avr ui: {what} exited with code {exited.returncode} "
                    f"(logs in {local.log_dir}); stopping",
                    file=sys.stderr,
                )
                return 1
        except KeyboardInterrupt as stop:
            reason = "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"
            print(f"avr ui: stopped ({reason})", file=sys.stderr)
    return 0


@contextlib.contextmanager
def temporary_api(startup_timeout: float | None = None) -> Iterator[str | None]:
    """The Prefect API for flows run in this process: the configured PREFECT_API_URL if any,
    else a temporary server on a free loopback port, stopped on exit.

    Without a configured API Prefect would start its own temporary server, which outlives this
    process when it is killed with SIGKILL; this one is the same server (the app Prefect runs,
    without UI, with the services of an ephemeral server, state in PREFECT_HOME) started with
    `die_with_parent`. Its URL is set for this process's threads and children too.
    """
    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    settings = get_current_settings()
    timeout = startup_timeout or settings.server.ephemeral.startup_timeout_seconds
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        **settings.to_environment_variables(exclude_unset=True),
        # As Prefect's own ephemeral server (prefect.server.api.server.SubprocessASGIServer).
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent)]
    command += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--log-level", "error", "--lifespan", "on"]
    print(f"starting a temporary Prefect API on {api_url} (it stops with this command)")
    # Its own session: Ctrl-C in a terminal reaches only `avr`, which still reports the flow run's
    # end to this server before stopping it.
    server = subprocess.Popen(die_with_parent(command), env=env, start_new_session=True)
    try:
        _wait_healthy(api_url, server, timeout)
        with _api_url_everywhere(api_url):
            try:
                yield api_url
            finally:
                _drain_prefect_workers()
    finally:
        with _stop_signals_ignored():
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@contextlib.contextmanager
def _api_url_everywhere(api_url: str) -> Iterator[None]:
    """PREFECT_API_URL for this thread, for threads whose context has no settings of its own
    (Prefect's log and event workers: they would start another server otherwise), and for child
    processes."""
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = api_url
    prefect.context.refresh_global_settings_context()
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        prefect.context.refresh_global_settings_context()


def _drain_prefect_workers() -> None:
    """Send the logs and events still queued before the server they go to stops."""
    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=10)
