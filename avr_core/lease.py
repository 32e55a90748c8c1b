"""One writer per run: a lease object in storage that a run holds while it writes.

Two flow runs with the same run name would share shard keys, checkpoint keys and run records, and
corrupt each other. A flow takes the run's lease (`runs/{run}/_lease.json`: owner, host, pid,
heartbeat time) before it writes anything and renews it from a background thread; a second flow
with the same run name fails fast with a message naming the holder. The lease is created with a
conditional write (S3 `If-None-Match: *`; an exclusive lock on a local disk), so two runs starting
at once cannot both win, and renewed with a compare-and-swap (S3 `If-Match` on the ETag), so a
holder that lost it notices.

A lease is taken over, never waited for, when its holder is provably gone: no heartbeat for
`stale_after_s`, or its process is dead on this host (a kill -9 and an immediate re-run), or it
was held by the same Prefect flow run (a retry or a rescheduled crashed run).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from types import TracebackType

from pydantic import BaseModel

from avr_core.layout import RunLayout
from avr_core.rootfs import RootFS, is_transient_error
from avr_core.workdirs import ProcessIdentity, current_process, process_is_alive

__all__ = ["LeaseRecord", "RunLease", "RunLeaseHeldError", "RunLeaseLostError"]

logger = logging.getLogger(__name__)


class RunLeaseHeldError(RuntimeError):
    """Another live process holds the run's lease."""


class RunLeaseLostError(RuntimeError):
    """This process's lease was taken over while it ran (it was presumed dead)."""


class LeaseRecord(BaseModel):
    """The lease object: who writes the run, and when it last said so."""

    token: str
    run: str
    flow: str
    flow_run_id: str | None = None
    owner: ProcessIdentity
    acquired_at: float
    heartbeat_at: float

    def describe(self, now: float) -> str:
        flow_run = f" (flow run {self.flow_run_id})" if self.flow_run_id else ""
        started = datetime.fromtimestamp(self.acquired_at, UTC).isoformat(timespec="seconds")
        return (
            f"flow {self.flow!r}{flow_run} on host {self.owner.host}, pid {self.owner.pid}, "
            f"since {started}, last heartbeat {now - self.heartbeat_at:.0f}s ago"
        )


class _Versioned(BaseModel):
    record: LeaseRecord | None
    version: str | None  # S3 ETag; None on stores without conditional writes


class _LeaseFile:
    """Conditional create / compare-and-swap of one small object on a RootFS."""

    def __init__(self, files: RootFS, where: str) -> None:
        self.files, self.where = files, where
        self.path = files.path(where)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # On a local disk an exclusive lock beside the lease makes read-compare-write atomic.
        if not self.files.is_local:
            yield
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _etag(self) -> str | None:
        if self.files.is_local:
            return None
        self.files.fs.invalidate_cache(self.path)
        try:
            info = self.files.fs.info(self.path)
        except FileNotFoundError:
            return None
        etag = info.get("ETag") or info.get("etag")
        return str(etag) if etag else None

    def read(self) -> _Versioned:
        for _ in range(5):
            before = self._etag()
            data = self.files.read_bytes(self.where)
            if data is None:
                return _Versioned(record=None, version=None)
            # Read between two identical ETags: the bytes belong to that version.
            if before == self._etag():
                try:
                    return _Versioned(record=LeaseRecord.model_validate_json(data), version=before)
                except ValueError:
                    logger.warning("%s: unreadable lease, treating it as stale", self.path)
                    return _Versioned(record=None, version=before)
        raise RuntimeError(f"{self.files.uri(self.where)}: lease keeps changing while read")

    def create(self, record: LeaseRecord) -> bool:
        """Write the lease only if none exists; False if one does."""
        data = record.model_dump_json().encode()
        with self._locked():
            if self.files.is_local:
                if self.files.exists(self.where):
                    return False
                self.files.write_bytes(self.where, data)
                return True
            try:
                self.files.fs.pipe_file(self.path, data, mode="create")
            except FileExistsError:
                return False
            except OSError as err:
                if "Precondition" in str(err) or "412" in str(err):
                    return False
                raise
            return True

    def replace(self, expected: _Versioned, record: LeaseRecord) -> bool:
        """Overwrite the lease only if it is still `expected`; False if it changed."""
        data = record.model_dump_json().encode()
        with self._locked():
            if self.files.is_local:
                current = self.read()
                expected_token = expected.record.token if expected.record else None
                current_token = current.record.token if current.record else None
                if current_token != expected_token:
                    return False
                self.files.write_bytes(self.where, data)
                return True
            if expected.version is None:
                return self.create(record)
            try:
                self.files.fs.pipe_file(self.path, data, IfMatch=expected.version)
            except OSError as err:
                if "Precondition" in str(err) or "412" in str(err) or "EINVAL" in repr(err):
                    return False
                raise
            return True

    def remove_if(self, token: str) -> None:
        with self._locked():
            current = self.read()
            if current.record is not None and current.record.token == token:
                self.files.remove(self.where)


