"""The dataset store: Parquet shards, manifests, run files and checkpoints under one fsspec root.

Layout (DESIGN section 2), relative to the root URI (`file://`, `s3://` or any fsspec URL; a plain
path means the local disk):

    runs/{run}/run.json
    runs/{run}/{stage}/{step}/part-{i:05d}.parquet
    runs/{run}/{stage}/{step}/_manifest.json        written last
    runs/{run}/checkpoints/{train_step}/...

A shard is the unit of checkpointing. Its file appears whole or not at all: on a local disk it is
written under a hidden temporary name and renamed; on an object store it is one PUT (a multipart
upload, too, only becomes visible when it completes). A shard counts as complete only if its
Parquet footer parses and the config fingerprint stored in that footer is the one asked for, so a
truncated file or a shard from an older config is recomputed, never reused.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import re
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, NamedTuple

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel

from avr_core.schemas import (
    RECORD_TYPES,
    SCHEMA_VERSION,
    ArrowRecord,
    SchemaMismatchError,
    check_schema,
    records_to_table,
    table_to_records,
)

if TYPE_CHECKING:
    import datasets

__all__ = [
    "DatasetStore",
    "MANIFEST_NAME",
    "Manifest",
    "SYNC_MARKER_NAME",
    "ShardInfo",
    "StorageError",
    "StorageUnreachableError",
    "config_fingerprint",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
SYNC_MARKER_NAME = "_avr_sync.json"
SHARD_NAME = re.compile(r"^part-(\d{5})\.parquet$")

# Keys of the Parquet footer's key-value metadata that make a shard self-describing.
META_FINGERPRINT = b"avr.fingerprint"
META_RECORD_TYPE = b"avr.record_type"
META_SCHEMA_VERSION = b"avr.schema_version"
META_SHARD_INDEX = b"avr.shard_index"
META_ROWS = b"avr.rows"


class StorageError(RuntimeError):
    """Stored data is missing, inconsistent, or was changed behind the store's back."""


class StorageUnreachableError(StorageError):
    """The store root cannot be written or read (no such bucket, no permission, no endpoint)."""


class ShardInfo(BaseModel):
    """One completed shard: where it is, how many rows, the sha256 of its file bytes."""

    index: int
    path: str
    rows: int
    sha256: str
    fingerprint: str


class Manifest(BaseModel):
    """The completed step: written last, so its presence means every listed shard is final."""

    schema_version: str
    record_type: str
    fingerprint: str
    shards: list[ShardInfo]
    total_rows: int
    created_at: str


class _ShardFile(NamedTuple):
    """A whole shard file as read: its info, bytes, and the record type its footer names."""

    info: ShardInfo
    data: bytes
    record_type: str


def _json_default(value: Any) -> Any:
    """JSON form of the non-JSON values a config may hold."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"config value of type {type(value).__name__} has no JSON form: {value!r}")


def config_fingerprint(config: BaseModel | Mapping[str, Any]) -> str:
    """First 16 hex chars of the sha256 of the config as sorted-key JSON: the shard cache key."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    canonical = json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def shard_name(index: int) -> str:
    """File name of shard `index` (`part-00003.parquet`)."""
    if not 0 <= index <= 99999:
        raise ValueError(f"shard index must be in 0..99999, got {index}")
    return f"part-{index:05d}.parquet"


def _record_class(record_type: type[ArrowRecord] | str) -> type[ArrowRecord]:
    """The record class for a class or its name (`"RefinementTree"`)."""
    if isinstance(record_type, str):
        if record_type not in RECORD_TYPES:
            raise ValueError(
                f"unknown record type {record_type!r}; known: {', '.join(sorted(RECORD_TYPES))}"
            )
        return RECORD_TYPES[record_type]
    return record_type


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_segment(name: str, value: str) -> str:
    """Reject run/stage/step names that would escape or split the layout."""
    if not value or "/" in value or "\\" in value or value in (".", ".."):
        raise ValueError(f"{name} must be a non-empty name without '/', got {value!r}")
    return value


def _parquet_bytes(table: pa.Table, metadata: dict[bytes, bytes]) -> bytes:
    """The table as zstd Parquet bytes with `metadata` in the footer."""
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _footer_metadata(data: bytes) -> dict[bytes, bytes] | None:
    """The footer's key-value metadata, or None if the bytes are not a whole Parquet file."""
    try:
        return dict(pq.read_metadata(pa.BufferReader(data)).metadata or {})
    except (pa.ArrowException, OSError):
        return None


