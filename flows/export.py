"""`avr export RUN STEP --format F --out URI`: a sealed step as a trainer's or evaluator's dataset.

Reads the step's records (sealed steps only: the manifest says every shard is final), converts
them with `avr_core.exports`, validates the rows (rules, round trip, the installed libraries' own
loading of the very bytes written), then writes the file whole (temp + rename on a local disk, one
PUT on an object store) plus the side file a format needs (LLaMA-Factory's `dataset_info.json`).
`--push-to-hub REPO` hands the same rows to `datasets`' `push_to_hub` (a private dataset) when
credentials exist.

A plain function, like `avr show`: an export is a read and a write, with nothing to retry or
schedule that would be worth a Prefect flow run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from avr_core.exports import (
    FORMATS,
    ExportError,
    ExportOptions,
    check_export,
    check_out_name,
    convert_records,
    encode_rows,
    llamafactory_dataset_info,
    usage_hint,
)
from avr_core.layout import RunLayout, StepRef
from avr_core.rootfs import RootFS, StorageError
from avr_core.settings import AvrSettings
from avr_core.storage import DatasetStore, StepStatus
from flows.config_files import ConfigError
from flows.inspect_runs import find_step, open_store, require_run

__all__ = [
    "ExportResult",
    "add_export_arguments",
    "export_step",
    "push_rows_to_hub",
    "run_export",
]

DATASET_INFO = "dataset_info.json"


class ExportResult(BaseModel):
    """What `export_step` wrote, what it checked, and how the file is used."""

    run: str
    stage: str
    step: str
    record_type: str
    format: str
    rows: int
    uri: str = Field(description="the written data file")
    side_files: list[str] = Field(default_factory=list, description="e.g. dataset_info.json")
    checks: list[str] = Field(default_factory=list, description="validations that passed")
    skipped: list[str] = Field(default_factory=list, description="library checks not run, why")
    usage: str = Field("", description="how the format's trainer or evaluator reads the file")
    pushed_to: str | None = Field(None, description="the Hub dataset, with --push-to-hub")


def _sealed_step(store: DatasetStore, run: str, wanted: str) -> StepStatus:
    """The step `wanted` (`stage/step` or a unique step name) of `run`, which must be sealed."""
    require_run(store, run)
    status = find_step(store.list_steps(run), wanted, run)
    if status.status != "complete":
        uri = store.uri(RunLayout(run).step(StepRef(status.stage, status.step)))
        raise ConfigError(
            f"{uri} has no manifest ({status.status}, {status.shards} shards): the step has not "
            "finished, and only a sealed step is exported"
        )
    return status


def _output_files(out_uri: str, storage_options: dict[str, Any] | None) -> tuple[RootFS, str]:
    """The directory `out_uri` is in (as a RootFS: atomic writes) and the file's name."""
    if "://" in out_uri:
        directory, _, name = out_uri.rpartition("/")
    else:
        path = Path(out_uri).expanduser().resolve()
        directory, name = path.parent.as_uri(), path.name
    if not name or directory.endswith(":/"):
        raise ConfigError(f"--out {out_uri!r} must name a file, e.g. s3://bucket/dir/pairs.jsonl")
    remote = "://" in out_uri and not out_uri.startswith("file://")
    return RootFS(directory, storage_options if remote else None), name


def _validated_rows(
    fmt: str,
    record_type: str,
    records: list[Any],
    options: ExportOptions,
    tokenizer: Any,
    file_name: str,
) -> tuple[list[dict[str, Any]], bytes, list[str], list[str]]:
    """Rows, the file's bytes, passed checks and skipped checks; the bytes are validated from a
    local copy, so what the libraries read back is exactly what will be written."""
    conversion = convert_records(fmt, record_type, records, options)
    data = encode_rows(fmt, conversion.rows)
    with tempfile.TemporaryDirectory(prefix="avr-export-") as scratch:
        local = Path(scratch) / file_name
        local.write_bytes(data)
        check = check_export(
            fmt,
            record_type,
            conversion.rows,
            expected=conversion.expected,
            tokenizer=tokenizer,
            data_file=str(local),
        )
    return conversion.rows, data, check.passed, check.skipped


def _write_dataset_info(files: RootFS, file_name: str, record_type: str) -> str:
    """Add this file's entry to the directory's `dataset_info.json` (other entries are kept, so
    several steps exported to one directory load with one `dataset_dir`)."""
    name, entry = llamafactory_dataset_info(file_name, record_type)
    try:
        info = files.read_json(DATASET_INFO) or {}
    except StorageError as err:
        raise ConfigError(f"{files.uri(DATASET_INFO)} exists but is not valid JSON") from err
    if not isinstance(info, dict):
        raise ConfigError(f"{files.uri(DATASET_INFO)} exists but is not a JSON object")
    info[name] = entry
    files.write_json(DATASET_INFO, info)
    return files.uri(DATASET_INFO)


