"""Prompt templates (Jinja files loaded by name) and the parsers that read model output back.

Each LLM step is a pair: build the messages from a template, parse the reply. Parsers never raise
on unparseable text: they return None so the row records the failure instead of crashing a shard.

The bundled templates live in `avr_core/templates/*.jinja`; a user directory replaces them as a
whole and must hold every required template. `Templates.version` hashes the contents of all
templates, so changing any wording changes the config fingerprint and the records' lineage.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from avr_core.schemas import Conversation, Message

__all__ = [
    "BUNDLED_TEMPLATE_DIR",
    "FINAL_ANSWER_MARKER",
    "REQUIRED_TEMPLATES",
    "TEMPLATE_SUFFIX",
    "TemplateNotFoundError",
    "Templates",
    "build_critique_messages",
    "build_refine_messages",
    "extract_final_answer",
    "extract_rating",
    "judge_request",
    "load_templates",
    "refine_request",
]

# A line no ordinary answer starts with: a Stage II trajectory puts the final answer after it.
FINAL_ANSWER_MARKER = "### FINAL ANSWER ###"

TEMPLATE_SUFFIX = ".jinja"
REQUIRED_TEMPLATES = ("judge", "refine", "trajectory")
BUNDLED_TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
VERSION_LENGTH = 12


class TemplateNotFoundError(FileNotFoundError):
    """A template name has no `<name>.jinja` file in the template directory."""


@dataclass(frozen=True)
class Templates:
    """The template files of one directory, with a content hash for lineage and fingerprints."""

    directory: Path
    version: str
    sources: dict[str, str] = field(repr=False, compare=False)
    _environment: jinja2.Environment = field(repr=False, compare=False)

    def render(self, name: str, /, **variables: Any) -> str:
        """Render template `name` with `variables` (`name` is positional-only, so a template may
        use a variable called `name`); every variable the template uses must be given."""
        if name not in self.sources:
            raise TemplateNotFoundError(
                f"no template {name!r}: file {name}{TEMPLATE_SUFFIX} is missing from {self.directory}"
            )
        template = self._environment.from_string(self.sources[name])
        try:
            text: str = template.render(**variables)
        except jinja2.UndefinedError as err:
            raise ValueError(
                f"template {name}{TEMPLATE_SUFFIX} in {self.directory}: {err.message}"
            ) from err
        return text.strip()


def load_templates(directory: str | Path | None = None) -> Templates:
    """Load every `*.jinja` file of `directory` (None: the bundled defaults) and hash them."""
    if directory is None:
        return _bundled_templates()
    return _read_templates(Path(directory).expanduser().resolve())


@lru_cache(maxsize=1)
def _bundled_templates() -> Templates:
    # Loaded once per process: selection functions fall back to it on every tree.
    return _read_templates(BUNDLED_TEMPLATE_DIR)


def _read_templates(directory: Path) -> Templates:
    """Read and validate one template directory."""
    if not directory.is_dir():
        raise TemplateNotFoundError(f"template directory {directory} does not exist")
    sources = {
        path.name.removesuffix(TEMPLATE_SUFFIX): path.read_text(encoding="utf-8")
        for path in sorted(directory.glob(f"*{TEMPLATE_SUFFIX}"))
        if path.is_file()
    }
    missing = [name for name in REQUIRED_TEMPLATES if name not in sources]
    if missing:
        files = ", ".join(f"{name}{TEMPLATE_SUFFIX}" for name in missing)
        raise TemplateNotFoundError(f"template directory {directory} lacks {files}")
    # StrictUndefined: a misspelt variable must fail, not silently render as an empty string.
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False
    )
    for name, source in sources.items():
        try:
            environment.parse(source)
        except jinja2.TemplateSyntaxError as err:
            raise ValueError(
                f"template {name}{TEMPLATE_SUFFIX} in {directory}, line {err.lineno}: {err.message}"
            ) from err
    return Templates(
        directory=directory,
        version=templates_version(sources),
        sources=sources,
        _environment=environment,
    )


def templates_version(sources: dict[str, str]) -> str:
    """Short sha256 over (name, contents) of all templates, sorted by name."""
    digest = hashlib.sha256()
    for name in sorted(sources):
        # Length prefixes keep ("ab", "c") and ("a", "bc") from hashing alike.
        for part in (name, sources[name]):
            encoded = part.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "big"))
            digest.update(encoded)
    return digest.hexdigest()[:VERSION_LENGTH]


def judge_request(templates: Templates) -> Message:
    """The user turn that asks the assistant to critique and rate its previous answer."""
    return Message(role="user", content=templates.render("judge"))


def refine_request(templates: Templates) -> Message:
    """The user turn that asks the assistant to rewrite its answer using its critique."""
    return Message(role="user", content=templates.render("refine"))


def build_critique_messages(messages: Conversation, templates: Templates) -> Conversation:
    """The conversation ending with the answer to critique, plus the judge request."""
    _require_assistant_last(messages)
    return [*messages, judge_request(templates)]


def build_refine_messages(
    messages: Conversation, critique: str, templates: Templates
) -> Conversation:
    """The answer's conversation + [judge request, the critique, refine request]."""
    _require_assistant_last(messages)
    return [
        *messages,
        judge_request(templates),
        Message(role="assistant", content=critique),
        refine_request(templates),
    ]


def _require_assistant_last(messages: Conversation) -> None:
    if not messages or messages[-1].role != "assistant":
        raise ValueError("messages must end with the assistant answer to critique")


# [[7]], [[ 7 ]] and [[7/10]] all read as 7. Only integers count; the range is checked after.
_RATING_PATTERN = re.compile(r"\[\[\s*(\d{1,3})\s*(?:/\s*10\s*)?\]\]")
MIN_RATING, MAX_RATING = 1, 10


def extract_rating(text: str) -> int | None:
    """The last `[[N]]` rating with N in 1..10 (the judge prompt asks to end with it), else None.

    The last valid one wins because a critique may quote the format or rate parts before giving
    its overall verdict at the end. Accepted forms: `[[7]]`, `[[ 7 ]]`, `[[7/10]]`; out-of-range
    numbers, decimals and other scales are skipped.
    """
    ratings = [int(m.group(1)) for m in _RATING_PATTERN.finditer(text)]
    valid = [r for r in ratings if MIN_RATING <= r <= MAX_RATING]
    return valid[-1] if valid else None


def extract_final_answer(text: str) -> str | None:
    """The text after the last FINAL_ANSWER_MARKER, stripped; None if the marker is absent or
    nothing follows it."""
    position = text.rfind(FINAL_ANSWER_MARKER)
    if position < 0:
        return None
    answer = text[position + len(FINAL_ANSWER_MARKER) :].strip()
    return answer or None
