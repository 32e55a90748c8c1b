"""Directories synced to storage (trainer checkpoints, final models) and their markers.

`upload_dir` writes a sync marker listing every file with its size and sha256, removed first and
written last, so an interrupted upload is never taken as complete; `download_dir` verifies every
file against it. A training step's `_complete.json`, written after its final model was uploaded,
names the model's training fingerprint and, from the final model's file hashes, its revision:
`model_revision` reads it, so data generated with a model trained under the same URI twice is
not mistaken for the other's. `verify_synced_dir` checks a synced directory against its marker
(sizes from a listing; hashes by reading), and `invalidate_completion` sets a damaged model's
completion marker aside so the next run retrains it instead of trusting it forever.
"""

from __future__ import annotations

import os
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from avr_core.hashing import file_sha256, sha256_hex
from avr_core.layout import COMPLETE_MARKER, FINAL_DIR_NAME
from avr_core.rootfs import RootFS, StorageError

__all__ = [
    "SYNC_MARKER_NAME",
    "download_dir",
    "factory_model_checkpoints",
    "invalidate_completion",
    "model_revision",
    "read_sync_marker",
    "synced_checkpoint_steps",
    "upload_dir",
    "verify_synced_dir",
]

SYNC_MARKER_NAME = "_avr_sync.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def read_sync_marker(files: RootFS, directory: str) -> dict[str, dict[str, Any]] | None:
    """The file listing of a completed upload of `directory`, or None if there is none."""
    marker_path = f"{files.relative(directory)}/{SYNC_MARKER_NAME}"
    marker = files.read_json(marker_path)
    if marker is None:
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        raise StorageError(f"{files.uri(marker_path)}: not a sync marker (no 'files' mapping)")
    listing: dict[str, dict[str, Any]] = marker["files"]
    return listing


def upload_dir(files: RootFS, local_dir: str | Path, directory: str) -> int:
    """Sync a local directory to `directory` (URI or root-relative); returns the files sent.

    Files whose sha256 matches the last sync are skipped. Remote files no longer present locally
    are left in place but are not part of the marker.
    """
    local = Path(local_dir)
    if not local.is_dir():
        raise FileNotFoundError(f"upload_dir: {local} is not a directory")
    remote = files.relative(directory)
    marker_path = f"{remote}/{SYNC_MARKER_NAME}"
    previous = read_sync_marker(files, remote) or {}
    files.remove(marker_path)
    remote_sizes = _file_sizes(files, remote) if previous else {}
    listing: dict[str, dict[str, Any]] = {}
    sent = 0
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        relative = file.relative_to(local).as_posix()
        if relative == SYNC_MARKER_NAME:
            continue
        digest = file_sha256(file)
        size = file.stat().st_size
        listing[relative] = {"size": size, "sha256": digest}
        # Skip what the last sync sent, unless the stored copy was damaged since (its size).
        if (
            previous.get(relative, {}).get("sha256") == digest
            and remote_sizes.get(relative) == size
        ):
            continue
        files.put_file(file, f"{remote}/{relative}")
        sent += 1
    marker = {"files": listing, "synced_at": datetime.now(UTC).isoformat(timespec="seconds")}
    files.write_json(marker_path, marker)
    return sent


def download_dir(files: RootFS, directory: str, local_dir: str | Path) -> Path:
    """Copy a directory synced by `upload_dir` to local disk, verifying every file's sha256."""
    remote = files.relative(directory)
    listing = read_sync_marker(files, remote)
    if listing is None:
        raise FileNotFoundError(
            f"{files.uri(remote)}: no completed upload here "
            f"(no {SYNC_MARKER_NAME}; missing or interrupted)"
        )
    local = Path(local_dir)
    for relative, entry in sorted(listing.items()):
        target = local / relative
        if target.is_file() and file_sha256(target) == entry["sha256"]:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        data = files.read_bytes(f"{remote}/{relative}")
        if data is None or sha256_hex(data) != entry["sha256"]:
            raise StorageError(
                f"{files.uri(remote)}/{relative}: missing or changed since it was uploaded"
            )
        temp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
        temp.write_bytes(data)
        os.replace(temp, target)
    return local


