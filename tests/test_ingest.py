"""Prompt ingestion from JSON lines, Parquet and saved `datasets`, locally and on S3 (moto)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from avr_core.ingest import (
    BadRowError,
    bundled_prompts_path,
    is_retryable_ingest_error,
    prompt_id_for,
    read_prompts,
    source_sha256,
)
from avr_core.schemas import Constraint, Message, PromptRecord, records_to_table
from avr_core.steps import ShardsFailedError
from tests.fixtures_s3 import S3Location

SYSTEM = {"role": "system", "content": "You are terse."}
CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And times 3?"},
]
GOOD_ROWS: list[dict[str, Any]] = [
    {
        "prompt": "Name three rivers.",
        "constraints": [{"type": "word_count", "args": {"min": 3, "max": 30}}],
        "id": "r-1",
        "source": "geo",
    },
    {
        "messages": [SYSTEM, *CHAT],
        "constraints": [{"type": "include_keywords", "args": {"keywords": ["twelve"]}}],
        "id": "r-2",
    },
]


def uniform(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row with every column (None where absent): table builders take the first row's keys."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [{column: row.get(column) for column in columns} for row in rows]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_jsonl_gz(path: Path, rows: list[dict[str, Any]]) -> str:
    target = path.with_name(path.name + ".gz")
    target.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    return str(target)


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> str:
    target = path.with_suffix(".parquet")
    pq.write_table(pa.Table.from_pylist(uniform(rows)), target)
    return str(target)


def write_saved_dataset(path: Path, rows: list[dict[str, Any]]) -> str:
    target = path.with_suffix(".hf")
    datasets.Dataset.from_list(uniform(rows)).save_to_disk(str(target))
    return str(target)


def write_saved_dataset_dict(path: Path, rows: list[dict[str, Any]]) -> str:
    target = path.with_suffix(".hfdict")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(uniform(rows))}).save_to_disk(
        str(target)
    )
    return str(target)


WRITERS: dict[str, Callable[[Path, list[dict[str, Any]]], str]] = {
    "jsonl": write_jsonl,
    "jsonl.gz": write_jsonl_gz,
    "parquet": write_parquet,
    "datasets": write_saved_dataset,
    "datasets-dict": write_saved_dataset_dict,
}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_each_format_gives_the_same_records(fmt: str, tmp_path: Path) -> None:
    source = WRITERS[fmt](tmp_path / "prompts.jsonl", GOOD_ROWS)
    result = read_prompts(source)
    assert (result.rejects, result.duplicates, result.rejects_path) == (0, 0, None)
    first, second = result.prompts
    assert first.messages == [Message(role="user", content="Name three rivers.")]
    assert first.constraints == [Constraint(type="word_count", args={"min": 3, "max": 30})]
    assert first.source == "geo#r-1"
    assert [m.model_dump() for m in second.messages] == [SYSTEM, *CHAT]
    assert second.constraints == [
        Constraint(type="include_keywords", args={"keywords": ["twelve"]})
    ]
    assert second.source == f"{Path(source).name}#r-2"
    # Ids depend on the conversation only, so every format gives the same ones.
    assert first.prompt_id == prompt_id_for([{"role": "user", "content": "Name three rivers."}])
    assert second.prompt_id == prompt_id_for([SYSTEM, *CHAT])


def test_prompt_and_single_user_message_share_an_id(tmp_path: Path) -> None:
    as_prompt = read_prompts(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hi there"}]))
    as_messages = read_prompts(
        write_parquet(tmp_path / "b", [{"messages": [{"role": "user", "content": "hi there"}]}])
    )
    assert as_prompt.prompts[0].prompt_id == as_messages.prompts[0].prompt_id


def test_prompt_ids_are_content_hashes() -> None:
    base = prompt_id_for([Message(role="user", content="x")])
    assert base == prompt_id_for([{"role": "user", "content": "x"}])
    assert len(base) == 16 and int(base, 16) >= 0
    assert base != prompt_id_for([{"role": "user", "content": "x "}])
    assert base != prompt_id_for(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]
    )


def test_duplicates_keep_the_first(tmp_path: Path) -> None:
    rows = [
        {"prompt": "same", "source": "first"},
        {"prompt": "other"},
        {"messages": [{"role": "user", "content": "same"}], "source": "second"},
        {"prompt": "same", "source": "third"},
    ]
    result = read_prompts(write_jsonl(tmp_path / "d.jsonl", rows))
    assert result.duplicates == 2
    assert [p.messages[0].content for p in result.prompts] == ["same", "other"]
    assert result.prompts[0].source == "first"


BAD_ROWS: dict[str, tuple[Any, str]] = {
    "missing prompt": ({"text": "no prompt here"}, "prompt"),
    "empty prompt": ({"prompt": "   "}, "prompt"),
    "non-string prompt": ({"prompt": 42}, "prompt"),
    "empty messages": ({"messages": []}, "messages"),
    "starts with assistant": (
        {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]},
        "messages[0].role",
    ),
    "ends with assistant": ({"messages": CHAT[:2]}, "messages"),
    "two user turns": (
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        "messages[1].role",
    ),
    "system not first": ({"messages": [CHAT[0], SYSTEM, CHAT[0]]}, "messages[1].role"),
    "unknown role": ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
    "non-string content": ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
    "turn not an object": ({"messages": ["hello"]}, "messages[0]"),
    "unknown constraint": ({"prompt": "p", "constraints": [{"type": "rhymes"}]}, "constraints[0]"),
    "bad constraint args": (
        {"prompt": "p", "constraints": [{"type": "word_count", "args": {"min": -1}}]},
        "constraints[0]",
    ),
    "not an object": ([1, 2], "<line>"),
}


def _bad_file(tmp_path: Path, bad: Any) -> str:
    """JSON lines: two good rows, the bad one at row 2, one more good row."""
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(r) for r in GOOD_ROWS] + [json.dumps(bad), json.dumps({"prompt": "last"})]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_bad_row_raises_naming_file_row_and_field(kind: str, tmp_path: Path) -> None:
    bad, field = BAD_ROWS[kind]
    source = _bad_file(tmp_path, bad)
    with pytest.raises(BadRowError) as err:
        read_prompts(source)
    assert (err.value.file, err.value.row, err.value.field) == (source, 2, field)
    assert source in str(err.value) and "row 2" in str(err.value) and field in str(err.value)


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_bad_row_is_skipped_to_rejects(kind: str, tmp_path: Path) -> None:
    bad, field = BAD_ROWS[kind]
    source = _bad_file(tmp_path, bad)
    result = read_prompts(source, on_bad_row="skip")
    assert result.rejects == 1
    assert [p.messages[-1].content for p in result.prompts] == [
        "Name three rivers.",
        "And times 3?",
        "last",
    ]
    assert result.rejects_path == source + ".rejects.jsonl"
    (reject,) = [json.loads(line) for line in Path(result.rejects_path).read_text().splitlines()]
    assert (reject["row"], reject["field"], reject["file"]) == (2, field, source)
    assert reject["reason"] and reject["data"] == bad


def test_invalid_json_line_is_a_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "ok"}\n\n{"prompt": "unterminated\n{"prompt": "fine"}\n')
    with pytest.raises(BadRowError, match=r"row 2: field '<line>': not valid JSON"):
        read_prompts(str(path))
    result = read_prompts(str(path), on_bad_row="skip", rejects_path=str(tmp_path / "r/x.jsonl"))
    assert [p.messages[0].content for p in result.prompts] == ["ok", "fine"]
    assert result.rejects_path == str(tmp_path / "r/x.jsonl")
    reject = json.loads(Path(result.rejects_path).read_text())
    assert reject["data"] == '{"prompt": "unterminated' and "JSON" in reject["reason"]


@pytest.mark.parametrize("fmt", ["parquet", "datasets"])
def test_bad_rows_in_tables(fmt: str, tmp_path: Path) -> None:
    rows = [
        {"prompt": "fine", "messages": None},
        {"prompt": None, "messages": [{"role": "user", "content": "q"}, CHAT[1]]},
        {"prompt": "", "messages": None},
        {"prompt": "also fine", "messages": None},
    ]
    source = WRITERS[fmt](tmp_path / "table", rows)
    with pytest.raises(BadRowError) as err:
        read_prompts(source)
    assert (err.value.row, err.value.field) == (1, "messages")
    result = read_prompts(source, on_bad_row="skip")
    assert [p.messages[0].content for p in result.prompts] == ["fine", "also fine"]
    rejected = [json.loads(x) for x in Path(result.rejects_path).read_text().splitlines()]
    assert [(r["row"], r["field"]) for r in rejected] == [(1, "messages"), (2, "prompt")]


def test_stored_prompt_records_reingest_unchanged(tmp_path: Path) -> None:
    records = read_prompts(write_jsonl(tmp_path / "p.jsonl", GOOD_ROWS)).prompts
    path = tmp_path / "stored.parquet"
    pq.write_table(records_to_table(records, PromptRecord), path)
    assert read_prompts(str(path)).prompts == records


def test_bundled_demo_prompts_are_valid() -> None:
    result = read_prompts(bundled_prompts_path())
    assert result.prompts and result.rejects == 0 and result.duplicates == 0


def test_wrong_sources_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_prompts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "prompts.csv").write_text("prompt\nhi\n")
    with pytest.raises(ValueError, match="unsupported prompt file type"):
        read_prompts(str(tmp_path / "prompts.csv"))
    no_column = write_parquet(tmp_path / "nocol", [{"question": "hi"}])
    with pytest.raises(ValueError, match="no 'prompt' or 'messages' column"):
        read_prompts(no_column)
    (tmp_path / "plain-dir").mkdir()
    with pytest.raises(ValueError, match="save_to_disk"):
        read_prompts(str(tmp_path / "plain-dir"))
    two_splits = tmp_path / "two"
    split = datasets.Dataset.from_list([{"prompt": "a"}])
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(two_splits))
    with pytest.raises(ValueError, match="splits"):
        read_prompts(str(two_splits))
    with pytest.raises(ValueError, match="on_bad_row"):
        read_prompts(bundled_prompts_path(), on_bad_row="ignore")  # type: ignore[arg-type]


def test_prompts_from_s3(s3_location: S3Location, tmp_path: Path) -> None:
    fs = s3fs.S3FileSystem(**s3_location.storage_options)
    options = s3_location.storage_options
    jsonl_uri = f"{s3_location.root}/in/prompts.jsonl"
    fs.pipe_file(jsonl_uri, Path(_bad_file(tmp_path, {"prompt": ""})).read_bytes())
    parquet_uri = f"{s3_location.root}/in/prompts.parquet"
    fs.put_file(write_parquet(tmp_path / "good", GOOD_ROWS), parquet_uri)

    with pytest.raises(BadRowError, match=r"prompts.jsonl: row 2"):
        read_prompts(jsonl_uri, storage_options=options)
    result = read_prompts(jsonl_uri, on_bad_row="skip", storage_options=options)
    assert len(result.prompts) == 3 and result.rejects == 1
    assert result.rejects_path == jsonl_uri + ".rejects.jsonl"
    assert json.loads(fs.cat_file(result.rejects_path))["field"] == "prompt"

    from_parquet = read_prompts(parquet_uri, storage_options=options).prompts
    assert [p.prompt_id for p in from_parquet] == [p.prompt_id for p in result.prompts[:2]]

    # As the ingest task does it: a local source, rejects into the S3 store, one set of options.
    local = read_prompts(
        _bad_file(tmp_path, {"prompt": ""}),
        on_bad_row="skip",
        rejects_path=f"{s3_location.root}/runs/r/inputs/rejects.jsonl",
        storage_options=options,
    )
    assert [p.prompt_id for p in local.prompts] == [p.prompt_id for p in result.prompts]
    assert json.loads(fs.cat_file(local.rejects_path))["row"] == 2
    saved = write_saved_dataset(tmp_path / "saved", GOOD_ROWS)
    from_saved = read_prompts(saved, storage_options=options).prompts
    assert [p.prompt_id for p in from_saved] == [p.prompt_id for p in from_parquet]


def test_source_sha256_hashes_the_bytes_of_every_file(tmp_path: Path) -> None:
    first = tmp_path / "a.jsonl"
    write_jsonl(first, GOOD_ROWS)
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(first.read_bytes())
    digest = source_sha256(str(first))
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert source_sha256(str(copy)) == digest  # the bytes decide, not the name
    assert source_sha256(first.as_uri()) == digest
    changed = bytearray(first.read_bytes())
    changed[5] ^= 1
    copy.write_bytes(bytes(changed))
    assert source_sha256(str(copy)) != digest

    # A saved dataset is a directory: every file counts, including ones nested deeper.
    saved = Path(write_saved_dataset_dict(tmp_path / "saved", GOOD_ROWS))
    whole = source_sha256(str(saved))
    assert source_sha256(str(saved)) == whole
    assert len(whole) == 64
    files = sorted(p for p in saved.rglob("*") if p.is_file())
    assert any(p.parent != saved for p in files)
    for file in files:
        original = file.read_bytes()
        file.write_bytes(original + b" ")
        assert source_sha256(str(saved)) != whole, file.relative_to(saved)
        file.write_bytes(original)
    assert source_sha256(str(saved)) == whole
    # Renaming a file inside the directory changes the hash too.
    renamed = files[0].with_name(files[0].name + ".moved")
    files[0].rename(renamed)
    assert source_sha256(str(saved)) != whole


def test_source_sha256_on_s3(s3_location: S3Location, tmp_path: Path) -> None:
    fs = s3fs.S3FileSystem(**s3_location.storage_options)
    local = tmp_path / "p.jsonl"
    write_jsonl(local, GOOD_ROWS)
    uri = f"{s3_location.root}/in/p.jsonl"
    fs.put_file(str(local), uri)
    assert source_sha256(uri, s3_location.storage_options) == source_sha256(str(local))


# ---- bytes that are not UTF-8 text ----------------------------------------------------------


def _latin1_line_file(path: Path, compress: bool) -> tuple[str, int]:
    """Two good rows, a Latin-1 line at row 2, a good row; and the offset of the bad byte."""
    good = [json.dumps(r).encode() + b"\n" for r in GOOD_ROWS]
    bad = '{"prompt": "caf\xe9 au lait"}\n'.encode("latin-1")
    data = b"".join([*good, bad, b'{"prompt": "last"}\n'])
    offset = sum(map(len, good)) + bad.index(b"\xe9")
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return str(path), offset


@pytest.mark.parametrize("compress", [False, True], ids=["jsonl", "jsonl.gz"])
def test_a_line_that_is_not_utf8_is_a_bad_row(compress: bool, tmp_path: Path) -> None:
    source, offset = _latin1_line_file(tmp_path / "latin.jsonl", compress)
    with pytest.raises(BadRowError) as err:
        read_prompts(source)
    assert (err.value.file, err.value.row, err.value.field) == (source, 2, "<line>")
    message = str(err.value)
    assert source in message and "row 2" in message and "not valid UTF-8" in message
    assert f"byte offset {offset} " in message and "e9" in message

    result = read_prompts(source, on_bad_row="skip")
    assert [p.messages[-1].content for p in result.prompts] == [
        "Name three rivers.",
        "And times 3?",
        "last",
    ]
    (reject,) = [json.loads(x) for x in Path(result.rejects_path or "").read_text().splitlines()]
    assert (reject["row"], reject["field"], reject["file"]) == (2, "<line>", source)
    assert f"byte offset {offset}" in reject["reason"]
    assert reject["data"] == '{"prompt": "caf\\xe9 au lait"}'  # the bytes, readable


def test_a_binary_file_fails_naming_the_file(tmp_path: Path) -> None:
    # A gzip file without its suffix: binary from its header on (NUL bytes among the first).
    source = tmp_path / "packed.jsonl"
    source.write_bytes(gzip.compress(b'{"prompt": "hi"}\n' * 50))
    for mode in ("error", "skip"):
        with pytest.raises(ValueError, match=r"packed\.jsonl: not a UTF-8 JSON-lines text file"):
            read_prompts(str(source), on_bad_row=mode)  # type: ignore[arg-type]
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes('{"prompt": "hi"}\n'.encode("utf-16"))
    with pytest.raises(ValueError, match=r"utf16\.jsonl: .*NUL byte at byte offset 3 "):
        read_prompts(str(utf16), on_bad_row="skip")


def test_a_file_in_another_encoding_rejects_every_line(tmp_path: Path) -> None:
    path = tmp_path / "cp1252.jsonl"
    path.write_bytes(
        "".join(f'{{"prompt": "r\xe9sum\xe9 {i}"}}\n' for i in range(3)).encode("cp1252")
    )
    result = read_prompts(str(path), on_bad_row="skip")
    assert result.prompts == [] and result.rejects == 3


def test_a_byte_order_mark_is_not_a_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "first"}\r\n{"prompt": "second"}\r\n')
    result = read_prompts(str(path))
    assert [p.messages[0].content for p in result.prompts] == ["first", "second"]


def test_a_lone_surrogate_is_a_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "half an emoji \\ud83d"}\n')
    with pytest.raises(BadRowError, match=r"row 1: field 'prompt': not valid Unicode"):
        read_prompts(str(path))
    result = read_prompts(str(path), on_bad_row="skip")
    assert [p.messages[0].content for p in result.prompts] == ["ok"]
    reject = json.loads(Path(result.rejects_path or "").read_text())
    assert reject["data"] == {"prompt": "half an emoji \ud83d"}


def test_a_corrupt_archive_fails_as_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "hi"}\n' * 1000)[:60])
    with pytest.raises(ValueError, match=r"cut\.jsonl\.gz: cannot decompress") as err:
        read_prompts(str(path))
    assert not is_retryable_ingest_error(err.value)


# ---- which failures the ingest task retries ---------------------------------------------------


@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (ConnectionResetError("peer reset"), True),
        (TimeoutError("read timed out"), True),
        (OSError("503 Slow Down"), True),
        (ShardsFailedError("1 of 2 shards failed: shard 0: OSError"), True),
        (BadRowError("p.jsonl", 2, "<line>", "not valid UTF-8"), False),
        (ValueError("p.csv: unsupported prompt file type"), False),
        (FileNotFoundError("p.jsonl: no such prompt file"), False),
        (IsADirectoryError("p.jsonl"), False),
        (PermissionError("p.jsonl"), False),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), False),
        (gzip.BadGzipFile("Not a gzipped file"), False),
        (RuntimeError("a bug"), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_only_transient_io_errors_are_retryable(error: BaseException, retry: bool) -> None:
    assert is_retryable_ingest_error(error) is retry


@pytest.mark.slow  # starts a Prefect API server
def test_ingest_task_retries_storage_errors_but_not_bad_input(
    prefect_harness: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import flow

    import tasks.prompts
    from avr_core.config import IngestConfig
    from avr_core.steps import Stage1Steps, StepIO

    calls: list[str] = []
    flaky = {str(tmp_path / "good.jsonl")}  # fails once, as storage can

    def read_prompts_counted(source: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(Path(source).name)
        if source in flaky:
            flaky.discard(source)
            raise ConnectionResetError("connection reset by peer")
        return read_prompts(source, *args, **kwargs)

    monkeypatch.setattr(tasks.prompts, "read_prompts", read_prompts_counted)
    ingest_now = tasks.prompts.ingest_prompts_task.with_options(retry_delay_seconds=0)
    latin1, _ = _latin1_line_file(tmp_path / "latin.jsonl", compress=False)
    cp1252 = tmp_path / "cp1252.jsonl"
    cp1252.write_bytes('{"prompt": "r\xe9sum\xe9"}\n'.encode("cp1252"))
    write_jsonl(tmp_path / "good.jsonl", GOOD_ROWS)
    root = f"file://{tmp_path}/store"

    @flow
    def ingest_each(sources: list[str], on_bad_row: str) -> list[str]:
        outcomes = []
        for i, source in enumerate(sources):
            io = StepIO(storage_root=root, run=f"r{i}", target=Stage1Steps.PROMPTS)
            config = IngestConfig(prompts=source, on_bad_row=on_bad_row)  # type: ignore[arg-type]
            try:
                outcomes.append(f"{ingest_now(io, config).rows} rows")
            except Exception as err:  # noqa: BLE001 - the outcome is what the test checks
                outcomes.append(f"{type(err).__name__}: {err}")
        return outcomes

    missing = str(tmp_path / "missing.jsonl")
    outcomes = ingest_each([latin1, missing, str(tmp_path / "good.jsonl")], "error")
    assert outcomes[0].startswith("BadRowError") and "byte offset" in outcomes[0]
    assert outcomes[1].startswith("FileNotFoundError")
    assert outcomes[2] == "2 rows"
    # One attempt per bad source; the storage error was retried once, then the task succeeded.
    assert calls == ["latin.jsonl", "missing.jsonl", "good.jsonl", "good.jsonl"]

    calls.clear()
    (outcome,) = ingest_each([str(cp1252)], "skip")
    assert outcome.startswith(f"ValueError: {cp1252}: no usable prompts (1 rejected, reasons in")
    assert calls == ["cp1252.jsonl"]
