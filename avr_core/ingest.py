"""Prompt ingestion: read a prompt set, validate every row, give each prompt a stable id, shard it.

Sources (local paths or fsspec URLs such as `s3://`, with `storage_options`):
- JSON lines (`.jsonl`, `.ndjson`, `.json`; compressed `.gz`/`.bz2`/`.xz`/`.zst` too),
- Parquet (`.parquet`),
- a `datasets` dataset saved with `save_to_disk` (a directory; a DatasetDict needs one split).

Each row has a `prompt` string (one user turn) or a `messages` conversation (`[{role, content}]`:
an optional system turn, then alternating user/assistant turns, ending with a user turn). Optional
columns: `constraints` (`[{type, args}]`, see avr_core.constraints), `source` and `id`, which are
kept in `PromptRecord.source` as `source#id` so a prompt can be traced back to its origin, and
`reference` (a reference answer; a Stage II search may start from it).

A bad row raises `BadRowError` naming the file, the 0-based row (for JSON lines: the 0-based line
number) and the field. With `on_bad_row="skip"` bad rows go to a rejects JSON-lines file instead,
each with its reason, and every valid row is kept. Bad rows include:
- JSON lines that are not UTF-8: each line is read as bytes and decoded on its own, so one bad line
  is one bad row (field `<line>`, the reason gives the byte offset of the bad bytes in the file,
  after decompression) and the other rows are kept. A file with NUL bytes in its first 8 KiB is
  binary (or UTF-16), not JSON lines: that fails the whole file, naming it, in either mode.
- text that UTF-8 cannot hold: a lone surrogate, written in JSON as an escape like `\\ud800`.
- prompts over the size limits: `max_prompt_chars` (all turns' contents together) and
  `max_prompt_tokens` (the conversation through the policy's chat template, counted by a
  caller-supplied `count_tokens`), so an oversized prompt is named here, not an out-of-memory
  error in the engine later. `prompt_token_limit` derives the default token limit from the
  policy's context length and the tree's `max_tokens`.

`is_retryable_ingest_error` tells transient I/O failures (worth a retry) from input errors (a
retry reads the same bad input again).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import posixpath
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import fsspec
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from avr_core.constraints import validate_constraint
from avr_core.fingerprint import short_hash
from avr_core.schemas import (
    AnswerRound,
    Constraint,
    Conversation,
    Message,
    PromptRecord,
    RefinedAnswers,
)
from avr_core.steps import ShardsFailedError

__all__ = [
    "TEMPLATE_RESERVE_TOKENS",
    "AnswersResult",
    "BadRowError",
    "IngestResult",
    "TokenCounter",
    "bundled_prompts_path",
    "is_retryable_ingest_error",
    "load_chat_token_counter",
    "model_context_length",
    "parse_answer_row",
    "prompt_id_for",
    "read_answers",
    "prompt_token_limit",
    "read_prompts",
    "resolve_prompt_source",
    "source_sha256",
]

# Counts the tokens of a conversation ([{role, content}, ...]) as the policy will read it.
TokenCounter = Callable[[list[dict[str, str]]], int]

ROLES = ("system", "user", "assistant")
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
# Files `save_to_disk` writes: a Dataset has state.json, a DatasetDict dataset_dict.json.
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
# JSON text never holds a raw NUL byte; NULs at the start of a file mean binary (or UTF-16) data.
SNIFF_BYTES = 8192
# What a refinement tree adds to a prompt besides its three generations of `max_tokens` (answer,
# critique, refinement): the judge and refine requests with their chat-template framing, about
# 300 tokens with the bundled templates; the rest is headroom for longer custom templates.
TEMPLATE_RESERVE_TOKENS = 512


class BadRowError(ValueError):
    """A prompt row that cannot be used; names the file, the 0-based row and the field."""

    def __init__(self, file: str, row: int, field: str, reason: str) -> None:
        self.file, self.row, self.field, self.reason = file, row, field, reason
        super().__init__(f"{file}: row {row}: field {field!r}: {reason}")


RecordT = TypeVar("RecordT", bound=BaseModel)


class IngestResult(BaseModel):
    """The valid, de-duplicated prompts and what was left out."""

    prompts: list[PromptRecord]
    rejects: int = 0
    rejects_path: str | None = None
    duplicates: int = 0


class _RowProblem(Exception):
    """Why a row is bad, before the file and row number are attached."""

    def __init__(self, field: str, reason: str, data: Any = None) -> None:
        super().__init__(reason)
        self.field, self.reason = field, reason
        self.data = data  # what to show in the rejects file when there is no row dict


def prompt_id_for(messages: Sequence[Message | Mapping[str, Any]]) -> str:
    """Stable id of a conversation: sha256 of its canonical JSON, first 16 hex chars.

    Only role and content count, so the same conversation gets the same id from any file format.
    """
    turns = [
        {"role": m.role, "content": m.content}
        if isinstance(m, Message)
        else {"role": m["role"], "content": m["content"]}
        for m in messages
    ]
    return short_hash(turns)


def source_sha256(source: str, storage_options: dict[str, Any] | None = None) -> str:
    """sha256 of a prompt source's bytes (every file of a directory, in name order)."""
    fs, path = fsspec.core.url_to_fs(source, **(storage_options or {}))
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.removeprefix(path).encode() + b"\0")
        with fs.open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# The prompt sets shipped with the package: `train` feeds the demo runs; `heldout` is never read by
