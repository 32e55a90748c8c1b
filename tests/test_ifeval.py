"""IFEval checks through lm-eval's maintained checkers, offline (no NLTK download, no print)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from avr_core.ifeval import (
    follows_instructions,
    instruction_ids,
    offline_count_sentences,
    offline_word_tokenize,
)

_OFFLINE_CHILD = """
import nltk

def no_download(*args, **kwargs):
    raise AssertionError(f"download attempted: {args}")

nltk.download = no_download
from avr_core.ifeval import follows_instructions
result = follows_instructions(
    "Write three sentences.",
    "One. Two! Three?",
    ["length_constraints:number_sentences", "change_case:capital_word_frequency"],
    [{"relation": "at least", "num_sentences": 3}, {"capital_frequency": 1, "capital_relation": "less than"}],
)
print("RESULT", result.strict, result.loose)
"""


def test_checkers_import_and_run_without_any_download(tmp_path):
    # A fresh interpreter with an empty NLTK data path: punkt is certainly absent.
    env = {"NLTK_DATA": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", _OFFLINE_CHILD],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert "RESULT [True, True] [True, True]" in done.stdout
    assert "Download" not in output and "punkt" not in output.lower()


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("One. Two! Three?", 3),
        ("Dr. Smith arrived at 3.30 p.m. on Monday. He left.", 2),
        ("First line\nsecond line without a stop", 1),
        ("Wait... what? Yes.", 3),
        ("", 0),
    ],
)
def test_offline_sentence_counter(text, sentences):
    assert offline_count_sentences(text) == sentences


def test_offline_word_tokenizer_keeps_capital_words_apart():
    assert offline_word_tokenize("HELLO, WORLD. It's OK!") == [
        "HELLO",
        ",",
        "WORLD",
        ".",
        "It",
        "'s",
        "OK",
        "!",
    ]


def test_strict_and_loose_checks():
    response = "Sure! Here it is:\n<<My Title>>\nA poem about rain."
    ids = ["detectable_format:title", "startend:quotation"]
    result = follows_instructions("Write a poem with a title.", response, ids, [{}, {}])
    assert result.strict == [True, False] and result.loose == [True, False]
    assert not result.prompt_strict
    # IFEval's loose check also accepts the response without its last line
    signed = "See you on Monday. Thanks!\n(sent from my phone)"
    only_loose = follows_instructions(
        "x", signed, ["startend:end_checker"], [{"end_phrase": "Thanks!"}]
    )
    assert only_loose.strict == [False] and only_loose.loose == [True]
    keywords = follows_instructions(
        "Mention rain.", "**Rain** falls.", ["keywords:existence"], [{"keywords": ["rain"]}]
    )
    assert keywords.strict == [True]


def test_every_ifeval_instruction_is_known_and_unknown_ids_are_named():
    ids = instruction_ids()
    assert len(ids) == 25 and "keywords:existence" in ids
    with pytest.raises(ValueError, match="unknown IFEval instruction id 'made:up'"):
        follows_instructions("p", "r", ["made:up"], [{}])