class RunLease:
    """Hold a run's lease while writing it: `with RunLease(files, run, flow): ...`."""

    def __init__(
        self,
        files: RootFS,
        run: str,
        flow: str,
        flow_run_id: str | None = None,
        stale_after_s: float = 300.0,
        heartbeat_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.run, self.flow, self.flow_run_id = run, flow, flow_run_id
        self.stale_after_s, self.heartbeat_s, self.clock = stale_after_s, heartbeat_s, clock
        self.where = RunLayout(run).lease
        self.uri = files.uri(self.where)
        self._files = files
        self._file = _LeaseFile(files, self.where)
        self._token = uuid.uuid4().hex
        self._held: _Versioned | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    def _record(self, acquired_at: float | None = None) -> LeaseRecord:
        now = self.clock()
        return LeaseRecord(
            token=self._token,
            run=self.run,
            flow=self.flow,
            flow_run_id=self.flow_run_id,
            owner=current_process(),
            acquired_at=acquired_at if acquired_at is not None else now,
            heartbeat_at=now,
        )

    def _why_takeover(self, held: LeaseRecord) -> str | None:
        """Why `held` may be taken over (its holder is gone), or None if it may not."""
        age = self.clock() - held.heartbeat_at
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f}s (stale after {self.stale_after_s:.0f}s)"
        if process_is_alive(held.owner) is False:
            return f"its process {held.owner.pid} on this host is gone"
        if self.flow_run_id and held.flow_run_id == self.flow_run_id:
            return "it was held by an earlier attempt of this flow run"
        return None

    def acquire(self) -> None:
        """Take the lease, or raise `RunLeaseHeldError` naming its live holder.

        Transient storage errors are retried within the store's retry budget. A conditional
        write is not blindly repeated: a PUT that landed but lost its answer would fail its own
        precondition, so each attempt starts over from reading the lease (ours is ours).
        """
        retry, started, attempt = self._files.retry, time.monotonic(), 0
        while True:
            try:
                self._acquire_once()
                return
            except RunLeaseHeldError:
                raise
            except Exception as err:
                attempt += 1
                elapsed = time.monotonic() - started
                if not is_transient_error(err) or elapsed >= retry.max_elapsed_s:
                    raise
                wait = retry.delay(attempt)
                logger.warning(
                    "%s: taking the lease failed (%s: %s); retrying in %.1fs",
                    self.uri,
                    type(err).__name__,
                    err,
                    wait,
                )
                time.sleep(wait)

    def _acquire_once(self) -> None:
        current = self._file.read()
        if current.record is not None and current.record.token == self._token:
            self._held = current  # an earlier attempt's write landed
            return
        record = self._record()
        if self._file.create(record):
            self._held = self._file.read()
            logger.debug("%s: lease taken", self.uri)
            return
        current = self._file.read()
        held = current.record
        why = "it is unreadable or was just removed" if held is None else self._why_takeover(held)
        if why is None:
            assert held is not None
            raise RunLeaseHeldError(
                f"run {self.run!r} is being written by {held.describe(self.clock())} "
                f"(lease {self.uri}). Two runs with one name would overwrite each other's "
                f"shards and checkpoints: wait for it, use another run name, or, if that "
                f"process is gone, re-run after {self.stale_after_s:.0f}s without a heartbeat "
                f"(AVR_LEASE_STALE_SECONDS)."
            )
        if not self._file.replace(current, record):
            raise RunLeaseHeldError(
                f"run {self.run!r}: another process took over the lease {self.uri} just now"
            )
        self._held = self._file.read()
        logger.warning(
            "run %s: took over the lease of %s: %s",
            self.run,
            held.describe(self.clock()) if held else "an unreadable lease",
            why,
        )

    def renew(self) -> None:
        """Refresh the heartbeat; marks the lease lost if someone else holds it now."""
        if self._held is None or self._held.record is None:
            return
        current = self._file.read()
        if current.record is None or current.record.token != self._token:
            holder = current.record.describe(self.clock()) if current.record else "nobody"
            self.lost = f"run {self.run!r}: lease {self.uri} lost, now held by {holder}"
            logger.error("%s", self.lost)
            return
        renewed = self._record(acquired_at=self._held.record.acquired_at)
        if self._file.replace(current, renewed):
            self._held = self._file.read()
        else:
            logger.warning("%s: lease changed while renewing; checking again", self.uri)

    def release(self) -> None:
        """Give the lease up (only if it is still ours)."""
        if self._held is not None:
            self._file.remove_if(self._token)
            self._held = None

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except Exception as err:  # noqa: BLE001 - an outage must not kill the holder
                logger.warning("%s: heartbeat failed (%s); will retry", self.uri, err)
            if self.lost:
                return

    def __enter__(self) -> RunLease:
        self.acquire()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._heartbeats, name=f"lease-{self.run}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.release()
        except Exception as err:  # noqa: BLE001 - never hide the body's own error
            logger.warning("%s: could not release the lease: %s", self.uri, err)
        if self.lost and error is None:
            raise RunLeaseLostError(self.lost)
