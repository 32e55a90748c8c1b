"""Scratch directories owned by a live process; those of dead processes are cleaned up."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from avr_core.workdirs import (
    OWNER_FILE,
    ProcessIdentity,
    claim_dir,
    current_process,
    process_is_alive,
    remove_abandoned_dirs,
)


def _dead_pid() -> int:
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(finished.stdout)


def test_a_claimed_dir_is_private_unique_and_names_its_owner(tmp_path: Path) -> None:
    first, second = claim_dir(tmp_path, "train-"), claim_dir(tmp_path, "train-")
    assert first != second and first.name.startswith("train-")
    assert first.stat().st_mode & 0o777 == 0o700
    owner = ProcessIdentity.model_validate(json.loads((first / OWNER_FILE).read_text()))
    assert owner == current_process()
    assert process_is_alive(owner) is True


def test_liveness_tells_dead_recycled_and_foreign_processes_apart() -> None:
    me = current_process()
    assert process_is_alive(me.model_copy(update={"pid": _dead_pid()})) is False
    if me.pid_started is not None:  # Linux: a recycled pid has another start time
        assert process_is_alive(me.model_copy(update={"pid_started": "1"})) is False
    assert process_is_alive(me.model_copy(update={"host": "another-host"})) is None


def test_only_directories_of_dead_owners_are_removed(tmp_path: Path) -> None:
    mine = claim_dir(tmp_path, "train-")
    dead = claim_dir(tmp_path, "train-")
    owner = ProcessIdentity(host=socket.gethostname(), pid=_dead_pid())
    (dead / OWNER_FILE).write_text(owner.model_dump_json())
    (dead / "checkpoint-2").mkdir()
    (dead / "checkpoint-2" / "optimizer.pt").write_bytes(b"x" * 1024)
    foreign = claim_dir(tmp_path, "train-")
    (foreign / OWNER_FILE).write_text(
        owner.model_copy(update={"host": "elsewhere"}).model_dump_json()
    )
    fresh_unowned = tmp_path / "train-being-created"
    fresh_unowned.mkdir()
    old_unowned = tmp_path / "train-crashed-while-created"
    old_unowned.mkdir()
    an_hour_ago = time.time() - 3600
    os.utime(old_unowned, (an_hour_ago, an_hour_ago))
    other_kind = tmp_path / "avr-train-x"
    other_kind.mkdir()

    removed = remove_abandoned_dirs(tmp_path, "train-")
    assert sorted(removed) == sorted([dead, old_unowned])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [mine.name, foreign.name, fresh_unowned.name, other_kind.name]
    )