class DatasetStore:
    """Parquet shards, manifests, run JSON and checkpoint directories under one fsspec root."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        has_protocol = "://" in root
        self.root: str = root.rstrip("/") if has_protocol else os.path.abspath(root)
        self.fs, base = fsspec.core.url_to_fs(self.root, **self.storage_options)
        self._base: str = base.rstrip("/")
        self._local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"DatasetStore({self.root!r})"

    # -- paths -------------------------------------------------------------------------------

    def _relative(self, uri_or_relative: str) -> str:
        """Path relative to the root for a URI inside the root or an already relative path."""
        if uri_or_relative == self.root:
            return ""
        if uri_or_relative.startswith(self.root + "/"):
            return uri_or_relative[len(self.root) + 1 :]
        if "://" in uri_or_relative or os.path.isabs(uri_or_relative):
            raise ValueError(f"{uri_or_relative!r} is outside this store's root {self.root!r}")
        return uri_or_relative.strip("/")

    def _path(self, uri_or_relative: str) -> str:
        """Filesystem path (what `self.fs` takes) of a URI or root-relative path."""
        relative = self._relative(uri_or_relative)
        return f"{self._base}/{relative}" if relative else self._base

    def _uri(self, relative: str) -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def _step_relative(self, run: str, stage: str, step: str) -> str:
        return "/".join(
            [
                "runs",
                _check_segment("run", run),
                _check_segment("stage", stage),
                _check_segment("step", step),
            ]
        )

    def step_uri(self, run: str, stage: str, step: str) -> str:
        """URI of a step directory: {root}/runs/{run}/{stage}/{step}."""
        return self._uri(self._step_relative(run, stage, step))

    def shard_uri(self, run: str, stage: str, step: str, index: int) -> str:
        """URI of shard `index` of a step."""
        return f"{self.step_uri(run, stage, step)}/{shard_name(index)}"

    def checkpoint_uri(self, run: str, train_step: str) -> str:
        """URI where a training step's checkpoints are synced: {root}/runs/{run}/checkpoints/{step}."""
        _check_segment("train_step", train_step)
        return self._uri(f"runs/{_check_segment('run', run)}/checkpoints/{train_step}")

    # -- raw bytes ---------------------------------------------------------------------------

    def _write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file so that readers see either nothing/the old file or all of `data`."""
        if self._local:
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

    def _read_bytes(self, path: str) -> bytes | None:
        """The file's bytes, or None if it does not exist."""
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def _remove(self, path: str) -> None:
        # A listing cached before another process wrote `path` would hide it from exists().
        self.fs.invalidate_cache(path)
        if self.fs.exists(path):
            self.fs.rm_file(path)

    def _list_names(self, directory: str) -> list[str]:
        """Base names of the entries directly under `directory`; empty if it does not exist."""
        # Another process may have written here since this filesystem object cached the listing.
        self.fs.invalidate_cache(directory)
        try:
            entries = self.fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []
        return [posixpath.basename(entry.rstrip("/")) for entry in entries]

    def check_reachable(self) -> None:
        """Write, read back and delete a small probe under the root; fail clearly if that fails."""
        probe = self._path(f".avr-probe-{uuid.uuid4().hex[:12]}")
        payload = b"avr-factory store probe"
        try:
            if self._local:
                os.makedirs(self._base, exist_ok=True)
            self._write_bytes(probe, payload)
            readback = self._read_bytes(probe)
            self._remove(probe)
        except Exception as err:
            raise StorageUnreachableError(
                f"storage root {self.root!r} is not usable: {type(err).__name__}: {err}"
            ) from err
        if readback != payload:
            raise StorageUnreachableError(f"storage root {self.root!r} returned a different probe")

    # -- shards ------------------------------------------------------------------------------

    def write_shard(
        self,
        run: str,
        stage: str,
        step: str,
        index: int,
        records: list[ArrowRecord],
        record_type: type[ArrowRecord] | str,
        fingerprint: str,
    ) -> ShardInfo:
        """Commit one shard atomically; replaces an older shard (e.g. another fingerprint)."""
        cls = _record_class(record_type)
        table = records_to_table(records, cls)
        data = _parquet_bytes(
            table,
            {
                META_FINGERPRINT: fingerprint.encode(),
                META_RECORD_TYPE: cls.__name__.encode(),
                META_SCHEMA_VERSION: SCHEMA_VERSION.encode(),
                META_SHARD_INDEX: str(index).encode(),
                META_ROWS: str(table.num_rows).encode(),
            },
        )
        step_relative = self._step_relative(run, stage, step)
        # A manifest vouches for the shards as they were; once one changes the step is open again.
        self._remove(self._path(f"{step_relative}/{MANIFEST_NAME}"))
        self._write_bytes(self._path(f"{step_relative}/{shard_name(index)}"), data)
        return ShardInfo(
            index=index,
            path=self.shard_uri(run, stage, step, index),
            rows=table.num_rows,
            sha256=_sha256(data),
            fingerprint=fingerprint,
        )

    def _scan_shards(self, run: str, stage: str, step: str) -> Iterator[_ShardFile]:
        """Every shard of a step that is a whole Parquet file, in index order, whatever its config."""
        directory = self._path(self._step_relative(run, stage, step))
        indices = sorted(
            int(match.group(1))
            for match in map(SHARD_NAME.match, self._list_names(directory))
            if match
        )
        for index in indices:
            shard = self._load_shard_file(run, stage, step, index)
            if shard is not None:
                yield shard

    def _load_shard_file(self, run: str, stage: str, step: str, index: int) -> _ShardFile | None:
        """Shard `index` with its bytes, or None if it is missing or not a whole file."""
        uri = self.shard_uri(run, stage, step, index)
        data = self._read_bytes(self._path(uri))
        if data is None:
            return None
        metadata = _footer_metadata(data)
        if metadata is None:
            logger.warning("ignoring %s: not a complete Parquet file (interrupted write?)", uri)
            return None
        if metadata.get(META_SHARD_INDEX, str(index).encode()) != str(index).encode():
            logger.warning("ignoring %s: its footer says it is another shard", uri)
            return None
        info = ShardInfo(
            index=index,
            path=uri,
            rows=int(metadata.get(META_ROWS, b"0")),
            sha256=_sha256(data),
            fingerprint=metadata.get(META_FINGERPRINT, b"").decode(),
        )
        return _ShardFile(info, data, metadata.get(META_RECORD_TYPE, b"").decode())

    def completed_shards(
        self, run: str, stage: str, step: str, fingerprint: str
    ) -> dict[int, ShardInfo]:
        """Shards of a step that are whole files written with `fingerprint`, by index."""
        return {
            shard.info.index: shard.info
            for shard in self._scan_shards(run, stage, step)
            if shard.info.fingerprint == fingerprint
        }

    # -- manifests ---------------------------------------------------------------------------

    def write_manifest(
        self,
        run: str,
        stage: str,
        step: str,
        record_type: type[ArrowRecord] | str,
        fingerprint: str,
        expected_shards: int | None = None,
    ) -> Manifest:
        """Seal a step: list its completed shards in a manifest written after all of them.

        With `expected_shards`, shards 0..expected_shards-1 must all be complete (else StorageError).
        """
        cls = _record_class(record_type)
        where = self.step_uri(run, stage, step)
        scanned = [
            s for s in self._scan_shards(run, stage, step) if s.info.fingerprint == fingerprint
        ]
        shards = {s.info.index: s.info for s in scanned}
        if expected_shards is not None:
            missing = sorted(set(range(expected_shards)) - set(shards))
            if missing:
                raise StorageError(
                    f"{where}: cannot write the manifest, shards {missing} are not complete "
                    f"with fingerprint {fingerprint}"
                )
            shards = {i: info for i, info in shards.items() if i < expected_shards}
        other_types = {s.record_type for s in scanned if s.info.index in shards} - {cls.__name__}
        if other_types:
            raise SchemaMismatchError(
                f"{where}: shards hold {sorted(other_types)} records, not {cls.__name__}"
            )
        ordered = [shards[i] for i in sorted(shards)]
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            record_type=cls.__name__,
            fingerprint=fingerprint,
            shards=ordered,
            total_rows=sum(info.rows for info in ordered),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self._write_bytes(
            self._path(f"{self._step_relative(run, stage, step)}/{MANIFEST_NAME}"),
            manifest.model_dump_json(indent=2).encode(),
        )
        return manifest

    def read_manifest(self, run: str, stage: str, step: str) -> Manifest | None:
        """The step's manifest, or None if the step has not been sealed."""
        uri = f"{self.step_uri(run, stage, step)}/{MANIFEST_NAME}"
        data = self._read_bytes(self._path(uri))
        if data is None:
            return None
        try:
            return Manifest.model_validate_json(data)
        except ValueError as err:
            raise StorageError(f"{uri}: not a valid manifest: {err}") from err

    # -- reading -----------------------------------------------------------------------------

    def _selected_shards(
        self, run: str, stage: str, step: str, cls: type[ArrowRecord], fingerprint: str | None
    ) -> list[_ShardFile]:
        """Shards to read: the manifest's (sha256-verified), else every complete one."""
        where = self.step_uri(run, stage, step)
        manifest = self.read_manifest(run, stage, step)
        if manifest is None:
            found = [
                shard
                for shard in self._scan_shards(run, stage, step)
                if fingerprint is None or shard.info.fingerprint == fingerprint
            ]
            fingerprints = {shard.info.fingerprint for shard in found}
            if len(fingerprints) > 1:
                raise StorageError(
                    f"{where}: shards have mixed fingerprints {sorted(fingerprints)} and no "
                    "manifest; pass the fingerprint to read"
                )
            return found
        if manifest.record_type != cls.__name__:
            raise SchemaMismatchError(
                f"{where}: holds {manifest.record_type} records, not {cls.__name__}"
            )
        if fingerprint is not None and manifest.fingerprint != fingerprint:
            raise StorageError(
                f"{where}: manifest has fingerprint {manifest.fingerprint}, expected {fingerprint}"
            )
        shards = []
        for info in sorted(manifest.shards, key=lambda s: s.index):
            # Found by index under this root, so a run directory copied elsewhere still reads.
            uri = self.shard_uri(run, stage, step, info.index)
            data = self._read_bytes(self._path(uri))
            if data is None:
                raise StorageError(f"{uri}: listed in the manifest but missing")
            if _sha256(data) != info.sha256:
                raise StorageError(f"{uri}: changed after the manifest was written")
            shards.append(_ShardFile(info, data, manifest.record_type))
        return shards

    def _shard_table(self, shard: _ShardFile, cls: type[ArrowRecord], where: str) -> pa.Table:
        """A shard's rows as a table whose schema has been checked against `cls`."""
        try:
            table = pq.read_table(pa.BufferReader(shard.data))
        except (pa.ArrowException, OSError) as err:
            raise StorageError(f"{shard.info.path}: not a readable Parquet file: {err}") from err
        check_schema(table.schema, cls, where=f"{where} shard {shard.info.index}")
        return table.replace_schema_metadata(None)

    def read_table(
        self,
        run: str,
        stage: str,
        step: str,
        record_type: type[ArrowRecord] | str,
        fingerprint: str | None = None,
    ) -> pa.Table:
        """All rows of a step in shard order (the manifest's shards if sealed), schema-checked."""
        cls = _record_class(record_type)
        where = self.step_uri(run, stage, step)
        tables = [
            self._shard_table(shard, cls, where)
            for shard in self._selected_shards(run, stage, step, cls, fingerprint)
        ]
        if not tables:
            return cls.arrow_schema.empty_table()
        return pa.concat_tables(tables, promote_options="default")

    def read_records(
        self,
        run: str,
        stage: str,
        step: str,
        record_type: type[ArrowRecord] | str,
        fingerprint: str | None = None,
    ) -> list[ArrowRecord]:
        """All records of a step as pydantic objects, in shard order."""
        cls = _record_class(record_type)
        return table_to_records(self.read_table(run, stage, step, cls, fingerprint), cls)

    def read_shard_records(
        self, run: str, stage: str, step: str, index: int, record_type: type[ArrowRecord] | str
    ) -> list[ArrowRecord]:
        """The records of one shard (e.g. shard i of the input step, to compute shard i)."""
        cls = _record_class(record_type)
        shard = self._load_shard_file(run, stage, step, index)
        if shard is None:
            raise StorageError(
                f"{self.shard_uri(run, stage, step, index)}: missing or not a complete shard"
            )
        return table_to_records(self._shard_table(shard, cls, self.step_uri(run, stage, step)), cls)

    def read_dataset(
        self,
        run: str,
        stage: str,
        step: str,
        record_type: type[ArrowRecord] | str,
        fingerprint: str | None = None,
    ) -> datasets.Dataset:
        """A step as an in-memory `datasets.Dataset` (what TRL trainers take)."""
        import datasets

        return datasets.Dataset(self.read_table(run, stage, step, record_type, fingerprint))

    # -- run files ---------------------------------------------------------------------------

    def write_json(self, relative_path: str, obj: Any) -> None:
        """Write `obj` (JSON-able or pydantic) at a root-relative path, atomically."""
        data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
        text = json.dumps(data, indent=2, sort_keys=True, default=_json_default)
        self._write_bytes(self._path(relative_path), text.encode("utf-8"))

    def read_json(self, relative_path: str) -> Any | None:
        """The JSON at a root-relative path, or None if there is none."""
        data = self._read_bytes(self._path(relative_path))
        if data is None:
            return None
        try:
            return json.loads(data)
        except json.JSONDecodeError as err:
            raise StorageError(
                f"{self._uri(self._relative(relative_path))}: bad JSON: {err}"
            ) from err

    def list_runs(self) -> list[str]:
        """Names of the runs under the root, sorted."""
        directory = self._path("runs")
        self.fs.invalidate_cache(directory)
        try:
            entries = self.fs.ls(directory, detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            posixpath.basename(entry["name"].rstrip("/"))
            for entry in entries
            if entry.get("type") == "directory"
        )

    # -- checkpoint directories --------------------------------------------------------------

    def upload_dir(self, local_dir: str | Path, uri: str) -> int:
        """Sync a local directory to `uri` (inside the root); returns the number of files sent.

        Files whose sha256 matches the last sync are skipped. The sync marker listing every file
        is removed first and written last, so an interrupted upload is never taken as complete.
        Remote files no longer present locally are left in place but are not part of the marker.
        """
        local = Path(local_dir)
        if not local.is_dir():
            raise FileNotFoundError(f"upload_dir: {local} is not a directory")
        remote = self._path(uri)
        marker_path = f"{remote}/{SYNC_MARKER_NAME}"
        previous = self._read_sync_marker(marker_path) or {}
        self._remove(marker_path)
        files: dict[str, dict[str, Any]] = {}
        sent = 0
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            relative = file.relative_to(local).as_posix()
            if relative == SYNC_MARKER_NAME:
                continue
            digest = _file_sha256(file)
            files[relative] = {"size": file.stat().st_size, "sha256": digest}
            if previous.get(relative, {}).get("sha256") == digest and self.fs.exists(
                f"{remote}/{relative}"
            ):
                continue
            self._put_file(file, f"{remote}/{relative}")
            sent += 1
        marker = {"files": files, "synced_at": datetime.now(UTC).isoformat(timespec="seconds")}
        self._write_bytes(marker_path, json.dumps(marker, indent=2, sort_keys=True).encode())
        return sent

    def _put_file(self, local_file: Path, path: str) -> None:
        if self._local:
            self._write_bytes(path, local_file.read_bytes())
        else:
            self.fs.put_file(str(local_file), path)

    def _read_sync_marker(self, marker_path: str) -> dict[str, dict[str, Any]] | None:
        data = self._read_bytes(marker_path)
        return None if data is None else json.loads(data)["files"]

    def download_dir(self, uri: str, local_dir: str | Path) -> Path:
        """Copy a directory synced by `upload_dir` to local disk, verifying every file's sha256."""
        remote = self._path(uri)
        files = self._read_sync_marker(f"{remote}/{SYNC_MARKER_NAME}")
        if files is None:
            raise FileNotFoundError(
                f"{uri}: no completed upload here (no {SYNC_MARKER_NAME}; missing or interrupted)"
            )
        local = Path(local_dir)
        for relative, entry in sorted(files.items()):
            target = local / relative
            if target.is_file() and _file_sha256(target) == entry["sha256"]:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            data = self._read_bytes(f"{remote}/{relative}")
            if data is None or _sha256(data) != entry["sha256"]:
                raise StorageError(f"{uri}/{relative}: missing or changed since it was uploaded")
            temp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
            temp.write_bytes(data)
            os.replace(temp, target)
        return local


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
