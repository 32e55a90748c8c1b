"""Servers and workers die with `avr`, and SIGTERM stops `avr` as Ctrl-C does.

Containers and systemd stop a service with SIGTERM (then SIGKILL), and an operator may kill only
the `avr` process, not its group: neither may leave a Prefect server or worker running without
a parent. Processes are found through /proc (no psutil).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import httpx
import pytest

from flows.local_prefect import Terminated, die_with_parent, free_port, interrupt_on_sigterm

ROOT = Path(__file__).resolve().parents[1]
# A first server start creates the SQLite database: tens of seconds on a busy 2-core machine.
STARTUP_TIMEOUT = 240

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="parent-death signals and /proc are Linux"
    ),
]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.2)


def _assert_gone(pids: Iterable[int], timeout: float) -> None:
    pids = list(pids)
    left = pids
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [pid for pid in pids if _alive(pid)]
    described = {pid: _cmdline(pid) for pid in left}
    for pid in left:  # do not leave them behind for the next test
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running {timeout:.0f} s later: {described}"


def _env(tmp_path: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_PROFILE", None)
    return env


def _start(args: list[str], tmp_path: Path, name: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            args,
            cwd=ROOT,
            env=_env(tmp_path),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # signals in these tests reach only the process they name
        )
    return process, log


def _healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _start_ui(tmp_path: Path) -> tuple[subprocess.Popen, Path, str]:
    port = free_port()
    args = [sys.executable, "-m", "flows.cli", "ui", "--port", str(port)]
    args += ["--home", str(tmp_path / "ui-home"), "--no-deploy"]
    process, log = _start(args, tmp_path, "ui")
    return process, log, f"http://127.0.0.1:{port}/api"


def _wait_ui_ready(process: subprocess.Popen, log: Path, api_url: str) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"avr ui exited early:\n{log.read_text()[-3000:]}")
        return "Prefect UI:" in log.read_text() and _healthy(api_url)

    _wait_for(ready, STARTUP_TIMEOUT, "avr ui serving")


# ---- the pieces ----------------------------------------------------------------------------


def test_a_child_started_with_die_with_parent_dies_with_a_killed_parent(tmp_path: Path) -> None:
    parent_code = textwrap.dedent(
        """
        import subprocess, sys, time
        from flows.local_prefect import die_with_parent
        child = subprocess.Popen(die_with_parent(["sleep", "300"]))
        print(child.pid, flush=True)
        time.sleep(300)
        """
    )
    parent, log = _start([sys.executable, "-c", parent_code], tmp_path, "parent")
    try:
        _wait_for(lambda: log.read_text().strip().isdigit(), 60, "the child's pid")
        child = int(log.read_text())
        _wait_for(lambda: _cmdline(child).startswith("sleep 300"), 10, "the launcher exec'd")
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        _assert_gone([child], timeout=5)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_die_with_parent_keeps_the_command() -> None:
    argv = die_with_parent(["prefect", "server", "start"])
    assert argv[-3:] == ["prefect", "server", "start"]
    assert argv[-4] == str(os.getpid()), "the launcher checks it still has this parent"


def test_sigterm_raises_terminated_inside_and_is_restored_after() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), interrupt_on_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted by the handler
    assert issubclass(Terminated, KeyboardInterrupt), "cleanup written for Ctrl-C runs"
    assert signal.getsignal(signal.SIGTERM) is before


# ---- avr ui --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("when", ["serving", "starting"])
def test_sigterm_stops_avr_ui_and_everything_it_started(tmp_path: Path, when: str) -> None:
    process, log, api_url = _start_ui(tmp_path)
    try:
        if when == "serving":
            _wait_ui_ready(process, log, api_url)
        else:  # while the server is still creating its database
            _wait_for(lambda: bool(_children(process.pid)), 60, "the server started")
        children = _children(process.pid)
        assert children
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert "avr ui: stopped (SIGTERM)" in log.read_text()
        assert "Traceback" not in log.read_text()
        _assert_gone(children, timeout=10)
        assert not _healthy(api_url)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_killing_only_avr_ui_takes_its_server_and_workers_down(tmp_path: Path) -> None:
    process, log, api_url = _start_ui(tmp_path)
    try:
        _wait_ui_ready(process, log, api_url)
        children = _children(process.pid)
        commands = " | ".join(_cmdline(pid) for pid in children)
        assert "server start" in commands and commands.count("worker start") == 2, commands
        process.kill()
        process.wait(timeout=10)
        _assert_gone(children, timeout=30)  # workers shut down gracefully on their SIGTERM
        assert not _healthy(api_url)
    finally:
        if process.poll() is None:
            process.kill()


# ---- avr run / avr demo: the temporary API of an in-process flow run --------------------------

# `avr run` with a flow that runs until stopped (monkeypatched in), so that the test can signal
# it mid-run; everything else is the real command.
_SLEEPING_RUN = textwrap.dedent(
    """
    import dataclasses, sys, time
    import flows.cli as cli  # first, as in `avr`: it sets Prefect's environment
    from prefect import flow

    @flow(name="sleep-until-stopped")
    def sleeping(params):
        print("flow started", flush=True)
        time.sleep(600)

    real = cli.get_flow
    cli.get_flow = lambda name: dataclasses.replace(real(name), flow=sleeping)
    sys.exit(cli.main(["run", "ingest-prompts", "--set", "storage_root=STORE"]))
    """
)


def _start_sleeping_run(tmp_path: Path) -> tuple[subprocess.Popen, Path, int]:
    code = _SLEEPING_RUN.replace("STORE", str(tmp_path / "store"))
    process, log = _start([sys.executable, "-c", code], tmp_path, "run")

    def flow_started() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"avr run exited early:\n{log.read_text()[-3000:]}")
        return "flow started" in log.read_text()

    _wait_for(flow_started, STARTUP_TIMEOUT, "the flow run started")
    servers = [pid for pid in _children(process.pid) if "uvicorn" in _cmdline(pid)]
    assert len(servers) == 1, {pid: _cmdline(pid) for pid in _children(process.pid)}
    return process, log, servers[0]


@pytest.mark.slow
def test_sigterm_stops_avr_run_and_its_api_server(tmp_path: Path) -> None:
    process, log, server = _start_sleeping_run(tmp_path)
    try:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM, log.read_text()[-3000:]
        assert "avr: stopped (SIGTERM)" in log.read_text()
        _assert_gone([server], timeout=10)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_killing_only_avr_run_takes_its_api_server_down(tmp_path: Path) -> None:
    process, _, server = _start_sleeping_run(tmp_path)
    try:
        process.kill()
        process.wait(timeout=10)
        _assert_gone([server], timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
