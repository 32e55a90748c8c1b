"""One writer per run: the run lease on a local disk and on S3 (moto, conditional writes)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from avr_core.layout import RunLayout
from avr_core.lease import LeaseRecord, RunLease, RunLeaseHeldError, RunLeaseLostError
from avr_core.rootfs import RootFS
from avr_core.workdirs import ProcessIdentity, current_process
from tests.fixtures_s3 import S3Location

RUN = "lease-run"


@pytest.fixture(params=["local", "s3"])
def files(request: pytest.FixtureRequest, tmp_path) -> RootFS:
    if request.param == "local":
        return RootFS(f"file://{tmp_path}/store")
    location: S3Location = request.getfixturevalue("s3_location")
    return RootFS(location.root, location.storage_options)


def _lease(files: RootFS, clock: Callable[[], float] = time.time, **kw) -> RunLease:
    return RunLease(files, RUN, "stage1", clock=clock, **kw)


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout)


def test_a_second_writer_fails_fast_naming_the_holder(files: RootFS) -> None:
    with _lease(files, flow_run_id="run-a"):
        with pytest.raises(RunLeaseHeldError) as info:
            _lease(files, flow_run_id="run-b").acquire()
        message = str(info.value)
        assert f"run {RUN!r} is being written by flow 'stage1' (flow run run-a)" in message
        assert f"host {socket.gethostname()}" in message and "pid" in message
    # Released on exit: the name is free again.
    with _lease(files):
        pass
    assert files.read_bytes(RunLayout(RUN).lease) is None


def test_a_stale_lease_is_taken_over_and_its_old_holder_learns_it_lost(files: RootFS) -> None:
    first = _lease(files, heartbeat_s=3600)
    first.__enter__()
    later = _lease(files, clock=lambda: time.time() + 400, stale_after_s=300)
    later.acquire()
    first.renew()
    assert first.lost is not None and "lost" in first.lost
    with pytest.raises(RunLeaseLostError, match="lost"):
        first.__exit__(None, None, None)
    # The old holder's exit did not remove the new holder's lease.
    held = LeaseRecord.model_validate_json(files.read_bytes(RunLayout(RUN).lease) or b"")
    assert held.token == later._token
    later.release()


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(files: RootFS) -> None:
    dead = ProcessIdentity(host=socket.gethostname(), pid=_dead_pid())
    record = LeaseRecord(
        token="killed",
        run=RUN,
        flow="stage1",
        owner=dead,
        acquired_at=time.time(),
        heartbeat_at=time.time(),
    )
    files.write_bytes(RunLayout(RUN).lease, record.model_dump_json().encode())
    with _lease(files) as lease:
        assert lease.lost is None
    # A live process elsewhere is not presumed dead before its heartbeat goes stale.
    elsewhere = record.model_copy(update={"owner": dead.model_copy(update={"host": "node-7"})})
    files.write_bytes(RunLayout(RUN).lease, elsewhere.model_dump_json().encode())
    with pytest.raises(RunLeaseHeldError, match="node-7"):
        _lease(files).acquire()


def test_a_retry_of_the_same_flow_run_takes_its_own_lease_back(files: RootFS) -> None:
    record = LeaseRecord(
        token="crashed-attempt",
        run=RUN,
        flow="stage1",
        flow_run_id="flow-run-1",
        owner=current_process().model_copy(update={"host": "old-pod"}),
        acquired_at=time.time(),
        heartbeat_at=time.time(),
    )
    files.write_bytes(RunLayout(RUN).lease, record.model_dump_json().encode())
    with _lease(files, flow_run_id="flow-run-1"):
        pass


def test_heartbeats_renew_the_lease(files: RootFS) -> None:
    with _lease(files, heartbeat_s=0.2) as lease:
        first = lease._held.record.heartbeat_at  # type: ignore[union-attr]
        time.sleep(1.0)
        renewed = LeaseRecord.model_validate_json(files.read_bytes(RunLayout(RUN).lease) or b"")
        assert renewed.heartbeat_at > first and renewed.token == lease._token


def test_runs_starting_at_once_get_exactly_one_lease(files: RootFS) -> None:
    contenders = 6
    barrier = threading.Barrier(contenders)
    outcomes: list[str] = []

    def contend() -> None:
        lease = _lease(files)
        barrier.wait()
        try:
            lease.acquire()
            outcomes.append("won")
        except RunLeaseHeldError:
            outcomes.append("refused")

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * (contenders - 1) + ["won"]


def test_a_flow_that_lost_its_lease_stops_at_the_next_shard(tmp_path) -> None:
    from tasks.runlog import check_run_lease, hold_run

    root = f"file://{tmp_path}/store"
    with pytest.raises(RunLeaseLostError), hold_run(root, RUN, "stage1") as lease:
        check_run_lease(root, RUN)  # held: fine
        lease.lost = "run 'lease-run': lease lost, now held by another flow"
        check_run_lease(root, RUN)
    check_run_lease(root, RUN)  # released: nothing to check