# training, so evaluating on it measures what refinement learned rather than what it memorized.
_BUNDLED_PROMPT_FILES: dict[str, str] = {
    "train": "demo_prompts.jsonl",
    "heldout": "heldout_prompts.jsonl",
}
_BUNDLED_PREFIX = "bundled:"


def bundled_prompts_path(split: Literal["train", "heldout"] = "train") -> str:
    """Path of a bundled prompt set: the 24 demo prompts (train) or the 12 held-out ones."""
    return str(Path(__file__).parent / "data" / _BUNDLED_PROMPT_FILES[split])


def resolve_prompt_source(spec: str | None) -> str:
    """The prompt source a config names: `bundled:train` (also None) or `bundled:heldout` become
    the bundled files; any other path or URI is returned unchanged."""
    if spec is None:
        return bundled_prompts_path("train")
    if not spec.startswith(_BUNDLED_PREFIX):
        return spec
    split = spec.removeprefix(_BUNDLED_PREFIX)
    if split == "train":
        return bundled_prompts_path("train")
    if split == "heldout":
        return bundled_prompts_path("heldout")
    allowed = ", ".join(_BUNDLED_PREFIX + name for name in _BUNDLED_PROMPT_FILES)
    raise ValueError(f"unknown bundled prompt set {spec!r}; expected one of: {allowed}")


def is_retryable_ingest_error(error: BaseException) -> bool:
    """True for a transient I/O failure of an ingest (storage or network); False for bad input.

    A missing, unreadable or malformed source fails the same way on every attempt, so only
    OSErrors that are not about the path itself are worth a retry, plus `ShardsFailedError`
    (ingest computes nothing that can fail: its shards fail only when writing to storage).
    """
    if isinstance(error, ShardsFailedError):
        return True
    path_errors = FileNotFoundError | IsADirectoryError | NotADirectoryError | PermissionError
    if isinstance(error, path_errors | gzip.BadGzipFile | UnicodeError | ValueError):
        return False
    return isinstance(error, OSError)  # ConnectionError and TimeoutError are OSErrors


def prompt_token_limit(context_length: int, max_new_tokens: int) -> int:
    """The longest prompt (in tokens) whose refinement tree fits in the policy's context.

    The refine request carries the prompt, the answer and the critique (up to `max_new_tokens`
    each) and the judge and refine requests, and then generates up to `max_new_tokens` more.
    """
    limit = context_length - 3 * max_new_tokens - TEMPLATE_RESERVE_TOKENS
    if limit < 1:
        raise ValueError(
            f"a context of {context_length} tokens leaves no room for a prompt when each "
            f"generation may take {max_new_tokens} tokens (3 per refinement + "
            f"{TEMPLATE_RESERVE_TOKENS} for the templates): lower tree.sampling.max_tokens"
        )
    return limit


