"""Data products: a sealed step's records as rows in a trainer's or evaluator's dataset format.

Each format is a pair, as in distilabel's steps: *convert* a record to a row and *parse* a row back
to what it carries (`Example`), so a round trip proves that nothing was lost. Every converter keeps
every prompt turn (system, user, assistant, ...); a row a format cannot represent fails naming its
prompt id and the reason, never by quietly keeping the last turn.

| format | records | row |
|---|---|---|
| `trl` | PreferencePair, SFTExample | TRL's conversational `prompt`/`chosen`/`rejected`, or `messages` |
| `llamafactory` | PreferencePair, SFTExample | LLaMA-Factory sharegpt: `conversations` + `system` (+ `chosen`/`rejected` turns) |
| `openrlhf` | PreferencePair, SFTExample | `chosen`/`rejected` as whole conversations, or `messages` (`--apply_chat_template`) |
| `sharegpt` | SFTExample, PreferencePair | `conversations` of `{from, value}` (a pair: its chosen conversation) |
| `jsonl` | every record type | the record as stored, constraints decoded |
| `alpaca-eval` | RefinedAnswers, ThoughtAnswer | `instruction`, `output`, `generator`, `dataset` (one user turn only) |

`check_export` validates converted rows: the format's structural rules (the ones its trainer
silently drops rows for), that each row parses back to its source, and, where the library is
installed, that one example survives the library's own loading (`datasets`, TRL's chat template).
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any

from avr_core.schemas import (
    RECORD_TYPES,
    ArrowRecord,
    Conversation,
    Message,
    PreferencePair,
    RefinedAnswers,
    SFTExample,
    ThoughtAnswer,
)

__all__ = [
    "FORMATS",
    "AnswerExample",
    "ChatExample",
    "Conversion",
    "Example",
    "ExportCheck",
    "ExportError",
    "ExportOptions",
    "PairExample",
    "RowExportError",
    "check_export",
    "check_out_name",
    "check_supported",
    "convert_records",
    "decode_rows",
    "encode_rows",
    "llamafactory_dataset_info",
    "parse_row",
    "supported_formats",
    "usage_hint",
]

FORMATS: tuple[str, ...] = ("trl", "llamafactory", "openrlhf", "sharegpt", "jsonl", "alpaca-eval")

Row = dict[str, Any]

# ShareGPT's speaker names (LLaMA-Factory's defaults: `from`/`value`, human/gpt, system).
_SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}
_SHAREGPT_ROLE = {tag: role for role, tag in _SHAREGPT_FROM.items()}


class ExportError(ValueError):
    """A step or a format choice that cannot be exported as asked."""


class RowExportError(ExportError):
    """One row that a format cannot represent (or that did not survive it), named by prompt id."""

    def __init__(self, fmt: str, prompt_id: str, reason: str) -> None:
        super().__init__(f"{fmt} export of prompt {prompt_id!r}: {reason}")
        self.prompt_id = prompt_id


@dataclass(frozen=True)
class ExportOptions:
    """Choices only some formats use: the refinement round an answer step is exported at
    (None: the last), and the `generator` / `dataset` labels of alpaca-eval rows."""

    round: int | None = None
    generator: str = ""
    dataset: str = ""


# -- what a row carries -----------------------------------------------------------------------


@dataclass(frozen=True)
class PairExample:
    """A preference pair: the prompt conversation and the chosen / rejected assistant turns."""

    prompt_id: str
    prompt: Conversation
    chosen: Conversation
    rejected: Conversation


@dataclass(frozen=True)
class ChatExample:
    """A whole conversation (SFT): the prompt turns, then the assistant answer last."""

    prompt_id: str
    messages: Conversation


@dataclass(frozen=True)
class AnswerExample:
    """One answer to a prompt (what an evaluator compares)."""

    prompt_id: str
    prompt: Conversation
    answer: str


Example = PairExample | ChatExample | AnswerExample | ArrowRecord


@dataclass(frozen=True)
class Conversion:
    """Converted rows, what each must parse back to, and the options as resolved (the round)."""

    rows: list[Row]
    expected: list[Example]
    options: ExportOptions


@dataclass
class ExportCheck:
    """What `check_export` verified, and the library checks it could not run (and why)."""

    rows: int
    passed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# -- small conversions ------------------------------------------------------------------------


def _message_dicts(conversation: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in conversation]


def _conversation(items: Any) -> Conversation:
    return [Message(role=m["role"], content=m["content"]) for m in items]


def _sharegpt_turn(message: Message) -> dict[str, str]:
    return {"from": _SHAREGPT_FROM[message.role], "value": message.content}


def _from_sharegpt(turns: Any) -> Conversation:
    messages = []
    for turn in turns:
        if turn["from"] not in _SHAREGPT_ROLE:
            raise ValueError(f"unknown speaker {turn['from']!r} (known: {sorted(_SHAREGPT_ROLE)})")
        messages.append(Message(role=_SHAREGPT_ROLE[turn["from"]], content=turn["value"]))
    return messages


def _split_system(fmt: str, prompt_id: str, conversation: Conversation) -> tuple[str, Conversation]:
    """The leading system prompt (or "") and the turns after it; LLaMA-Factory keeps the system
    prompt in its own column, so a system turn anywhere else cannot be represented."""
    system, rest = "", list(conversation)
    if rest and rest[0].role == "system":
        system, rest = rest[0].content, rest[1:]
    if any(m.role == "system" for m in rest):
        raise RowExportError(fmt, prompt_id, "a system turn after the first turn has no place")
    return system, rest


def _single_answer(fmt: str, pair: PreferencePair) -> tuple[Message, Message]:
    """The chosen and rejected answers of a pair whose format holds one assistant turn each."""
    for name, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if len(answer) != 1 or answer[0].role != "assistant":
            raise RowExportError(
                fmt, pair.prompt_id, f"{name} must be one assistant turn, it has {len(answer)}"
            )
    return pair.chosen[0], pair.rejected[0]


def _with_system(system: str | None, turns: Conversation) -> Conversation:
    head = [Message(role="system", content=system)] if system else []
    return [*head, *turns]


# -- converters (record -> row) ---------------------------------------------------------------


def _trl_pair(pair: PreferencePair, _: ExportOptions) -> Row:
    return {
        "prompt_id": pair.prompt_id,
        "prompt": _message_dicts(pair.prompt),
        "chosen": _message_dicts(pair.chosen),
        "rejected": _message_dicts(pair.rejected),
    }


def _messages_row(example: SFTExample, _: ExportOptions) -> Row:
    return {"prompt_id": example.prompt_id, "messages": _message_dicts(example.messages)}


def _llamafactory_pair(pair: PreferencePair, _: ExportOptions) -> Row:
    system, turns = _split_system("llamafactory", pair.prompt_id, pair.prompt)
    chosen, rejected = _single_answer("llamafactory", pair)
    return {
        "prompt_id": pair.prompt_id,
        "system": system,
        "conversations": [_sharegpt_turn(m) for m in turns],
        "chosen": _sharegpt_turn(chosen),
        "rejected": _sharegpt_turn(rejected),
    }


def _llamafactory_sft(example: SFTExample, _: ExportOptions) -> Row:
    system, turns = _split_system("llamafactory", example.prompt_id, example.messages)
    return {
        "prompt_id": example.prompt_id,
        "system": system,
        "conversations": [_sharegpt_turn(m) for m in turns],
    }


def _openrlhf_pair(pair: PreferencePair, _: ExportOptions) -> Row:
    # OpenRLHF's DPO takes `chosen[:-1]` as the prompt, so each answer must be exactly one turn.
    chosen, rejected = _single_answer("openrlhf", pair)
    return {
        "prompt_id": pair.prompt_id,
        "chosen": _message_dicts([*pair.prompt, chosen]),
        "rejected": _message_dicts([*pair.prompt, rejected]),
    }


def _sharegpt_sft(example: SFTExample, _: ExportOptions) -> Row:
    return {
        "prompt_id": example.prompt_id,
        "conversations": [_sharegpt_turn(m) for m in example.messages],
    }


def _sharegpt_pair(pair: PreferencePair, _: ExportOptions) -> Row:
    # A ShareGPT row is one conversation: the preferred one.
    return {
        "prompt_id": pair.prompt_id,
        "conversations": [_sharegpt_turn(m) for m in [*pair.prompt, *pair.chosen]],
    }


def _stored_row(record: ArrowRecord, _: ExportOptions) -> Row:
    row: Row = record.model_dump(mode="json")
    return row


def _instruction(prompt_id: str, prompt: Conversation) -> str:
    """The prompt as AlpacaEval's one `instruction` string: only a lone user turn fits."""
    if len(prompt) != 1 or prompt[0].role != "user":
        roles = ", ".join(m.role for m in prompt) or "none"
        raise RowExportError(
            "alpaca-eval",
            prompt_id,
            f"its prompt has {len(prompt)} turns ({roles}); an AlpacaEval instruction is one user "
            "turn, and keeping only the last would silently drop the rest",
        )
    return prompt[0].content