def _file_sizes(files: RootFS, remote: str) -> dict[str, int]:
    """Size of every file under a directory, by path relative to it (one recursive listing)."""
    base = files.path(remote)
    files.fs.invalidate_cache(base)
    try:
        found = files.fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    prefix = base.rstrip("/") + "/"
    return {
        name[len(prefix) :]: int(entry.get("size") or 0)
        for name, entry in found.items()
        if name.startswith(prefix) and entry.get("type") != "directory"
    }


def verify_synced_dir(files: RootFS, directory: str, check_hashes: bool) -> list[str]:
    """What is wrong with a directory synced by `upload_dir` ([] = whole), file by file.

    Sizes come from one listing; with `check_hashes` every file is read and hashed too.
    """
    remote = files.relative(directory)
    try:
        listing = read_sync_marker(files, remote)
    except StorageError as err:
        return [str(err)]
    if listing is None:
        return [f"no {SYNC_MARKER_NAME} (missing or interrupted upload)"]
    sizes = _file_sizes(files, remote)
    problems = []
    for relative, entry in sorted(listing.items()):
        size = sizes.get(relative)
        if size is None:
            problems.append(f"{relative} is missing")
        elif size != entry["size"]:
            problems.append(f"{relative} has {size} bytes, {entry['size']} were uploaded")
        elif check_hashes:
            data = files.read_bytes(f"{remote}/{relative}")
            if data is None or sha256_hex(data) != entry["sha256"]:
                problems.append(f"{relative} changed since it was uploaded (sha256 differs)")
    return problems


def invalidate_completion(files: RootFS, checkpoints_dir: str, reason: str) -> None:
    """Set a training step's completion marker aside (kept for inspection, with the reason).

    Without the marker, the next run of the training step resumes from its last synced
    checkpoint and uploads a whole final model again.
    """
    remote = files.relative(checkpoints_dir)
    marker = files.read_json(f"{remote}/{COMPLETE_MARKER}")
    if marker is None:
        return
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    files.write_json(
        f"{remote}/_complete.invalid-{stamp}.json", {"reason": reason, "marker": marker}
    )
    files.remove(f"{remote}/{COMPLETE_MARKER}")


def factory_model_checkpoints(path: str) -> tuple[str, str] | None:
    """(parent URI, checkpoints dir name) of a model this factory trained (`.../{step}/final`)."""
    stripped = path.rstrip("/")
    if not stripped.endswith("/" + FINAL_DIR_NAME):
        return None
    checkpoints = stripped.rsplit("/", 1)[0]
    parent, _, name = checkpoints.rpartition("/")
    return parent or "/", name


def synced_checkpoint_steps(files: RootFS, checkpoints_dir: str) -> list[int]:
    """Global steps of the checkpoints fully uploaded under `checkpoints_dir`, ascending."""
    steps = []
    for name in files.list_names(checkpoints_dir, "directory"):
        match = _CHECKPOINT_RE.match(name)
        # A checkpoint without upload_dir's marker was cut off mid-upload: not resumable.
        if match and files.exists(f"{files.relative(checkpoints_dir)}/{name}/{SYNC_MARKER_NAME}"):
            steps.append(int(match.group(1)))
    return sorted(steps)


def checkpoint_step(name: str) -> int | None:
    """Global step encoded in a `checkpoint-N` directory name."""
    match = _CHECKPOINT_RE.match(name)
    return int(match.group(1)) if match else None


def model_revision(path: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """Identity of a trained model's contents: the revision in its completion marker.

    A model trained by this factory lives at `{checkpoints}/final` beside `_complete.json`; the
    same URI can hold different weights across runs, so fingerprints of the data generated with
    it must include this. Other models (bundled names, user directories) return None.
    """
    located = factory_model_checkpoints(path)
    if located is None:
        return None
    parent, name = located
    files = RootFS(parent, storage_options)
    done = files.read_json(f"{name}/{COMPLETE_MARKER}")
    if not isinstance(done, dict) or not done.get("fingerprint"):
        return None
    # Older markers have no revision: their training fingerprint stands in for it.
    return str(done.get("revision") or done["fingerprint"])