def model_context_length(model_dir: Path) -> int | None:
    """The context length a model's config.json declares, or None when it names none."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    config = config.get("text_config") or config  # multimodal models nest the language model
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_chat_token_counter(model_dir: Path) -> TokenCounter:
    """Token counts of conversations through the model's chat template (the tokenizer only).

    Counts as the engines feed the policy: the chat template with the generation prompt, and no
    special tokens added twice.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template is None:
        raise ValueError(f"the tokenizer in {model_dir} has no chat template")

    def count_tokens(messages: list[dict[str, str]]) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count_tokens


# ---------------------------------------------------------------- row validation


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_text(value: str, field: str) -> None:
    """Text must be storable as UTF-8: JSON can escape a lone surrogate, UTF-8 cannot hold one."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _RowProblem(
            field,
            f"not valid Unicode: lone surrogate {value[err.start]!r} at character {err.start}",
        ) from None


def _check_conversation(value: Any, field: str) -> Conversation:
    """The conversation as Messages, or the first problem: shape, role, content or turn order."""
    if not isinstance(value, list | tuple):
        raise _RowProblem(
            field, f"must be a list of {{role, content}} turns, got {_type_name(value)}"
        )
    if not value:
        raise _RowProblem(field, "is empty: a prompt needs at least one user turn")
    messages = []
    for i, turn in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(turn, Mapping):
            raise _RowProblem(
                where, f"must be an object with role and content, got {_type_name(turn)}"
            )
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise _RowProblem(
                f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})"
            )
        if not isinstance(content, str):
            raise _RowProblem(f"{where}.content", f"must be a string, got {_type_name(content)}")
        if not content.strip():
            raise _RowProblem(f"{where}.content", "is empty")
        _check_text(content, f"{where}.content")
        messages.append(Message(role=role, content=content))
    first = 1 if messages[0].role == "system" else 0
    for offset, message in enumerate(messages[first:]):
        expected = "user" if offset % 2 == 0 else "assistant"
        if message.role != expected:
            raise _RowProblem(
                f"{field}[{first + offset}].role",
                f"expected a {expected} turn, got {message.role} (turn order: an optional system "
                "turn, then alternating user and assistant turns, ending with a user turn)",
            )
    if messages[-1].role != "user":
        raise _RowProblem(field, f"must end with a user turn, ends with {messages[-1].role}")
    return messages


def _conversation_of(row: Mapping[str, Any]) -> Conversation:
    """The row's conversation, from `messages` or else from `prompt`."""
    if row.get("messages") is not None:
        return _check_conversation(row["messages"], "messages")
    prompt = row.get("prompt")
    if prompt is None:
        raise _RowProblem("prompt", "missing: a row needs a 'prompt' string or a 'messages' list")
    if isinstance(prompt, list | tuple):  # TRL's conversational format puts the chat in `prompt`
        return _check_conversation(prompt, "prompt")
    if not isinstance(prompt, str):
        raise _RowProblem("prompt", f"must be a string, got {_type_name(prompt)}")
    if not prompt.strip():
        raise _RowProblem("prompt", "is empty")
    _check_text(prompt, "prompt")
    return [Message(role="user", content=prompt)]


def _conversation_field(row: Mapping[str, Any]) -> str:
    """The column the row's conversation came from, to name in a problem with it as a whole."""
    return "messages" if row.get("messages") is not None else "prompt"