def _answer_of(record: ArrowRecord, options: ExportOptions) -> str:
    """The answer an evaluator sees: a refinement round's answer, or a thought's final answer
    ("" when it never parsed: as in evaluations, a format failure answers with nothing)."""
    if isinstance(record, RefinedAnswers):
        if options.round is None:
            raise ExportError("the round of a RefinedAnswers export is not resolved")
        return record.rounds[options.round].answer
    if isinstance(record, ThoughtAnswer):
        return record.final_answer or ""
    raise ExportError(f"{type(record).__name__} records hold no answer")


def _generator_label(record: ArrowRecord, options: ExportOptions) -> str:
    # Refinement rounds are named as evaluations name them (`name@round{k}`).
    if isinstance(record, RefinedAnswers):
        return f"{options.generator}@round{options.round}"
    return options.generator


def _alpaca_eval_row(record: RefinedAnswers | ThoughtAnswer, options: ExportOptions) -> Row:
    return {
        "prompt_id": record.prompt_id,
        "instruction": _instruction(record.prompt_id, record.prompt),
        "output": _answer_of(record, options),
        "generator": _generator_label(record, options),
        "dataset": options.dataset,
    }


Converter = Callable[[Any, ExportOptions], Row]

_CONVERTERS: dict[str, dict[type[ArrowRecord], Converter]] = {
    "trl": {PreferencePair: _trl_pair, SFTExample: _messages_row},
    "llamafactory": {PreferencePair: _llamafactory_pair, SFTExample: _llamafactory_sft},
    "openrlhf": {PreferencePair: _openrlhf_pair, SFTExample: _messages_row},
    "sharegpt": {SFTExample: _sharegpt_sft, PreferencePair: _sharegpt_pair},
    "jsonl": {cls: _stored_row for cls in RECORD_TYPES.values()},
    "alpaca-eval": {RefinedAnswers: _alpaca_eval_row, ThoughtAnswer: _alpaca_eval_row},
}


