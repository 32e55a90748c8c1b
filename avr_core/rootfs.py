"""One fsspec root: URI <-> path math and atomic whole-file reads and writes beneath it.

Every file the factory writes (shards, manifests, records, checkpoint files) goes through
`RootFS.write_bytes`, which makes a file appear whole or not at all: on a local disk it is written
under a hidden temporary name, fsynced and renamed; on an object store it is one PUT (a multipart
upload, too, becomes visible only when it completes).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel

from avr_core.fingerprint import json_default

__all__ = ["RootFS", "StorageError", "StorageUnreachableError"]


class StorageError(RuntimeError):
    """Stored data is missing, inconsistent, or was changed behind the store's back."""


class StorageUnreachableError(StorageError):
    """The store root cannot be written or read (no such bucket, no permission, no endpoint)."""


class RootFS:
    """Files under one root URI (`file://`, `s3://`, any fsspec URL; a plain path = local disk)."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        has_protocol = "://" in root
        self.root: str = root.rstrip("/") if has_protocol else os.path.abspath(root)
        self.fs, base = fsspec.core.url_to_fs(self.root, **self.storage_options)
        self.base: str = base.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"RootFS({self.root!r})"

    # -- paths -------------------------------------------------------------------------------

    def relative(self, uri_or_relative: str) -> str:
        """Path relative to the root for a URI inside the root or an already relative path."""
        if uri_or_relative == self.root:
            return ""
        if uri_or_relative.startswith(self.root + "/"):
            return uri_or_relative[len(self.root) + 1 :]
        if "://" in uri_or_relative or os.path.isabs(uri_or_relative):
            raise ValueError(f"{uri_or_relative!r} is outside this store's root {self.root!r}")
        return uri_or_relative.strip("/")

    def path(self, uri_or_relative: str) -> str:
        """Filesystem path (what `self.fs` takes) of a URI or root-relative path."""
        relative = self.relative(uri_or_relative)
        return f"{self.base}/{relative}" if relative else self.base

    def uri(self, relative: str) -> str:
        """Full URI of a root-relative path."""
        return f"{self.root}/{relative}" if relative else self.root

    # -- whole files -------------------------------------------------------------------------

    def write_bytes(self, where: str, data: bytes) -> None:
        """Write a whole file so that readers see either nothing/the old file or all of `data`."""
        path = self.path(where)
        if self.is_local:
            directory, name = os.path.split(path)
            os.makedirs(directory, exist_ok=True)
            temp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
            try:
                with open(temp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temp, path)
            finally:
                if os.path.exists(temp):
                    os.remove(temp)
        else:
            # One PUT: object stores expose an object only once its upload has completed.
            self.fs.pipe_file(path, data)

    def read_bytes(self, where: str) -> bytes | None:
        """The file's bytes, or None if it does not exist."""
        try:
            data: bytes = self.fs.cat_file(self.path(where))
        except FileNotFoundError:
            return None
        return data

    def put_file(self, local_file: Path, where: str) -> None:
        """Upload a local file (atomically on a local root; streamed on an object store)."""
        if self.is_local:
            self.write_bytes(where, local_file.read_bytes())
        else:
            self.fs.put_file(str(local_file), self.path(where))

    def remove(self, where: str) -> None:
        """Delete a file if it exists."""
        path = self.path(where)
        # A listing cached before another process wrote `path` would hide it from exists().
        self.fs.invalidate_cache(path)
        if self.fs.exists(path):
            self.fs.rm_file(path)

    def exists(self, where: str) -> bool:
        """Whether a file or directory exists (never from a stale listing cache)."""
        path = self.path(where)
        self.fs.invalidate_cache(path)
        return bool(self.fs.exists(path))

    def list_names(self, where: str, kind: str | None = None) -> list[str]:
        """Base names directly under a directory (`kind` = "directory"/"file" filters); sorted."""
        directory = self.path(where)
        # Another process may have written here since this filesystem object cached the listing.
        self.fs.invalidate_cache(directory)
        try:
            entries = self.fs.ls(directory, detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            posixpath.basename(entry["name"].rstrip("/"))
            for entry in entries
            if kind is None or entry.get("type") == kind
        )

    # -- JSON --------------------------------------------------------------------------------

    def write_json(self, where: str, obj: Any) -> None:
        """Write `obj` (JSON-able or pydantic) atomically."""
        data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
        text = json.dumps(data, indent=2, sort_keys=True, default=json_default)
        self.write_bytes(where, text.encode("utf-8"))

    def read_json(self, where: str) -> Any | None:
        """The JSON at `where`, or None if there is none."""
        data = self.read_bytes(where)
        if data is None:
            return None
        try:
            return json.loads(data)
        except json.JSONDecodeError as err:
            raise StorageError(f"{self.uri(self.relative(where))}: bad JSON: {err}") from err

    def check_reachable(self) -> None:
        """Write, read back and delete a small probe under the root; fail clearly if that fails."""
        probe = f".avr-probe-{uuid.uuid4().hex[:12]}"
        payload = b"avr-factory store probe"
        try:
            if self.is_local:
                os.makedirs(self.base, exist_ok=True)
            self.write_bytes(probe, payload)
            readback = self.read_bytes(probe)
            self.remove(probe)
        except Exception as err:
            raise StorageUnreachableError(
                f"storage root {self.root!r} is not usable: {type(err).__name__}: {err}"
            ) from err
        if readback != payload:
            raise StorageUnreachableError(f"storage root {self.root!r} returned a different probe")
