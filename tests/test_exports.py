"""`avr export`: every format round-trips a sealed step, multi-turn prompts included.

A small run is written to a real store (shards + manifest), exported through `export_step`, read
back from the written file and parsed back; `datasets` loads each file, TRL renders one pair with
the tiny model's tokenizer, and the S3 export goes to the moto server.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from avr_core.exports import (
    FORMATS,
    AnswerExample,
    ChatExample,
    ExportError,
    PairExample,
    RowExportError,
    check_export,
    convert_records,
    decode_rows,
    parse_row,
    supported_formats,
)
from avr_core.layout import StepRef
from avr_core.schemas import (
    AnswerRound,
    ArrowRecord,
    Constraint,
    Critique,
    Lineage,
    Message,
    PreferencePair,
    RefinedAnswers,
    Refinement,
    RefinementTree,
    SFTExample,
    ThoughtAnswer,
)
from avr_core.settings import AvrSettings
from avr_core.storage import DatasetStore
from flows.config_files import ConfigError
from flows.export import add_export_arguments, export_step, run_export
from tests.fixtures_s3 import S3Location

RUN = "run-x"
FP = "f" * 16


def system(text: str) -> Message:
    return Message(role="system", content=text)


def user(text: str) -> Message:
    return Message(role="user", content=text)


def assistant(text: str) -> Message:
    return Message(role="assistant", content=text)


# A four-turn prompt: the case a converter that keeps only the last turn gets wrong.
MULTI_TURN = [system("Be brief."), user("Name a prime."), assistant("7."), user("Another, please?")]

PAIRS = [
    PreferencePair(
        prompt_id="p-multi",
        kind="refinement",
        prompt=MULTI_TURN,
        chosen=[assistant("11 is prime.")],
        rejected=[assistant("9.")],
        chosen_score=2.0,
        rejected_score=-1.0,
        lineage=Lineage(run=RUN, stage="stage1", step="pairs"),
    ),
    PreferencePair(
        prompt_id="p-single",
        kind="generation",
        prompt=[user("Say hi ü")],
        chosen=[assistant("Hi!")],
        rejected=[assistant("...")],
        chosen_score=1.0,
        rejected_score=0.0,
    ),
]

SFT = [
    SFTExample(
        prompt_id="p-multi", messages=[*MULTI_TURN, assistant("13 is prime.")], kind="refinement"
    ),
    SFTExample(prompt_id="p-single", messages=[user("Say hi"), assistant("Hi!")], kind="original"),
]

REFINED = [
    RefinedAnswers(
        prompt_id=f"q{i}",
        prompt=[user(f"Question {i}?")],
        generator="gen",
        rounds=[
            AnswerRound(answer=f"first {i}"),
            AnswerRound(answer=f"better {i}", critique="too short", refinement=f"better {i}"),
        ],
    )
    for i in range(2)
]

THOUGHTS = [
    ThoughtAnswer(prompt_id="t0", prompt=[user("2+2?")], response="think... 4", final_answer="4"),
    ThoughtAnswer(prompt_id="t1", prompt=[user("3+3?")], response="rambling", format_failure=True),
]

TREES = [
    RefinementTree(
        prompt_id="tree0",
        messages=[*MULTI_TURN, assistant("11.")],
        answer_score=0.5,
        critiques=[Critique(text="ok", rating=7, refinements=[Refinement(text="11!", score=1.0)])],
        # Different argument keys per constraint: `datasets` unifies them into one struct.
        constraints=[
            Constraint(type="word_count", args={"min": 1, "max": 20}),
            Constraint(type="keyword", args={"words": ["prime"]}),
        ],
    )
]

STEPS: dict[str, tuple[str, list[Any]]] = {
    "pairs": ("stage1", PAIRS),
    "rsft": ("stage1", SFT),
    "refine": ("testtime", REFINED),
    "think": ("testtime", THOUGHTS),
    "trees": ("stage1", TREES),
}


def write_step(store: DatasetStore, stage: str, step: str, records: list[Any], seal: bool) -> None:
    cls = type(records[0])
    store.write_shard(RUN, stage, step, 0, records, cls, FP)
    if seal:
        store.seal(RUN, StepRef(stage, step), cls, FP)


@pytest.fixture
def store(tmp_path: Path) -> DatasetStore:
    """A store holding one run: a sealed step per record kind, plus the awkward cases."""
    store = DatasetStore((tmp_path / "store").as_uri())
    for step, (stage, records) in STEPS.items():
        write_step(store, stage, step, records, seal=True)
    multi_refined = RefinedAnswers(
        prompt_id="q-multi",
        prompt=MULTI_TURN,
        rounds=[AnswerRound(answer="11."), AnswerRound(answer="11 is prime.")],
    )
    write_step(store, "testtime", "refine-multi", [REFINED[0], multi_refined], seal=True)
    write_step(store, "stage1", "unsealed", PAIRS, seal=False)
    return store


def expected_examples(fmt: str, records: list[Any]) -> list[Any]:
    """What each row must carry, written out here rather than taken from the exporter."""
    if fmt == "jsonl":
        return records
    examples: list[Any] = []
    for r in records:
        if isinstance(r, PreferencePair) and fmt == "sharegpt":
            examples.append(ChatExample(r.prompt_id, [*r.prompt, *r.chosen]))
        elif isinstance(r, PreferencePair):
            examples.append(PairExample(r.prompt_id, r.prompt, r.chosen, r.rejected))
        elif isinstance(r, SFTExample):
            examples.append(ChatExample(r.prompt_id, r.messages))
        elif isinstance(r, RefinedAnswers):
            examples.append(AnswerExample(r.prompt_id, r.prompt, r.rounds[-1].answer))
        else:
            examples.append(AnswerExample(r.prompt_id, r.prompt, r.final_answer or ""))
    return examples


CASES = [
    (fmt, step)
    for step, (_, records) in STEPS.items()
    for fmt in supported_formats(type(records[0]).__name__)
]


def test_every_format_has_cases() -> None:
    assert {fmt for fmt, _ in CASES} == set(FORMATS)


@pytest.mark.parametrize(("fmt", "step"), CASES)
def test_every_format_round_trips_its_records(
    store: DatasetStore, tmp_path: Path, fmt: str, step: str
) -> None:
    import datasets

    records = STEPS[step][1]
    record_type = type(records[0]).__name__
    out = tmp_path / "out" / f"{step}.{'json' if fmt == 'alpaca-eval' else 'jsonl'}"

    result = export_step(store, RUN, step, fmt, str(out))

    assert result.rows == len(records) and result.uri == out.as_uri()
    rows = decode_rows(fmt, out.read_bytes())
    parsed = [parse_row(fmt, record_type, row) for row in rows]
    assert parsed == expected_examples(fmt, records)
    loaded = datasets.load_dataset("json", data_files=str(out), split="train")
    assert loaded.num_rows == len(records)
    assert any(line.startswith("datasets:") for line in result.checks)


def test_the_multi_turn_pair_in_each_trainer_format(store: DatasetStore, tmp_path: Path) -> None:
    def first_row(fmt: str) -> dict[str, Any]:
        out = tmp_path / f"{fmt}.jsonl"
        export_step(store, RUN, "stage1/pairs", fmt, str(out))
        return decode_rows(fmt, out.read_bytes())[0]

    prompt = [{"role": m.role, "content": m.content} for m in MULTI_TURN]
    chosen, rejected = (
        [{"role": "assistant", "content": "11 is prime."}],
        [{"role": "assistant", "content": "9."}],
    )
    assert first_row("trl") == {
        "prompt_id": "p-multi",
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
    }
    # OpenRLHF (--apply_chat_template without --prompt_key): whole conversations.
    assert first_row("openrlhf") == {
        "prompt_id": "p-multi",
        "chosen": prompt + chosen,
        "rejected": prompt + rejected,
    }
    # LLaMA-Factory sharegpt: system column, human/gpt turns ending on human, one-turn answers.
    assert first_row("llamafactory") == {
        "prompt_id": "p-multi",
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "Name a prime."},
            {"from": "gpt", "value": "7."},
            {"from": "human", "value": "Another, please?"},
        ],
        "chosen": {"from": "gpt", "value": "11 is prime."},
        "rejected": {"from": "gpt", "value": "9."},
    }
    assert first_row("sharegpt")["conversations"][0] == {"from": "system", "value": "Be brief."}


def test_llamafactory_writes_its_dataset_info_beside_the_data(
    store: DatasetStore, tmp_path: Path
) -> None:
    export_step(store, RUN, "pairs", "llamafactory", str(tmp_path / "pairs.jsonl"))
    result = export_step(store, RUN, "rsft", "llamafactory", str(tmp_path / "rsft.jsonl"))

    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert result.side_files == [(tmp_path / "dataset_info.json").as_uri()]
    assert info["pairs"] == {
        "file_name": "pairs.jsonl",
        "formatting": "sharegpt",
        "ranking": True,
        "columns": {
            "messages": "conversations",
            "system": "system",
            "chosen": "chosen",
            "rejected": "rejected",
        },
    }
    assert info["rsft"] == {
        "file_name": "rsft.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "system": "system"},
    }
    assert any("LLaMA-Factory is not installed" in line for line in result.skipped)


def test_openrlhf_export_says_which_flags_to_pass(store: DatasetStore, tmp_path: Path) -> None:
    pairs = export_step(store, RUN, "pairs", "openrlhf", str(tmp_path / "pairs.jsonl"))
    sft = export_step(store, RUN, "rsft", "openrlhf", str(tmp_path / "sft.jsonl"))

    assert "--apply_chat_template --chosen_key chosen --rejected_key rejected" in pairs.usage
    assert "--input_key messages --apply_chat_template" in sft.usage
    assert any("OpenRLHF is not installed" in line for line in pairs.skipped)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_trl_renders_the_multi_turn_pair_through_its_chat_template(
    store: DatasetStore, tmp_path: Path, tiny_tokenizer: Any
) -> None:
    from trl.data_utils import maybe_apply_chat_template

    out = tmp_path / "pairs.jsonl"

    result = export_step(store, RUN, "pairs", "trl", str(out), tokenizer=tiny_tokenizer)

    assert any("kept all 4 turns of prompt 'p-multi'" in line for line in result.checks)
    row = decode_rows("trl", out.read_bytes())[0]
    rendered = maybe_apply_chat_template(row, tiny_tokenizer)
    for message in MULTI_TURN:
        assert message.content in rendered["prompt"]
    assert "11 is prime." in rendered["chosen"]


def test_a_chat_template_that_refuses_the_prompt_is_reported_by_name(
    tmp_path: Path, tiny_tokenizer: Any
) -> None:
    import copy

    # As Gemma's template does: a system turn raises inside the template.
    strict = copy.deepcopy(tiny_tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    )
    conversion = convert_records("trl", "PreferencePair", PAIRS)
    with pytest.raises(RowExportError, match=r"'p-multi'.*System role not supported"):
        check_export("trl", "PreferencePair", conversion.rows, tokenizer=strict)


def test_without_a_tokenizer_the_trl_check_says_it_was_skipped(
    store: DatasetStore, tmp_path: Path
) -> None:
    result = export_step(store, RUN, "pairs", "trl", str(tmp_path / "pairs.jsonl"))
    assert any(line.startswith("trl: no tokenizer given") for line in result.skipped)


def test_a_prompt_truncated_to_its_last_turn_is_caught() -> None:
    conversion = convert_records("trl", "PreferencePair", PAIRS)
    rows = [dict(row) for row in conversion.rows]
    rows[0]["prompt"] = rows[0]["prompt"][-1:]

    with pytest.raises(RowExportError, match=r"'p-multi'.*1 prompt turns survive of .* 4"):
        check_export("trl", "PreferencePair", rows, expected=conversion.expected)


def test_alpaca_eval_refuses_a_multi_turn_prompt_by_name(
    store: DatasetStore, tmp_path: Path
) -> None:
    out = tmp_path / "answers.json"
    with pytest.raises(ConfigError, match=r"prompt 'q-multi'.*4 turns"):
        export_step(store, RUN, "refine-multi", "alpaca-eval", str(out))
    assert not out.exists()


def test_alpaca_eval_exports_the_chosen_round(store: DatasetStore, tmp_path: Path) -> None:
    last = export_step(store, RUN, "refine", "alpaca-eval", str(tmp_path / "last.json"))
    first = export_step(store, RUN, "refine", "alpaca-eval", str(tmp_path / "r0.json"), round=0)

    rows = json.loads((tmp_path / "r0.json").read_text())
    assert rows[0] == {
        "prompt_id": "q0",
        "instruction": "Question 0?",
        "output": "first 0",
        "generator": "refine@round0",
        "dataset": RUN,
    }
    assert json.loads((tmp_path / "last.json").read_text())[1]["output"] == "better 1"
    assert last.rows == first.rows == 2
    with pytest.raises(ConfigError, match=r"round 5 is not among its rounds 0\.\.1"):
        export_step(store, RUN, "refine", "alpaca-eval", str(tmp_path / "r5.json"), round=5)
    with pytest.raises(ConfigError, match="RefinedAnswers steps only"):
        export_step(store, RUN, "pairs", "trl", str(tmp_path / "x.jsonl"), round=0)
    with pytest.raises(ConfigError, match="jsonl keeps every round"):
        export_step(store, RUN, "refine", "jsonl", str(tmp_path / "x.jsonl"), round=0)


def test_a_format_that_does_not_take_the_record_kind_names_those_that_do(
    store: DatasetStore, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as caught:
        export_step(store, RUN, "pairs", "alpaca-eval", str(tmp_path / "pairs.json"))
    assert "does not take PreferencePair records" in str(caught.value)
    assert "trl, llamafactory, openrlhf, sharegpt, jsonl" in str(caught.value)


def test_a_row_the_format_cannot_hold_is_named() -> None:
    late_system = SFTExample(
        prompt_id="p-late",
        messages=[user("hi"), system("now be rude"), assistant("no")],
        kind="original",
    )
    with pytest.raises(ExportError, match=r"prompt 'p-late'.*system turn after the first"):
        convert_records("llamafactory", "SFTExample", [late_system])
    # ShareGPT can write it, but its readers need human/gpt turns after the system turn.
    conversion = convert_records("sharegpt", "SFTExample", [late_system])
    with pytest.raises(RowExportError, match=r"'p-late'.*turn 1 is system"):
        check_export("sharegpt", "SFTExample", conversion.rows, expected=conversion.expected)


def test_an_unsealed_step_is_refused(store: DatasetStore, tmp_path: Path) -> None:
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(ConfigError, match=r"has no manifest \(partial, 1 shards\)"):
        export_step(store, RUN, "unsealed", "trl", str(out))
    assert not out.exists()


def test_exports_to_s3_in_one_put(store: DatasetStore, s3_location: S3Location) -> None:
    import s3fs

    out = f"{s3_location.root}/exports/pairs.jsonl"
    result = export_step(
        store, RUN, "pairs", "llamafactory", out, storage_options=s3_location.storage_options
    )

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_location.storage_options)
    rows = decode_rows("llamafactory", fs.cat_file(out))
    assert [parse_row("llamafactory", "PreferencePair", row) for row in rows] == (
        expected_examples("llamafactory", PAIRS)
    )
    info = json.loads(fs.cat_file(f"{s3_location.root}/exports/dataset_info.json"))
    assert info["pairs"]["file_name"] == "pairs.jsonl"
    assert result.uri == out


def test_push_to_hub_needs_credentials(
    store: DatasetStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token either
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(ConfigError, match="no Hugging Face credentials"):
        export_step(store, RUN, "pairs", "trl", str(out), push_to_hub="me/pairs")
    assert out.exists()  # the file is written before the push is tried


def test_the_cli_entry_exports_and_prints_the_checks(
    store: DatasetStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    out = tmp_path / "sft.jsonl"
    args = parser.parse_args(
        ["run-x", "rsft", "--format", "sharegpt", "--out", str(out), "--root", store.root]
    )

    assert run_export(args, AvrSettings()) == 0
    printed = capsys.readouterr().out
    assert f"stage1/rsft (SFTExample): 2 rows -> {out.as_uri()}" in printed
    assert "checked  sharegpt: 2 rows follow its rules; every prompt turn survives" in printed
    with pytest.raises(SystemExit):  # argparse rejects an unknown format itself
        parser.parse_args(["run-x", "rsft", "--format", "csv", "--out", str(out)])


def test_a_thought_that_never_parsed_answers_with_nothing(
    store: DatasetStore, tmp_path: Path
) -> None:
    out = tmp_path / "think.json"
    export_step(store, RUN, "think", "alpaca-eval", str(out))
    rows = json.loads(out.read_text())
    assert [(r["prompt_id"], r["output"], r["generator"]) for r in rows] == [
        ("t0", "4", "think"),
        ("t1", "", "think"),
    ]


def test_jsonl_keeps_the_records_as_stored(store: DatasetStore, tmp_path: Path) -> None:
    out = tmp_path / "trees.jsonl"
    export_step(store, RUN, "trees", "jsonl", str(out))
    row = decode_rows("jsonl", out.read_bytes())[0]
    assert row["constraints"][0] == {"type": "word_count", "args": {"min": 1, "max": 20}}
    back: ArrowRecord = RefinementTree.model_validate(row)
    assert back == TREES[0]