def _check_size(
    messages: Conversation,
    field: str,
    max_chars: int | None,
    max_tokens: int | None,
    count_tokens: TokenCounter | None,
) -> None:
    """An oversized prompt is a bad row here rather than an out-of-memory error in an engine."""
    if max_chars is not None:
        chars = sum(len(m.content) for m in messages)
        if chars > max_chars:
            raise _RowProblem(
                field, f"too long: {chars} characters, more than max_prompt_chars={max_chars}"
            )
    if max_tokens is None or count_tokens is None:
        return
    try:
        tokens = count_tokens([{"role": m.role, "content": m.content} for m in messages])
    except Exception as err:  # noqa: BLE001 - e.g. a chat template that refuses a system turn
        raise _RowProblem(field, f"the policy's chat template cannot render it: {err}") from err
    if tokens > max_tokens:
        raise _RowProblem(
            field,
            f"too long: {tokens} tokens with the policy's chat template, more than the limit "
            f"of {max_tokens}",
        )


def _ifeval_constraints_of(row: Mapping[str, Any]) -> list[Constraint]:
    """IFEval-format instructions (`instruction_id_list` + `kwargs`, as in the IFEval and Tulu 3
    RLVR data) as `ifeval` constraints, checked by lm-eval's IFEval checkers."""
    ids, kwargs = row.get("instruction_id_list"), row.get("kwargs")
    if ids is None:
        if kwargs is not None:
            raise _RowProblem("kwargs", "given without instruction_id_list")
        return []
    if not isinstance(ids, list | tuple) or not all(isinstance(i, str) for i in ids):
        raise _RowProblem("instruction_id_list", f"must be a list of strings, got {ids!r}")
    kwargs = [{} for _ in ids] if kwargs is None else kwargs
    if not isinstance(kwargs, list | tuple) or len(kwargs) != len(ids):
        raise _RowProblem("kwargs", f"must be a list with one object per instruction ({len(ids)})")
    constraints = []
    for i, (instruction, args) in enumerate(zip(ids, kwargs, strict=True)):
        if not isinstance(args, Mapping):
            raise _RowProblem(f"kwargs[{i}]", f"must be an object, got {_type_name(args)}")
        # IFEval rows list every kwarg of every instruction, unused ones as null: keep the rest.
        used = {k: v for k, v in args.items() if v is not None}
        try:
            constraints.append(
                validate_constraint({"type": "ifeval", "args": {"id": instruction, "kwargs": used}})
            )
        except ValueError as err:
            raise _RowProblem(f"instruction_id_list[{i}]", str(err)) from err
    return constraints


def _constraints_of(row: Mapping[str, Any]) -> list[Constraint]:
    """The row's constraints, validated; `args` may be an object or (as stored) a JSON string.
    IFEval-format columns add `ifeval` constraints."""
    value = row.get("constraints")
    if value is None:
        return _ifeval_constraints_of(row)
    if not isinstance(value, list | tuple):
        raise _RowProblem("constraints", f"must be a list, got {_type_name(value)}")
    constraints = []
    for i, item in enumerate(value):
        where = f"constraints[{i}]"
        if isinstance(item, Mapping) and isinstance(item.get("args"), str):
            try:
                item = {**item, "args": json.loads(item["args"]) if item["args"] else {}}
            except json.JSONDecodeError as err:
                raise _RowProblem(f"{where}.args", f"not valid JSON: {err}") from err
        elif isinstance(item, Mapping) and isinstance(item.get("args"), Mapping):
            # Arrow unifies the args of different constraint types into one struct, filling the
            # keys a type does not take with nulls; no argument is ever legitimately null.
            item = {**item, "args": {k: v for k, v in item["args"].items() if v is not None}}
        try:
            constraints.append(validate_constraint(item, where=where))
        except ValueError as err:
            raise _RowProblem(where, str(err)) from err
    return constraints + _ifeval_constraints_of(row)


def _source_of(row: Mapping[str, Any], default: str) -> str:
    """Where the prompt came from: the row's `source` (else the file name), plus `#id` if given."""
    source = row.get("source")
    if source is not None and not isinstance(source, str):
        raise _RowProblem("source", f"must be a string, got {_type_name(source)}")
    if source is not None:
        _check_text(source, "source")
    source = source or default
    row_id = row.get("id")
    if row_id is None:
        return source
    if not isinstance(row_id, str | int) or isinstance(row_id, bool):
        raise _RowProblem("id", f"must be a string or an integer, got {_type_name(row_id)}")
    if isinstance(row_id, str):
        _check_text(row_id, "id")
    return f"{source}#{row_id}"


