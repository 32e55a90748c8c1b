"""Local scratch directories owned by one live process, and the clean-up of abandoned ones.

A trainer's scratch (GBs of checkpoints with optimizer state) or a job directory is removed by its
owner when it finishes; a process killed with -9 or by the OOM killer never gets to. Every such
directory is therefore created unique per attempt, 0700, with an owner file naming its process
(host, pid and the pid's start time, so a recycled pid is not mistaken for the owner), and the
next process to create one of the same kind removes those whose owner is gone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from pydantic import BaseModel

__all__ = [
    "OWNER_FILE",
    "ProcessIdentity",
    "claim_dir",
    "current_process",
    "discard_dir",
    "process_is_alive",
    "remove_abandoned_dirs",
]

logger = logging.getLogger(__name__)

OWNER_FILE = ".avr-owner.json"
# A directory without an owner file is being created right now, or was left by a crash during
# creation: only the latter, i.e. an old one, is abandoned.
_UNOWNED_GRACE_S = 600.0


class ProcessIdentity(BaseModel):
    """A process as another process on the same or another host can recognise it."""

    host: str
    pid: int
    pid_started: str | None = None  # kernel start time of the pid (Linux), guards pid reuse


def _pid_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name (field 2) may hold spaces, so split after its ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def current_process() -> ProcessIdentity:
    """This process."""
    pid = os.getpid()
    return ProcessIdentity(host=socket.gethostname(), pid=pid, pid_started=_pid_start_time(pid))


def process_is_alive(owner: ProcessIdentity) -> bool | None:
    """Whether `owner` still runs: True/False on this host, None for a process on another host."""
    if owner.host != socket.gethostname():
        return None
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    if owner.pid_started is not None:
        started = _pid_start_time(owner.pid)
        if started is not None and started != owner.pid_started:
            return False  # the pid was recycled by another process
    return True


def claim_dir(parent: Path, prefix: str) -> Path:
    """A new directory `parent/{prefix}{random}`, mode 0700, owned by this process."""
    parent.mkdir(parents=True, exist_ok=True)
    directory = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
    directory.mkdir(mode=0o700)
    owner = directory / OWNER_FILE
    owner.write_text(current_process().model_dump_json())
    return directory


def _owner_of(directory: Path) -> ProcessIdentity | None:
    try:
        return ProcessIdentity.model_validate(json.loads((directory / OWNER_FILE).read_text()))
    except (OSError, ValueError):
        return None


def discard_dir(directory: Path) -> bool:
    """Remove a directory that others may be looking at: renamed away first, then deleted.

    A half-deleted directory must never look like a whole one (a live scratch, a cached model).
    False if it could not be moved (already gone, or taken by someone else).
    """
    doomed = directory.with_name(f".discarded-{directory.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(directory, doomed)
    except OSError:
        return False
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def remove_abandoned_dirs(parent: Path, prefix: str) -> list[Path]:
    """Remove `parent/{prefix}*` directories whose owner process is gone; returns them.

    Directories of live processes, and of processes on other hosts (a shared disk), stay.
    """
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for directory in sorted(parent.glob(f"{prefix}*")):
        if not directory.is_dir() or directory.is_symlink():
            continue
        owner = _owner_of(directory)
        if owner is None:
            try:
                age = time.time() - directory.stat().st_mtime
            except OSError:
                continue
            if age < _UNOWNED_GRACE_S:
                continue
        elif process_is_alive(owner) is not False:
            continue
        if not discard_dir(directory):
            continue
        removed.append(directory)
        logger.info("removed abandoned %s (owner %s)", directory, owner or "unknown")
    return removed