# -- parsers (row -> what it carries) ---------------------------------------------------------


def _parse_trl_pair(row: Row) -> Example:
    return PairExample(
        row["prompt_id"],
        _conversation(row["prompt"]),
        _conversation(row["chosen"]),
        _conversation(row["rejected"]),
    )


def _parse_messages(row: Row) -> Example:
    return ChatExample(row["prompt_id"], _conversation(row["messages"]))


def _parse_llamafactory_pair(row: Row) -> Example:
    return PairExample(
        row["prompt_id"],
        _with_system(row.get("system"), _from_sharegpt(row["conversations"])),
        _from_sharegpt([row["chosen"]]),
        _from_sharegpt([row["rejected"]]),
    )


def _parse_llamafactory_sft(row: Row) -> Example:
    return ChatExample(
        row["prompt_id"], _with_system(row.get("system"), _from_sharegpt(row["conversations"]))
    )


def _parse_openrlhf_pair(row: Row) -> Example:
    chosen, rejected = _conversation(row["chosen"]), _conversation(row["rejected"])
    if not chosen or chosen[:-1] != rejected[:-1]:
        raise ValueError("chosen and rejected do not share the same prompt turns")
    return PairExample(row["prompt_id"], chosen[:-1], chosen[-1:], rejected[-1:])