def parse_prompt_row(row: Mapping[str, Any], default_source: str) -> PromptRecord:
    """One validated PromptRecord from a row; raises _RowProblem naming the bad field."""
    messages = _conversation_of(row)
    return PromptRecord(
        prompt_id=prompt_id_for(messages),
        messages=messages,
        constraints=_constraints_of(row),
        source=_source_of(row, default_source),
        reference=_reference_of(row),
    )


def _reference_of(row: Mapping[str, Any]) -> str | None:
    """The row's optional reference answer (a Stage II search can start from it)."""
    reference = row.get("reference")
    if reference is None:
        return None
    if not isinstance(reference, str):
        raise _RowProblem("reference", f"must be a string, got {_type_name(reference)}")
    _check_text(reference, "reference")
    if not reference.strip():
        raise _RowProblem("reference", "must not be blank (leave it out instead)")
    return reference


# ---------------------------------------------------------------- reading sources


def _format_of(source: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    """'datasets', 'parquet' or 'jsonl', from a saved-dataset directory or the file suffix."""
    if fs.isdir(path):
        if any(fs.exists(f"{path.rstrip('/')}/{name}") for name in SAVED_DATASET_MARKERS):
            return "datasets"
        raise ValueError(
            f"{source}: a directory, but not a dataset saved with save_to_disk "
            f"(no {' or '.join(SAVED_DATASET_MARKERS)})"
        )
    if not fs.exists(path):
        raise FileNotFoundError(f"{source}: no such prompt file")
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    if name.endswith(JSON_LINES_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise ValueError(
        f"{source}: unsupported prompt file type; use JSON lines ({', '.join(JSON_LINES_SUFFIXES)}), "
        ".parquet, or a directory written by datasets' save_to_disk"
    )


def _decode_line(raw: bytes, number: int, start: int, compressed: bool) -> str | _RowProblem:
    """One line as text, or the problem naming the byte offset of its first bad byte."""
    try:
        # A byte-order mark may open the file (Windows editors write one); it is not JSON.
        return raw.decode("utf-8-sig" if number == 0 else "utf-8")
    except UnicodeDecodeError as err:
        bad = raw[err.start : err.end]
        where = "of the decompressed file" if compressed else "of the file"
        return _RowProblem(
            "<line>",
            f"not valid UTF-8: byte(s) {bad.hex(' ')} at byte offset {start + err.start} {where} "
            "(JSON lines must be UTF-8; was the file saved in another encoding?)",
            raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n"),
        )


def _byte_lines(source: str, options: dict[str, Any]) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, bytes) of every line, decompressed; binary files fail whole."""
    try:
        with fsspec.open(source, "rb", compression="infer", **options) as handle:
            offset = 0
            for number, raw in enumerate(handle):
                if offset < SNIFF_BYTES and b"\0" in raw:
                    raise ValueError(
                        f"{source}: not a UTF-8 JSON-lines text file: a NUL byte at byte offset "
                        f"{offset + raw.index(0)} (a binary or UTF-16 file, or compressed "
                        f"without a {'/'.join(COMPRESSION_SUFFIXES)} suffix?)"
                    )
                yield number, offset, raw
                offset += len(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error, lzma.LZMAError) as err:
        # A corrupt or truncated archive is a bad file, not a storage hiccup worth a retry.
        raise ValueError(f"{source}: cannot decompress: {err}") from err


def _json_lines_rows(source: str, options: dict[str, Any]) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or _RowProblem) for every non-blank line.

    Lines are read as bytes and decoded one by one, so a line that is not UTF-8 is one bad row.
    """
    compressed = source.lower().endswith(COMPRESSION_SUFFIXES)
    for number, start, raw in _byte_lines(source, options):
        if not raw.strip():
            continue
        line = _decode_line(raw, number, start, compressed)
        if isinstance(line, _RowProblem):
            yield number, line
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            yield number, _RowProblem("<line>", f"not valid JSON ({err})", line.rstrip("\r\n"))
            continue
        if not isinstance(row, dict):
            yield (
                number,
                _RowProblem("<line>", f"must be a JSON object, got {_type_name(row)}", row),
            )
            continue
        yield number, row


def _require_prompt_column(source: str, columns: Sequence[str]) -> None:
    """A table without a `prompt` or `messages` column is a wrong file, not a bad row."""
    if "prompt" not in columns and "messages" not in columns:
        raise ValueError(
            f"{source}: no 'prompt' or 'messages' column (columns: {', '.join(columns) or 'none'})"
        )


def _parquet_rows(source: str, options: dict[str, Any]) -> Iterator[tuple[int, Any]]:
    with fsspec.open(source, "rb", **options) as handle:
        table = pq.read_table(handle)
    _require_prompt_column(source, table.column_names)
    yield from enumerate(table.to_pylist())


def _saved_dataset_rows(source: str, options: dict[str, Any]) -> Iterator[tuple[int, Any]]:
    import datasets

    loaded = datasets.load_from_disk(source, storage_options=options or None)
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise ValueError(
                f"{source}: a DatasetDict with splits {sorted(loaded)}; "
                f"point at one split's directory, e.g. {source.rstrip('/')}/{sorted(loaded)[0]}"
            )
        loaded = next(iter(loaded.values()))
    _require_prompt_column(source, loaded.column_names)
    yield from enumerate(loaded.to_list())


def _rows(source: str, options: dict[str, Any]) -> Iterator[tuple[int, Any]]:
    """(row number, row dict or _RowProblem) for every row of the source, in file order."""
    fs, path = fsspec.core.url_to_fs(source, **options)
    readers = {"jsonl": _json_lines_rows, "parquet": _parquet_rows, "datasets": _saved_dataset_rows}
    return readers[_format_of(source, fs, path)](source, options)


def _write_rejects(path: str, rejects: list[dict[str, Any]], options: dict[str, Any]) -> None:
    """Write the rejected rows with their reasons as JSON lines (one write of the whole file)."""
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rejects)
    fs, fs_path = fsspec.core.url_to_fs(path, **options)
    parent = posixpath.dirname(fs_path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    # A rejected lone surrogate goes out as its JSON escape (\ud800), which UTF-8 can hold.
    fs.pipe_file(fs_path, text.encode("utf-8", errors="backslashreplace"))


class _ReadRows(BaseModel, Generic[RecordT]):
    """What `_read_rows` kept and left out."""

    records: list[RecordT]
    rejects: int = 0
    rejects_path: str | None = None
    duplicates: int = 0


def _read_rows(
    source: str,
    on_bad_row: Literal["error", "skip"],
    rejects_path: str | None,
    options: dict[str, Any],
    parse: Callable[[Mapping[str, Any]], RecordT],
    key: Callable[[RecordT], str],
) -> _ReadRows[RecordT]:
    """Every row parsed (a bad row raises `BadRowError`, or is written to the rejects file with
    its reason in skip mode); the first of rows with the same `key` wins."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    records: list[RecordT] = []
    seen: set[str] = set()
    duplicates = 0
    rejects: list[dict[str, Any]] = []
    for number, row in _rows(source, options):
        try:
            if isinstance(row, _RowProblem):
                raise row
            record = parse(row)
        except _RowProblem as problem:
            if on_bad_row == "error":
                raise BadRowError(source, number, problem.field, problem.reason) from None
            rejects.append(
                {
                    "file": source,
                    "row": number,
                    "field": problem.field,
                    "reason": problem.reason,
                    "data": problem.data if isinstance(row, _RowProblem) else row,
                }
            )
            continue
        if key(record) in seen:
            duplicates += 1
            continue
        seen.add(key(record))
        records.append(record)
    written_to = None
    if rejects:
        written_to = rejects_path or f"{source.rstrip('/')}.rejects.jsonl"
        _write_rejects(written_to, rejects, options)
    return _ReadRows[RecordT](
        records=records, rejects=len(rejects), rejects_path=written_to, duplicates=duplicates
    )


def read_prompts(
    source: str,
    on_bad_row: Literal["error", "skip"] = "error",
    rejects_path: str | None = None,
    storage_options: dict[str, Any] | None = None,
    *,
    max_prompt_chars: int | None = None,
    max_prompt_tokens: int | None = None,
    count_tokens: TokenCounter | None = None,
) -> IngestResult:
    """Read, validate and de-duplicate a prompt set (first occurrence of a conversation wins).

    With on_bad_row="skip", bad rows are written to `rejects_path` (default
    `<source>.rejects.jsonl`) with their reasons; the file is written only if a row was rejected.
    A prompt longer than `max_prompt_chars` characters (all turns), or than `max_prompt_tokens`
    as counted by `count_tokens` (required with it), is a bad row.
    """
    if max_prompt_tokens is not None and count_tokens is None:
        raise ValueError("max_prompt_tokens needs count_tokens (the policy's tokenizer)")
    default_source = posixpath.basename(source.rstrip("/"))

    def parse(row: Mapping[str, Any]) -> PromptRecord:
        record = parse_prompt_row(row, default_source)
        _check_size(
            record.messages,
            _conversation_field(row),
            max_prompt_chars,
            max_prompt_tokens,
            count_tokens,
        )
        return record

    read = _read_rows(
        source,
        on_bad_row,
        rejects_path,
        dict(storage_options or {}),
        parse,
        lambda record: record.prompt_id,
    )
    return IngestResult(
        prompts=read.records,
        rejects=read.rejects,
        rejects_path=read.rejects_path,
        duplicates=read.duplicates,
    )


class AnswersResult(BaseModel):
    """Another system's answers, valid and de-duplicated by prompt, and what was left out."""

    answers: list[RefinedAnswers]
    rejects: int = 0
    rejects_path: str | None = None
    duplicates: int = Field(0, description="rows for a prompt already answered earlier in the file")


def parse_answer_row(row: Mapping[str, Any], default_generator: str) -> RefinedAnswers:
    """One answered prompt: `prompt` or `messages`, `response` (round 0), optional `generator`
    (default: the file name) and `constraints`; raises _RowProblem naming the bad field."""
    prompt = parse_prompt_row(row, default_generator)
    response = row.get("response")
    if not isinstance(response, str):
        raise _RowProblem("response", f"must be a string, got {_type_name(response)}")
    _check_text(response, "response")
    if not response.strip():
        raise _RowProblem("response", "must not be blank")
    generator = row.get("generator")
    if generator is not None and not isinstance(generator, str):
        raise _RowProblem("generator", f"must be a string, got {_type_name(generator)}")
    if generator is not None:
        _check_text(generator, "generator")
    return RefinedAnswers(
        prompt_id=prompt.prompt_id,
        prompt=prompt.messages,
        generator=generator or default_generator,
        rounds=[AnswerRound(answer=response)],
        constraints=prompt.constraints,
    )


def read_answers(
    source: str,
    on_bad_row: Literal["error", "skip"] = "error",
    rejects_path: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> AnswersResult:
    """Read another system's outputs (JSONL / Parquet / a saved dataset) as round-0 answers for
    cross-model refinement or evaluation: rows `{prompt or messages, response, generator}`.

    Bad rows are handled as in `read_prompts`; a prompt answered twice keeps its first answer.
    """
    default_generator = posixpath.basename(source.rstrip("/"))
    read = _read_rows(
        source,
        on_bad_row,
        rejects_path,
        dict(storage_options or {}),
        lambda row: parse_answer_row(row, default_generator),
        lambda record: record.prompt_id,
    )
    return AnswersResult(
        answers=read.records,
        rejects=read.rejects,
        rejects_path=read.rejects_path,
        duplicates=read.duplicates,
    )
