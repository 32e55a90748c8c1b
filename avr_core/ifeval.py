"""IFEval verifiable-instruction checks, offline, with the maintained checkers of `lm-eval`.

`lm_eval.tasks.ifeval` ships Google's 25 IFEval instruction checkers; we use them instead of
writing them again. Two of them need NLTK's `punkt` data, which a machine without internet cannot
download, and importing the module tries to (`nltk.download("punkt_tab")`, which fails offline yet
prints "Downloaded punkt_tab"). `load_checkers` therefore imports it with NLTK's resource lookup
answering for `punkt_tab` (no download attempted, nothing printed) and gives it local
replacements that need no data files:
- sentences: lm-eval's own rule-based `split_into_sentences` (it already uses it for the
  sentence-level checks), counted instead of punkt's;
- word tokens (`change_case:capital_word_frequency`): NLTK's Treebank tokenizer (rules, no data)
  over those sentences, as `nltk.word_tokenize` does over punkt's.

`follows_instructions` runs the strict and the loose check (IFEval's "loose" also accepts the
response without its first/last line or without `*` markup) for every instruction of a prompt.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from types import ModuleType
from typing import Any

from pydantic import BaseModel

__all__ = [
    "InstructionResult",
    "follows_instructions",
    "instruction_ids",
    "load_checkers",
    "offline_count_sentences",
    "offline_word_tokenize",
]

_PUNKT = "tokenizers/punkt_tab"


class InstructionResult(BaseModel):
    """Per instruction of one prompt, whether the response follows it (strict and loose)."""

    instruction_ids: list[str]
    strict: list[bool]
    loose: list[bool]

    @property
    def prompt_strict(self) -> bool:
        return all(self.strict)

    @property
    def prompt_loose(self) -> bool:
        return all(self.loose)


@contextlib.contextmanager
def _punkt_lookup_answered() -> Iterator[None]:
    """While lm-eval's module imports: NLTK's `find` reports `punkt_tab` as present, so the
    import-time download (and its misleading print) never happens."""
    import nltk  # noqa: PLC0415 - only needed for the checkers

    real_find = nltk.data.find

    def find(resource_name: str, *args: Any, **kwargs: Any) -> Any:
        if resource_name == _PUNKT:
            return resource_name  # checked for existence only; the data is never loaded
        return real_find(resource_name, *args, **kwargs)

    nltk.data.find = find
    try:
        yield
    finally:
        nltk.data.find = real_find


class _NltkWithoutData:
    """The `nltk` module as the checkers see it, with `word_tokenize` needing no punkt data."""

    def __init__(self, nltk: ModuleType) -> None:
        self._nltk = nltk

    def __getattr__(self, name: str) -> Any:
        if name == "word_tokenize":
            return offline_word_tokenize
        return getattr(self._nltk, name)


def offline_count_sentences(text: str) -> int:
    """Sentences in `text` by lm-eval's rule-based splitter (punkt's data is not available)."""
    util = load_checkers().instructions_util
    return len(util.split_into_sentences(text))


def offline_word_tokenize(text: str) -> list[str]:
    """Treebank word tokens of every rule-split sentence (as `nltk.word_tokenize`, minus punkt)."""
    from nltk.tokenize import TreebankWordTokenizer  # noqa: PLC0415

    util = load_checkers().instructions_util
    tokenizer = TreebankWordTokenizer()
    return [
        token
        for sentence in util.split_into_sentences(text)
        for token in tokenizer.tokenize(sentence)
    ]


class _Checkers:
    """lm-eval's IFEval modules, patched to run offline."""

    def __init__(self) -> None:
        with _punkt_lookup_answered():
            # Any: lm-eval has no type information, and two of its attributes are replaced below.
            self.instructions_util: Any = importlib.import_module(
                "lm_eval.tasks.ifeval.instructions_util"
            )
            self.registry: Any = importlib.import_module(
                "lm_eval.tasks.ifeval.instructions_registry"
            )
            self.utils: Any = importlib.import_module("lm_eval.tasks.ifeval.utils")
        import nltk  # noqa: PLC0415

        util: Any = self.instructions_util
        util.count_sentences = _count_sentences
        util.nltk = _NltkWithoutData(nltk)


def _count_sentences(text: str) -> int:
    return offline_count_sentences(text)


@lru_cache(maxsize=1)
def load_checkers() -> _Checkers:
    """Import lm-eval's IFEval checkers once, offline (see the module docstring)."""
    try:
        return _Checkers()
    except ImportError as err:
        raise ImportError(
            "IFEval checks need lm-eval's IFEval extra: pip install 'lm-eval[ifeval]'"
        ) from err


def instruction_ids() -> list[str]:
    """Every instruction id the checkers know (e.g. `keywords:existence`)."""
    return sorted(load_checkers().registry.INSTRUCTION_DICT)


def follows_instructions(
    prompt: str,
    response: str,
    ids: Sequence[str],
    kwargs: Sequence[Mapping[str, Any]],
) -> InstructionResult:
    """Strict and loose IFEval checks of `response` for each instruction in `ids` (with its
    `kwargs`, as in the IFEval data); an unknown id raises a ValueError naming it."""
    checkers = load_checkers()
    if len(ids) != len(kwargs):
        raise ValueError(f"{len(ids)} instruction ids but {len(kwargs)} kwargs")
    unknown = [i for i in ids if i not in checkers.registry.INSTRUCTION_DICT]
    if unknown:
        raise ValueError(f"unknown IFEval instruction id {unknown[0]!r}")
    example = checkers.utils.InputExample(
        key=0, instruction_id_list=list(ids), prompt=prompt, kwargs=[dict(k) for k in kwargs]
    )
    strict = checkers.utils.test_instruction_following_strict(example, response)
    loose = checkers.utils.test_instruction_following_loose(example, response)
    return InstructionResult(
        instruction_ids=list(ids),
        strict=list(strict.follow_instruction_list),
        loose=list(loose.follow_instruction_list),
    )