def _parse_sharegpt(row: Row) -> Example:
    return ChatExample(row["prompt_id"], _from_sharegpt(row["conversations"]))


def _parse_alpaca_eval(row: Row) -> Example:
    prompt = [Message(role="user", content=row["instruction"])]
    return AnswerExample(row["prompt_id"], prompt, row["output"])


def _stored_parser(cls: type[ArrowRecord]) -> Callable[[Row], Example]:
    return cls.model_validate


_PARSERS: dict[str, dict[type[ArrowRecord], Callable[[Row], Example]]] = {
    "trl": {PreferencePair: _parse_trl_pair, SFTExample: _parse_messages},
    "llamafactory": {
        PreferencePair: _parse_llamafactory_pair,
        SFTExample: _parse_llamafactory_sft,
    },
    "openrlhf": {PreferencePair: _parse_openrlhf_pair, SFTExample: _parse_messages},
    "sharegpt": {SFTExample: _parse_sharegpt, PreferencePair: _parse_sharegpt},
    "jsonl": {cls: _stored_parser(cls) for cls in RECORD_TYPES.values()},
    "alpaca-eval": {RefinedAnswers: _parse_alpaca_eval, ThoughtAnswer: _parse_alpaca_eval},
}


# -- formats and record types -----------------------------------------------------------------


def supported_formats(record_type: str) -> list[str]:
    """The formats that can export records of `record_type`."""
    cls = RECORD_TYPES.get(record_type)
    return [fmt for fmt in FORMATS if cls is not None and cls in _CONVERTERS[fmt]]


