"""A local Prefect server and process workers: `avr ui`, and the tests that deploy for real.

`start_local_prefect` starts `prefect server start` on 127.0.0.1 with its state in a directory of
its own and analytics off; `LocalPrefect` runs `prefect` commands against it and starts workers;
on exit every process it started is stopped, with the flow runs the workers started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from flows.config_files import PROJECT_DIR
from flows.deployments import CPU_POOL, GPU_POOL, PREFECT_YAML

__all__ = ["LocalPrefect", "ensure_pool", "free_port", "run_ui", "start_local_prefect"]


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

    def start_worker(self, pool: str, name: str = "avr-local") -> subprocess.Popen:
        """Start a process worker on `pool` in the background (logs in log_dir)."""
        log = open(self.log_dir / f"worker-{pool}.log", "ab")  # noqa: SIM115 - lives with the process
        process = subprocess.Popen(
            [
                _prefect_bin(),
                "worker",
                "start",
                "--pool",
                pool,
                "--type",
                "process",
                "--name",
                name,
            ],
            cwd=PROJECT_DIR,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        """Stop every process started here, and the flow runs workers started (own sessions)."""
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
        [_prefect_bin(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
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


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_ui(port: int | None, home: str | None, deploy: bool) -> int:
    """`avr ui`: server + cpu/gpu process pools + deployments + one worker per pool, until Ctrl-C."""
    state = Path(home) if home else Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    # Ctrl-C and `kill` both stop the server and workers cleanly (a shell may start this
    # command with SIGINT ignored, e.g. in the background).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    with start_local_prefect(state, port) as local:
        for pool in (CPU_POOL, GPU_POOL):
            ensure_pool(local, pool)
        if deploy:
            local.prefect("deploy", "--prefect-file", str(PREFECT_YAML), "--all")
        for pool in (CPU_POOL, GPU_POOL):
            local.start_worker(pool, name=f"avr-{pool}")
        print(f"Prefect UI: {local.ui_url}   (API {local.api_url}; logs in {local.log_dir})")
        print("Open a deployment and press Run. Ctrl-C stops the server and the workers.")
        with contextlib.suppress(KeyboardInterrupt):
            while all(p.poll() is None for p in local.processes):
                time.sleep(1)
    return 0
