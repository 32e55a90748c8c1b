"""The dataset store: Parquet shards and manifests of every step, under one fsspec root.

Locations come from `avr_core.layout`; whole-file atomic I/O from `avr_core.rootfs`.

A shard is the unit of checkpointing. Its file appears whole or not at all (`RootFS.write_bytes`).
Its Parquet footer makes it self-describing: the step's config fingerprint, a digest of the input
shards it was computed from, a digest of its own rows, and its statistics. A shard counts as
committed only if all of these check out:
- the footer parses (a truncated file is an interrupted write) and names the asked fingerprint
  (a shard from an older config is recomputed, never reused);
- its inputs digest is the one the current inputs give (an upstream shard that was recomputed
  since re-derives this one);
- its rows hash to the footer's content digest, or, where a manifest of the same fingerprint
  lists it, its bytes hash to the manifest's sha256 (a shard edited or swapped behind the
  factory's back is recomputed, never re-sealed).
The manifest is written last: its presence means every listed shard is final, and it records each
shard's sha256 so later changes are detected on read.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from avr_core.hashing import sha256_hex
from avr_core.layout import (
    CHECKPOINTS,
    MANIFEST_NAME,
    RECORDS,
    REPORTS,
    RUNS,
    RunLayout,
    StepRef,
    shard_index,
)
from avr_core.rootfs import RootFS, StorageError, StorageRetry, StorageUnreachableError
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
    "ShardInfo",
    "StepIncompleteError",
    "StepStatus",
    "StorageError",
    "StorageUnreachableError",
    "TOKEN_COUNTERS",
    "content_digest",
    "inputs_digest",
    "token_totals",
]

logger = logging.getLogger(__name__)

# Keys of the Parquet footer's key-value metadata that make a shard self-describing.
META_FINGERPRINT = b"avr.fingerprint"
META_RECORD_TYPE = b"avr.record_type"
META_SCHEMA_VERSION = b"avr.schema_version"
META_SHARD_INDEX = b"avr.shard_index"
META_ROWS = b"avr.rows"
META_STATS = b"avr.stats"
META_CONTENT = b"avr.content_sha256"
META_INPUTS = b"avr.inputs_sha256"


class StepIncompleteError(StorageError):
    """A step cannot be sealed: some of its shards are not committed yet."""


class ShardInfo(BaseModel):
    """One completed shard: where it is, how many rows, the sha256 of its file bytes."""

    index: int
    path: str
    rows: int
    sha256: str
    fingerprint: str
    content_sha256: str = Field(
        "", description="digest of its rows (`content_digest`), stable across re-encodings"
    )

    @property
    def rows_digest(self) -> str:
        """What downstream shards depend on: the rows (the file's sha256 for older shards)."""
        return self.content_sha256 or self.sha256


class Manifest(BaseModel):
    """The completed step: written last, so its presence means every listed shard is final."""

    schema_version: str
    record_type: str
    fingerprint: str
    shards: list[ShardInfo]
    total_rows: int
    created_at: str
    tokens: dict[str, int] = Field(
        default_factory=dict,
        description="the shards' engine token totals (prompt_tokens, completion_tokens); empty "
        "for a step that calls no generator, or one sealed before tokens were counted",
    )

    def shard(self, index: int) -> ShardInfo:
        """The listed shard `index` (KeyError if the manifest does not list it)."""
        for info in self.shards:
            if info.index == index:
                return info
        raise KeyError(f"shard {index} is not in this manifest")

    @property
    def content_digest(self) -> str:
        """Digest of every listed shard's bytes: changes whenever any shard's content does."""
        listing = [[info.index, info.sha256] for info in sorted(self.shards, key=lambda s: s.index)]
        return sha256_hex(json.dumps(listing).encode())


class StepStatus(BaseModel):
    """What storage says about one step of a run (for `avr runs` / `avr show`)."""

    stage: str
    step: str
    status: Literal["complete", "partial", "empty"]
    rows: int | None = None
    shards: int = 0
    shards_total: int | None = Field(
        None, description="a partial step: the shards it will have, when its run recorded it"
    )
    record_type: str | None = None
    fingerprint: str | None = None
    tokens: dict[str, int] = Field(
        default_factory=dict, description="a complete step's token totals (its manifest's)"
    )


class CommittedShard(NamedTuple):
    """A committed shard as found on storage: its info and the stats in its footer."""

    info: ShardInfo
    stats: dict[str, Any]


class _ShardFile(NamedTuple):
    """A whole shard file as read: its info, bytes, footer record type, stats and digests."""

    info: ShardInfo
    data: bytes
    record_type: str
    stats: dict[str, Any]
    content_sha256: str = ""
    inputs_sha256: str = ""


def content_digest(table: pa.Table) -> str:
    """sha256 of a table's rows as canonical JSON: independent of Parquet encoding and footer.

    Hashing values rather than file bytes lets a shard carry its own digest in its footer, and
    keeps the digest stable across pyarrow versions that encode the same rows differently.
    """
    rows = table.replace_schema_metadata(None).to_pylist()
    text = json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return sha256_hex(text.encode("utf-8"))


def inputs_digest(source_shas: list[str]) -> str:
    """Digest of the input shards one shard was computed from (their rows digests, in order).

    Rows, not file bytes: a source shard recomputed with the same rows (a deterministic engine)
    re-derives nothing downstream, though its footer's timings differ.
    """
    return sha256_hex(json.dumps(source_shas).encode()) if source_shas else ""


TOKEN_COUNTERS = ("prompt_tokens", "completion_tokens")


def token_totals(shard_stats: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """The token counters summed over shards' footer statistics; only counters some shard has."""
    totals: dict[str, int] = {}
    for stats in shard_stats:
        counts = stats.get("counts") or {}
        for name in TOKEN_COUNTERS:
            if isinstance(counts.get(name), int):
                totals[name] = totals.get(name, 0) + counts[name]
    return totals


def _record_class(record_type: type[ArrowRecord] | str) -> type[ArrowRecord]:
    """The record class for a class or its name (`"RefinementTree"`)."""
    if isinstance(record_type, str):
        if record_type not in RECORD_TYPES:
            raise ValueError(
                f"unknown record type {record_type!r}; known: {', '.join(sorted(RECORD_TYPES))}"
            )
        return RECORD_TYPES[record_type]
    return record_type


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
    """Parquet shards, manifests and run records under one fsspec root."""

    def __init__(
        self,
        root: str,
        storage_options: dict[str, Any] | None = None,
        retry: StorageRetry | None = None,
    ) -> None:
        self.files = RootFS(root, storage_options, retry=retry)
        self.root: str = self.files.root
        self.storage_options: dict[str, Any] = self.files.storage_options
        self.fs = self.files.fs

    def __repr__(self) -> str:
        return f"DatasetStore({self.root!r})"

    # -- locations ---------------------------------------------------------------------------

    def uri(self, relative: str) -> str:
        """Full URI of a root-relative layout path."""
        return self.files.uri(relative)

    def step_uri(self, run: str, stage: str, step: str) -> str:
        """URI of a step directory: {root}/runs/{run}/{stage}/{step}."""
        return self.uri(RunLayout(run).step(StepRef(stage, step)))

    def shard_uri(self, run: str, stage: str, step: str, index: int) -> str:
        """URI of shard `index` of a step."""
        return self.uri(RunLayout(run).shard(StepRef(stage, step), index))

    def checkpoint_uri(self, run: str, train_step: str) -> str:
        """URI where a training step's checkpoints are synced."""
        return self.uri(RunLayout(run).checkpoints(train_step))

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
        stats: dict[str, Any] | None = None,
        inputs: str = "",
    ) -> ShardInfo:
        """Commit one shard atomically; replaces an older shard.

        Its footer records the fingerprint, the digest of the `inputs` it was computed from
        (`inputs_digest` of the source shards; "" for a step written from memory), a digest of its
        rows and its statistics.
        """
        cls = _record_class(record_type)
        layout, ref = RunLayout(run), StepRef(stage, step)
        table = records_to_table(records, cls)
        rows_digest = content_digest(table)
        data = _parquet_bytes(
            table,
            {
                META_FINGERPRINT: fingerprint.encode(),
                META_CONTENT: rows_digest.encode(),
                META_INPUTS: inputs.encode(),
                META_RECORD_TYPE: cls.__name__.encode(),
                META_SCHEMA_VERSION: SCHEMA_VERSION.encode(),
                META_SHARD_INDEX: str(index).encode(),
                META_ROWS: str(table.num_rows).encode(),
                META_STATS: json.dumps(stats or {}, sort_keys=True).encode(),
            },
        )
        # A manifest vouches for the shards as they were; once one changes the step is open again.
        self.files.remove(layout.manifest(ref))
        self.files.write_bytes(layout.shard(ref, index), data)
        return ShardInfo(
            index=index,
            path=self.uri(layout.shard(ref, index)),
            rows=table.num_rows,
            sha256=sha256_hex(data),
            fingerprint=fingerprint,
            content_sha256=rows_digest,
        )

    def shard_versions(self, run: str, ref: StepRef) -> dict[int, str]:
        """Each shard file of a step with a token that changes whenever it is rewritten: one
        listing, no reads (how a scaled-out step's parent follows its children's commits)."""
        versions = self.files.list_versions(RunLayout(run).step(ref))
        return {i: v for name, v in versions.items() if (i := shard_index(name)) is not None}

    def _shard_indices(self, run: str, stage: str, step: str) -> list[int]:
        names = self.files.list_names(RunLayout(run).step(StepRef(stage, step)))
        return sorted(i for i in map(shard_index, names) if i is not None)

    def _scan_shards(self, run: str, stage: str, step: str) -> Iterator[_ShardFile]:
        """Every shard of a step that is a whole Parquet file, in index order, whatever its config."""
        for index in self._shard_indices(run, stage, step):
            shard = self._load_shard_file(run, stage, step, index)
            if shard is not None:
                yield shard

    def _load_shard_file(self, run: str, stage: str, step: str, index: int) -> _ShardFile | None:
        """Shard `index` with its bytes, or None if it is missing or not a whole file."""
        relative = RunLayout(run).shard(StepRef(stage, step), index)
        uri = self.uri(relative)
        data = self.files.read_bytes(relative)
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
            sha256=sha256_hex(data),
            fingerprint=metadata.get(META_FINGERPRINT, b"").decode(),
            content_sha256=metadata.get(META_CONTENT, b"").decode(),
        )
        stats = json.loads(metadata.get(META_STATS, b"{}") or b"{}")
        return _ShardFile(
            info,
            data,
            metadata.get(META_RECORD_TYPE, b"").decode(),
            stats,
            metadata.get(META_CONTENT, b"").decode(),
            metadata.get(META_INPUTS, b"").decode(),
        )

    def _readable_manifest(self, run: str, ref: StepRef) -> Manifest | None:
        """The step's manifest, or None if it is missing or unreadable (an edited manifest)."""
        try:
            return self.read_manifest(run, *ref)
        except StorageError as err:
            logger.warning("%s: ignoring the manifest: %s", self.step_uri(run, *ref), err)
            return None

    def _why_not_committed(
        self, shard: _ShardFile, fingerprint: str, inputs: str | None, vouched: ShardInfo | None
    ) -> str | None:
        """Why `shard` cannot count as committed under `fingerprint` and `inputs`; None if it can.

        `vouched` is the shard as listed by a manifest of the same fingerprint, if any: matching
        its sha256 proves the content without parsing it.
        """
        if shard.info.fingerprint != fingerprint:
            return f"written with fingerprint {shard.info.fingerprint or '(none)'}"
        if inputs is not None and shard.inputs_sha256 != inputs:
            return "computed from inputs that have changed since"
        if vouched is not None:
            if vouched.sha256 != shard.info.sha256:
                return "changed after the manifest was written"
            return None
        try:
            table = pq.read_table(pa.BufferReader(shard.data))
        except (pa.ArrowException, OSError) as err:
            return f"not readable: {err}"
        if not shard.content_sha256 or content_digest(table) != shard.content_sha256:
            return "its rows do not match the content digest in its footer"
        return None

    def committed_shards(
        self,
        run: str,
        stage: str,
        step: str,
        fingerprint: str,
        inputs: Mapping[int, str] | None = None,
    ) -> dict[int, CommittedShard]:
        """Shards of a step that are committed under `fingerprint`, with their stats.

        `inputs` maps shard index -> expected `inputs_digest` (None: a step without sources).
        A shard that fails a check is logged and left out, so the caller recomputes it.
        """
        return {
            index: CommittedShard(shard.info, shard.stats)
            for index, shard in self._verified_shards(
                run, StepRef(stage, step), fingerprint, inputs
            ).items()
        }

    def _verified_shards(
        self, run: str, ref: StepRef, fingerprint: str, inputs: Mapping[int, str] | None
    ) -> dict[int, _ShardFile]:
        manifest = self._readable_manifest(run, ref)
        vouching = (
            {info.index: info for info in manifest.shards}
            if manifest is not None and manifest.fingerprint == fingerprint
            else {}
        )
        verified = {}
        for shard in self._scan_shards(run, *ref):
            index = shard.info.index
            expected_inputs = None if inputs is None else inputs.get(index, "")
            why = self._why_not_committed(shard, fingerprint, expected_inputs, vouching.get(index))
            if why is None:
                verified[index] = shard
            elif shard.info.fingerprint == fingerprint:
                # Only worth a warning when it would otherwise have been reused.
                logger.warning("%s: not reused, will be recomputed: %s", shard.info.path, why)
        return verified

    def completed_shards(
        self,
        run: str,
        stage: str,
        step: str,
        fingerprint: str,
        inputs: Mapping[int, str] | None = None,
    ) -> dict[int, ShardInfo]:
        """Shards of a step committed under `fingerprint` (and `inputs`), by index."""
        return {
            i: c.info
            for i, c in self.committed_shards(run, stage, step, fingerprint, inputs).items()
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
        expected = None if expected_shards is None else range(expected_shards)
        return self.seal(run, StepRef(stage, step), record_type, fingerprint, expected)[0]

    def seal(
        self,
        run: str,
        ref: StepRef,
        record_type: type[ArrowRecord] | str,
        fingerprint: str,
        expected: range | list[int] | None = None,
        inputs: Mapping[int, str] | None = None,
    ) -> tuple[Manifest, dict[int, dict[str, Any]]]:
        """Write the manifest over the `expected` shard indices; returns it and per-shard stats.

        Only shards that pass the commit checks (fingerprint, `inputs`, content) are sealed.
        """
        cls = _record_class(record_type)
        where = self.step_uri(run, *ref)
        by_index = self._verified_shards(run, StepRef(*ref), fingerprint, inputs)
        if expected is not None:
            missing = sorted(set(expected) - set(by_index))
            if missing:
                raise StepIncompleteError(
                    f"{where}: cannot write the manifest, shards {missing} are not committed "
                    f"with fingerprint {fingerprint} and the current inputs"
                )
            by_index = {i: s for i, s in by_index.items() if i in set(expected)}
        other_types = {s.record_type for s in by_index.values()} - {cls.__name__}
        if other_types:
            raise SchemaMismatchError(
                f"{where}: shards hold {sorted(other_types)} records, not {cls.__name__}"
            )
        ordered = [by_index[i].info for i in sorted(by_index)]
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            record_type=cls.__name__,
            fingerprint=fingerprint,
            shards=ordered,
            total_rows=sum(info.rows for info in ordered),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            tokens=token_totals(s.stats for s in by_index.values()),
        )
        self.files.write_bytes(
            RunLayout(run).manifest(ref), manifest.model_dump_json(indent=2).encode()
        )
        return manifest, {i: s.stats for i, s in sorted(by_index.items())}

    def read_manifest(self, run: str, stage: str, step: str) -> Manifest | None:
        """The step's manifest, or None if the step has not been sealed."""
        relative = RunLayout(run).manifest(StepRef(stage, step))
        data = self.files.read_bytes(relative)
        if data is None:
            return None
        try:
            return Manifest.model_validate_json(data)
        except ValueError as err:
            raise StorageError(f"{self.uri(relative)}: not a valid manifest: {err}") from err

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
        layout, ref = RunLayout(run), StepRef(stage, step)
        for info in sorted(manifest.shards, key=lambda s: s.index):
            # Found by index under this root, so a run directory copied elsewhere still reads.
            relative = layout.shard(ref, info.index)
            data = self.files.read_bytes(relative)
            if data is None:
                raise StorageError(f"{self.uri(relative)}: listed in the manifest but missing")
            if sha256_hex(data) != info.sha256:
                raise StorageError(f"{self.uri(relative)}: changed after the manifest was written")
            shards.append(_ShardFile(info, data, manifest.record_type, {}))
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
        self,
        run: str,
        stage: str,
        step: str,
        index: int,
        record_type: type[ArrowRecord] | str,
        sha256: str | None = None,
    ) -> list[ArrowRecord]:
        """The records of one shard (e.g. shard i of the input step, to compute shard i).

        With `sha256` (from the step's manifest) a shard changed since it was sealed is an error.
        """
        cls = _record_class(record_type)
        shard = self._load_shard_file(run, stage, step, index)
        if shard is None:
            raise StorageError(
                f"{self.shard_uri(run, stage, step, index)}: missing or not a complete shard"
            )
        if sha256 is not None and shard.info.sha256 != sha256:
            raise StorageError(
                f"{shard.info.path}: changed after the manifest was written; re-run the step "
                f"that writes {stage}/{step} to recompute it"
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

    # -- run records and listings ------------------------------------------------------------

    def write_json(self, relative_path: str, obj: Any) -> None:
        """Write `obj` (JSON-able or pydantic) at a root-relative layout path, atomically."""
        self.files.write_json(relative_path, obj)

    def read_json(self, relative_path: str) -> Any | None:
        """The JSON at a root-relative layout path, or None if there is none."""
        return self.files.read_json(relative_path)

    def check_reachable(self) -> None:
        """Write, read back and delete a probe under the root; fail clearly if that fails."""
        self.files.check_reachable()

    def list_runs(self) -> list[str]:
        """Names of the runs under the root, sorted."""
        return self.files.list_names(RUNS, "directory")

    def _planned_shards(self, run: str, ref: StepRef) -> int | None:
        """The shard count the step's last run planned (`_plan.json`), or None. For display
        only: a damaged file just leaves the total out."""
        try:
            plan = self.read_json(RunLayout(run).step_plan(ref))
        except StorageError:
            return None
        total = plan.get("shards") if isinstance(plan, dict) else None
        return total if isinstance(total, int) else None

    def list_steps(self, run: str) -> list[StepStatus]:
        """Every {stage}/{step} of a run with its status (checkpoints and records excluded)."""
        layout = RunLayout(run)
        statuses = []
        for stage in self.files.list_names(layout.directory, "directory"):
            if stage.startswith(("_", ".")) or stage in (CHECKPOINTS, RECORDS, REPORTS):
                continue
            for step in self.files.list_names(f"{layout.directory}/{stage}", "directory"):
                if step.startswith(("_", ".")):
                    continue
                manifest = self.read_manifest(run, stage, step)
                if manifest is not None:
                    statuses.append(
                        StepStatus(
                            stage=stage,
                            step=step,
                            status="complete",
                            rows=manifest.total_rows,
                            shards=len(manifest.shards),
                            record_type=manifest.record_type,
                            fingerprint=manifest.fingerprint,
                            tokens=manifest.tokens,
                        )
                    )
                    continue
                shards = len(self._shard_indices(run, stage, step))
                status = "partial" if shards else "empty"
                statuses.append(
                    StepStatus(
                        stage=stage,
                        step=step,
                        status=status,
                        shards=shards,
                        shards_total=self._planned_shards(run, StepRef(stage, step)),
                    )
                )
        return statuses