def check_supported(fmt: str, record_type: str) -> type[ArrowRecord]:
    """The record class of `record_type`, if `fmt` exports it; else a clear ExportError."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    if record_type not in RECORD_TYPES:
        raise ExportError(f"unknown record type {record_type!r}")
    cls = RECORD_TYPES[record_type]
    if cls not in _CONVERTERS[fmt]:
        raise ExportError(
            f"the {fmt} format does not take {record_type} records; formats that do: "
            f"{', '.join(supported_formats(record_type))}"
        )
    return cls


def _resolve_round(records: Sequence[ArrowRecord], wanted: int | None) -> int:
    """The refinement round to export: `wanted`, or the last one when every record has it."""
    refined = [r for r in records if isinstance(r, RefinedAnswers)]
    counts = sorted({len(r.rounds) for r in refined})
    if wanted is None:
        if len(counts) > 1:
            raise ExportError(
                f"records hold different numbers of rounds ({counts}): choose one with --round"
            )
        wanted = counts[0] - 1 if counts else 0
    for record in refined:
        if not 0 <= wanted < len(record.rounds):
            raise RowExportError(
                "alpaca-eval",
                record.prompt_id,
                f"round {wanted} is not among its rounds 0..{len(record.rounds) - 1}",
            )
    return wanted


def _resolve_options(
    fmt: str, cls: type[ArrowRecord], records: Sequence[ArrowRecord], options: ExportOptions
) -> ExportOptions:
    if cls is not RefinedAnswers:
        if options.round is not None:
            raise ExportError(f"a round applies to RefinedAnswers steps only, not {cls.__name__}")
        return options
    if fmt != "alpaca-eval":
        if options.round is not None:
            raise ExportError(f"a round applies to alpaca-eval exports; {fmt} keeps every round")
        return options
    return replace(options, round=_resolve_round(records, options.round))


def _source_example(fmt: str, record: ArrowRecord, options: ExportOptions) -> Example:
    """What the row converted from `record` must parse back to."""
    if fmt == "jsonl":
        return record
    if isinstance(record, PreferencePair):
        if fmt == "sharegpt":
            return ChatExample(record.prompt_id, [*record.prompt, *record.chosen])
        return PairExample(record.prompt_id, record.prompt, record.chosen, record.rejected)
    if isinstance(record, SFTExample):
        return ChatExample(record.prompt_id, record.messages)
    if isinstance(record, RefinedAnswers | ThoughtAnswer):
        return AnswerExample(record.prompt_id, record.prompt, _answer_of(record, options))
    raise ExportError(f"{fmt}: no example for {type(record).__name__} records")


def convert_records(
    fmt: str,
    record_type: str,
    records: Sequence[ArrowRecord],
    options: ExportOptions | None = None,
) -> Conversion:
    """Every record of a step as a row of `fmt`, with what each row must parse back to."""
    cls = check_supported(fmt, record_type)
    for record in records:
        if not isinstance(record, cls):
            raise ExportError(f"expected {record_type} records, got {type(record).__name__}")
    resolved = _resolve_options(fmt, cls, records, options or ExportOptions())
    convert = _CONVERTERS[fmt][cls]
    return Conversion(
        rows=[convert(record, resolved) for record in records],
        expected=[_source_example(fmt, record, resolved) for record in records],
        options=resolved,
    )


def parse_row(fmt: str, record_type: str, row: Row) -> Example:
    """The inverse of conversion: what a `fmt` row of `record_type` records carries."""
    cls = check_supported(fmt, record_type)
    prompt_id = str(row.get("prompt_id", "?"))
    try:
        return _PARSERS[fmt][cls](row)
    except KeyError as err:
        raise RowExportError(fmt, prompt_id, f"the row has no {err} key") from err
    except (TypeError, ValueError) as err:
        raise RowExportError(fmt, prompt_id, f"the row does not parse: {err}") from err


# -- files ------------------------------------------------------------------------------------


def encode_rows(fmt: str, rows: Sequence[Row]) -> bytes:
    """The file's bytes: JSON lines, except alpaca-eval, whose reader takes one JSON array."""
    if fmt == "alpaca-eval":
        return json.dumps(list(rows), ensure_ascii=False, indent=1).encode("utf-8")
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def decode_rows(fmt: str, data: bytes) -> list[Row]:
    """Rows from a file written by `encode_rows`."""
    text = data.decode("utf-8")
    if fmt == "alpaca-eval":
        rows: list[Row] = json.loads(text)
        return rows
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def check_out_name(fmt: str, file_name: str) -> None:
    """Fail early on a file name the format's reader would not open: both pick their loader by
    the extension (alpaca_eval reads `.json`; LLaMA-Factory `.json`/`.jsonl`)."""
    suffix = PurePosixPath(file_name).suffix
    allowed = {"alpaca-eval": (".json",), "llamafactory": (".json", ".jsonl")}.get(fmt)
    if allowed is not None and suffix not in allowed:
        raise ExportError(
            f"{fmt} output {file_name!r} must end with {' or '.join(allowed)}: its reader picks "
            "the loader by the extension"
        )


def llamafactory_dataset_info(file_name: str, record_type: str) -> tuple[str, dict[str, Any]]:
    """The dataset name (the file's stem) and its `dataset_info.json` entry, as LLaMA-Factory's
    data/README.md describes the sharegpt format, so `dataset_dir` + `dataset: NAME` load it."""
    columns = {"messages": "conversations", "system": "system"}
    entry: dict[str, Any] = {"file_name": file_name, "formatting": "sharegpt"}
    if record_type == PreferencePair.__name__:
        entry["ranking"] = True
        columns |= {"chosen": "chosen", "rejected": "rejected"}
    entry["columns"] = columns
    return PurePosixPath(file_name).stem, entry