def push_rows_to_hub(rows: list[dict[str, Any]], repo_id: str) -> str:
    """Push the rows as a private Hub dataset with `datasets`' own `push_to_hub`; needs a token."""
    # Loaded here: only a push needs them, and `avr` should start without `datasets`.
    import datasets  # noqa: PLC0415
    from huggingface_hub import get_token  # noqa: PLC0415

    if get_token() is None:
        raise ConfigError(
            f"--push-to-hub {repo_id}: no Hugging Face credentials (set HF_TOKEN or run "
            "`hf auth login`); the file was written, nothing was pushed"
        )
    datasets.Dataset.from_list(rows).push_to_hub(repo_id, private=True)
    return f"https://huggingface.co/datasets/{repo_id}"


def export_step(
    store: DatasetStore,
    run: str,
    step: str,
    fmt: str,
    out_uri: str,
    round: int | None = None,
    push_to_hub: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    tokenizer: Any = None,
) -> ExportResult:
    """Write a sealed step of `run` to `out_uri` in `fmt`, validated first (see module doc).

    `step` is `stage/step` or a unique step name; `round` picks a RefinedAnswers round for
    alpaca-eval (default: the last); `storage_options` reach a remote `out_uri` (default: the
    store's); `tokenizer` lets the TRL check render one pair through TRL's chat template.
    A user error (no such step, unsealed, a row the format cannot hold) raises ConfigError.
    """
    status = _sealed_step(store, run, step)
    files, name = _output_files(
        out_uri, store.storage_options if storage_options is None else storage_options
    )
    manifest = store.read_manifest(run, status.stage, status.step)
    if manifest is None:  # removed since it was listed
        raise ConfigError(f"{run}/{status.stage}/{status.step} lost its manifest while exporting")
    record_type = manifest.record_type
    records = store.read_records(run, status.stage, status.step, record_type)
    if not records:
        raise ConfigError(f"{run}/{status.stage}/{status.step} holds no rows: nothing to export")
    options = ExportOptions(round=round, generator=status.step, dataset=run)
    try:
        check_out_name(fmt, name)
        rows, data, passed, skipped = _validated_rows(
            fmt, record_type, records, options, tokenizer, name
        )
    except ExportError as err:
        raise ConfigError(str(err)) from err
    files.write_bytes(name, data)
    side_files = [_write_dataset_info(files, name, record_type)] if fmt == "llamafactory" else []
    return ExportResult(
        run=run,
        stage=status.stage,
        step=status.step,
        record_type=record_type,
        format=fmt,
        rows=len(rows),
        uri=files.uri(name),
        side_files=side_files,
        checks=passed,
        skipped=skipped,
        usage=usage_hint(fmt, record_type, files.uri(name)),
        pushed_to=push_rows_to_hub(rows, push_to_hub) if push_to_hub else None,
    )


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `avr export` (for its subparser in flows/cli.py)."""
    parser.add_argument("run", help="run name (see `avr runs`)")
    parser.add_argument("step", help="stage/step or a unique step name (a sealed step)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the dataset format")
    parser.add_argument("--out", required=True, help="file path or URI (s3://...) to write")
    parser.add_argument("--root", default="avr-output", help="storage root (default: ./avr-output)")
    parser.add_argument(
        "--round", type=int, help="refinement round of a RefinedAnswers step (default: the last)"
    )
    parser.add_argument("--push-to-hub", metavar="REPO", help="also push to this Hub dataset")
    parser.add_argument(
        "--tokenizer",
        help="tokenizer (path or name) whose chat template the TRL check renders one example with",
    )


def _load_tokenizer(name: str | None) -> Any:
    if name is None:
        return None
    from transformers import AutoTokenizer  # noqa: PLC0415 - only with --tokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--tokenizer {name!r} does not load: {err}") from err


def run_export(args: argparse.Namespace, settings: AvrSettings) -> int:
    """`avr export`: export, then print what was written, checked and skipped, and how to use it."""
    store = open_store(args.root, settings)
    result = export_step(
        store,
        args.run,
        args.step,
        args.format,
        args.out,
        round=args.round,
        push_to_hub=args.push_to_hub,
        storage_options=settings.storage_options,
        tokenizer=_load_tokenizer(args.tokenizer),
    )
    print(
        f"{result.stage}/{result.step} ({result.record_type}): {result.rows} rows -> {result.uri}"
    )
    for side_file in result.side_files:
        print(f"  wrote {side_file}")
    for line in result.checks:
        print(f"  checked  {line}")
    for line in result.skipped:
        print(f"  skipped  {line}")
    if result.pushed_to:
        print(f"  pushed   {result.pushed_to}")
    print(f"use: {result.usage}")
    return 0