def usage_hint(fmt: str, record_type: str, uri: str) -> str:
    """How the written file is used by its trainer or evaluator (printed after an export)."""
    pairs = record_type == PreferencePair.__name__
    if fmt == "trl":
        trainer = "DPOTrainer" if pairs else "SFTTrainer"
        return f"datasets.load_dataset('json', data_files='{uri}', split='train') -> TRL {trainer}"
    if fmt == "llamafactory":
        name = PurePosixPath(uri).stem
        directory = uri.rsplit("/", 1)[0]
        stage = "dpo (or rm)" if pairs else "sft"
        return f"LLaMA-Factory: dataset_dir: {directory}, dataset: {name}, stage: {stage}"
    if fmt == "openrlhf":
        if pairs:
            return (
                f"openrlhf.cli.train_dpo (or train_rm) --dataset {uri} --apply_chat_template "
                "--chosen_key chosen --rejected_key rejected  (no --prompt_key: the prompt is "
                "chosen[:-1])"
            )
        return f"openrlhf.cli.train_sft --dataset {uri} --input_key messages --apply_chat_template"
    if fmt == "sharegpt":
        return f"{uri}: one `conversations` list of {{from: system|human|gpt, value}} per row"
    if fmt == "alpaca-eval":
        return f"alpaca_eval --model_outputs {uri} (a local copy of the file)"
    return f"datasets.load_dataset('json', data_files='{uri}', split='train')"


# -- validation -------------------------------------------------------------------------------


def _alternation_problem(conversation: Conversation) -> str | None:
    """Why turns do not alternate user/assistant after an optional leading system turn (the
    sharegpt rule: LLaMA-Factory drops such a row with a log line), or None."""
    offset = 1 if conversation and conversation[0].role == "system" else 0
    for i, message in enumerate(conversation[offset:]):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            return f"turn {i + offset} is {message.role} where {expected} must come"
    return None


def _pair_problem(fmt: str, pair: PairExample) -> str | None:
    if not pair.prompt or pair.prompt[-1].role != "user":
        return "the prompt must end with a user turn"
    if not pair.chosen or not pair.rejected:
        return "chosen and rejected must hold an answer"
    if any(m.role != "assistant" for m in [*pair.chosen, *pair.rejected]):
        return "chosen and rejected must hold assistant turns only"
    if fmt == "llamafactory":
        return _alternation_problem(pair.prompt)
    return None


def _chat_problem(fmt: str, chat: ChatExample) -> str | None:
    if not chat.messages or chat.messages[-1].role != "assistant":
        return "the conversation must end with the assistant answer"
    if fmt in ("llamafactory", "sharegpt"):
        return _alternation_problem(chat.messages)
    return None


def _rule_problem(fmt: str, example: Example) -> str | None:
    """Why `example` breaks a rule of `fmt`'s trainer, or None."""
    if isinstance(example, PairExample):
        return _pair_problem(fmt, example)
    if isinstance(example, ChatExample):
        return _chat_problem(fmt, example)
    return None


def _prompt_turns(example: Example) -> int | None:
    """How many prompt turns an example carries (None: a stored record, compared whole)."""
    if isinstance(example, PairExample | AnswerExample):
        return len(example.prompt)
    if isinstance(example, ChatExample):
        return len(example.messages) - 1
    return None


def _check_survival(fmt: str, parsed: Example, expected: Example) -> None:
    """The row carries all of its source: first the prompt's turn count (the usual loss: a
    multi-turn prompt cut to its last turn), then everything."""
    prompt_id = getattr(expected, "prompt_id", "?")
    got, want = _prompt_turns(parsed), _prompt_turns(expected)
    if got != want:
        raise RowExportError(fmt, prompt_id, f"{got} prompt turns survive of the source's {want}")
    if parsed != expected:
        raise RowExportError(fmt, prompt_id, "the row does not parse back to its source")


def _check_rows(
    fmt: str, record_type: str, rows: Sequence[Row], expected: Sequence[Example] | None
) -> list[Example]:
    """Structural checks of every row; each parsed back (and compared with `expected`)."""
    if expected is not None and len(expected) != len(rows):
        raise ExportError(f"{len(rows)} rows for {len(expected)} source records")
    parsed = []
    for i, row in enumerate(rows):
        example = parse_row(fmt, record_type, row)
        problem = _rule_problem(fmt, example)
        if problem is not None:
            raise RowExportError(fmt, str(row.get("prompt_id", f"row {i}")), problem)
        if expected is not None:
            _check_survival(fmt, example, expected[i])
        parsed.append(example)
    return parsed


def _drop_nulls(value: Any) -> Any:
    """`value` without None-valued dict keys: `datasets` gives every struct the union of the
    keys seen in its column, filling the missing ones with None (e.g. constraint args)."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _load_with_datasets(rows: Sequence[Row], data_file: str | None) -> list[Row]:
    """The rows as `datasets` delivers them to a trainer: `load_dataset("json")` on the written
    file, or `Dataset.from_list` without one."""
    import datasets  # noqa: PLC0415 - optional library, loaded only to validate

    if data_file is None:
        loaded: list[Row] = datasets.Dataset.from_list(list(rows)).to_list()
        return loaded
    # A private cache: the Arrow files it writes go away with the check.
    with tempfile.TemporaryDirectory(prefix="avr-export-check-") as cache:
        dataset = datasets.load_dataset(
            "json", data_files=data_file, split="train", cache_dir=cache
        )
        loaded = dataset.to_list()
    return loaded


def _check_datasets(fmt: str, rows: Sequence[Row], data_file: str | None) -> tuple[str, list[Row]]:
    loaded = _load_with_datasets(rows, data_file)
    if len(loaded) != len(rows):
        raise ExportError(f"datasets loaded {len(loaded)} rows of the {len(rows)} written")
    for row, back in zip(rows, loaded, strict=True):
        if _drop_nulls(back) != _drop_nulls(row):
            raise RowExportError(fmt, str(row.get("prompt_id", "?")), "datasets changed the row")
    how = "load_dataset('json') on the written file" if data_file else "Dataset.from_list"
    return f"datasets: {len(loaded)} rows read back unchanged by {how}", loaded


def _missing_in_order(text: str, contents: Sequence[str]) -> int | None:
    """Index of the first content not found in `text` after the previous one, or None."""
    position = 0
    for i, content in enumerate(contents):
        found = text.find(content, position)
        if found < 0:
            return i
        position = found + len(content)
    return None


def _longest_prompt(rows: Sequence[Row]) -> Row:
    """The row most likely to show a truncation: the one with the most prompt turns."""
    return max(rows, key=lambda row: len(row.get("prompt") or row.get("messages") or []))


def _check_trl_template(row: Row, tokenizer: Any) -> str:
    """Render one example through TRL's own chat-template helper (what its trainers apply) and
    check that every turn survives, in order; then tokenise the rendered prompt."""
    from trl.data_utils import (  # noqa: PLC0415 - TRL is optional here
        is_conversational,
        maybe_apply_chat_template,
    )

    keys = ("prompt", "chosen", "rejected", "messages")
    example = {k: row[k] for k in keys if row.get(k) is not None}
    prompt_id = str(row.get("prompt_id", "?"))
    if not is_conversational(example):
        raise RowExportError("trl", prompt_id, "TRL does not see a conversational example")
    try:
        rendered = maybe_apply_chat_template(example, tokenizer)
    except Exception as err:  # the template's own error (e.g. "System role not supported")
        raise RowExportError(
            "trl", prompt_id, f"the tokenizer's chat template fails on it: {err}"
        ) from err
    turns = example.get("prompt") or example["messages"]
    prompt_text = rendered.get("prompt", rendered.get("text", ""))
    lost = _missing_in_order(prompt_text, [m["content"] for m in turns])
    if lost is not None:
        raise RowExportError(
            "trl", prompt_id, f"turn {lost} of {len(turns)} is missing from TRL's rendered prompt"
        )
    for name in ("chosen", "rejected"):
        answer = [m["content"] for m in example.get(name, [])]
        if _missing_in_order(rendered.get(name, ""), answer) is not None:
            raise RowExportError("trl", prompt_id, f"TRL's rendered {name} lost the answer")
    tokens = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    return (
        f"trl: maybe_apply_chat_template kept all {len(turns)} turns of prompt {prompt_id!r} "
        f"({tokens} prompt tokens)"
    )


_DOCUMENTED = {
    "llamafactory": ("llamafactory", "LLaMA-Factory", "its data/README.md sharegpt format"),
    "openrlhf": ("openrlhf", "OpenRLHF", "its RewardDataset/SFTDataset with apply_chat_template"),
}


def _library_checks(
    fmt: str, rows: Sequence[Row], tokenizer: Any, data_file: str | None, check: ExportCheck
) -> None:
    """Load through the libraries that are installed; say which checks were skipped and why."""
    loaded = list(rows)
    if _installed("datasets"):
        message, loaded = _check_datasets(fmt, rows, data_file)
        check.passed.append(message)
    else:
        check.skipped.append("datasets: not installed, the rows were not loaded back")
    if fmt == "trl":
        if tokenizer is None:
            check.skipped.append("trl: no tokenizer given, TRL's chat template was not applied")
        elif not _installed("trl"):
            check.skipped.append("trl: not installed, TRL's chat template was not applied")
        else:
            check.passed.append(_check_trl_template(_longest_prompt(loaded), tokenizer))
    if fmt in _DOCUMENTED:
        module, name, documented = _DOCUMENTED[fmt]
        state = "installed, but not driven by this check" if _installed(module) else "not installed"
        check.skipped.append(
            f"{fmt}: {name} is {state}: its own loader was not run; the rows follow {documented} "
            "and its rules (checked above)"
        )
    if fmt == "alpaca-eval":
        check.passed.append(_check_alpaca_eval_file(rows, data_file))


def _check_alpaca_eval_file(rows: Sequence[Row], data_file: str | None) -> str:
    """alpaca_eval reads a `.json` path with `pandas.read_json`: do the same."""
    if data_file is None or not _installed("pandas"):
        return "alpaca-eval: rows hold instruction, output, generator and dataset"
    import pandas  # type: ignore[import-untyped]  # noqa: PLC0415 - optional, only to validate

    frame = pandas.read_json(data_file)
    missing = {"instruction", "output", "generator"} - set(frame.columns)
    if len(frame) != len(rows) or missing:
        raise ExportError(f"pandas.read_json read {len(frame)} rows, columns missing: {missing}")
    return f"alpaca-eval: pandas.read_json (alpaca_eval's reader) read {len(frame)} rows"


def check_export(
    fmt: str,
    record_type: str,
    rows: Sequence[Row],
    *,
    expected: Sequence[Example] | None = None,
    tokenizer: Any = None,
    data_file: str | None = None,
) -> ExportCheck:
    """Validate converted rows: `fmt`'s structural rules, that each row parses back to its source
    (`expected`, from `convert_records`: multi-turn prompts included), and the installed
    libraries' own loading (`data_file`: the written file, read back as the trainer would).

    Raises ExportError (RowExportError naming the prompt) on the first failure.
    """
    check = ExportCheck(rows=len(rows))
    _check_rows(fmt, record_type, rows, expected)
    survived = "every prompt turn survives, " if expected is not None else ""
    check.passed.append(f"{fmt}: {len(rows)} rows follow its rules; {survived}rows parse back")
    if rows:
        _library_checks(fmt, rows, tokenizer, data_file, check)
    if fmt == "alpaca-eval" and not _installed("alpaca_eval"):
        check.skipped.append("alpaca-eval: alpaca_eval is not installed; its reader was mirrored")
    return check
