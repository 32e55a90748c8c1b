"""Verifiable constraints on a response: the checks behind the `rules` reward backend.

A prompt may carry constraints (`Constraint(type=..., args={...})`); a response either satisfies
each one or not, so a reward can be computed without a learned model. Every type, its arguments and
its exact rule:

| type                 | args                         | satisfied when                                          |
|----------------------|------------------------------|---------------------------------------------------------|
| `word_count`         | `min?`, `max?`               | min <= words <= max (words: runs of letters/digits,     |
|                      |                              | joined by `'` or `-`, so "don't" and "well-known" = 1)  |
| `sentence_count`     | `min?`, `max?`               | min <= sentences <= max (text split after `.`, `!`, `?` |
|                      |                              | and at blank lines; pieces without a word don't count)  |
| `paragraph_count`    | `min?`, `max?`               | min <= paragraphs <= max (blocks between blank lines)   |
| `char_count`         | `min?`, `max?`               | min <= characters <= max (surrounding whitespace off)   |
| `include_keywords`   | `keywords` (list)            | every keyword occurs (case-insensitive, whole words)    |
| `forbidden_keywords` | `keywords` (list)            | no keyword occurs (case-insensitive, whole words)       |
| `all_lowercase`      | none                         | the response has no uppercase letter                    |
| `all_uppercase`      | none                         | the response has no lowercase letter                    |
| `bullet_count`       | `min?`, `max?`               | min <= bullet lines <= max (a line starting with `-`,   |
|                      |                              | `*` or `•` then a space, so `**bold**` is no bullet)    |
| `starts_with`        | `phrase`                     | the trimmed response starts with phrase (any case)      |
| `ends_with`          | `phrase`                     | the trimmed response ends with phrase (any case)        |
| `json_parsable`      | none                         | the response (one surrounding ``` fence allowed) parses |
|                      |                              | as JSON                                                 |
| `no_commas`          | none                         | the response contains no `,`                            |
| `keyword_frequency`  | `keyword`, `min?`, `max?`    | min <= whole-word occurrences of keyword <= max         |
| `ifeval`             | `id`, `kwargs?`              | IFEval instruction `id` (e.g. `keywords:existence`) with|
|                      |                              | its IFEval `kwargs` passes lm-eval's strict checker     |

Range types need at least one of `min`/`max` (non-negative integers, min <= max). Bad constraints
fail with a `ValueError` naming the constraint type and argument: `validate_constraints` runs at
prompt ingestion so a bad file fails before any model is loaded.

`score_constraints` is the fraction satisfied; with no constraints it is 1.0 (nothing is violated),
so a `rules` reward over unconstrained prompts reduces to its length penalty.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from avr_core.ifeval import follows_instructions, instruction_ids
from avr_core.schemas import Constraint

__all__ = [
    "CONSTRAINT_CHECKERS",
    "CONSTRAINT_TYPES",
    "ConstraintType",
    "check_constraint",
    "count_words",
    "score_constraints",
    "validate_constraint",
    "validate_constraints",
]

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_BULLET_LINE = re.compile(r"^[ \t]*[-*•][ \t]+\S", re.MULTILINE)
_CODE_FENCE = re.compile(r"^```[\w-]*[ \t]*\n(.*)\n```$", re.DOTALL)


# ---------------------------------------------------------------- measurements of a response


def count_words(text: str) -> int:
    """Number of words: runs of letters/digits, so punctuation and bullet marks are not words."""
    return len(_WORD.findall(text))


def count_sentences(text: str) -> int:
    """Number of sentences: pieces after `.`, `!`, `?` or a blank line that contain a word."""
    return sum(1 for piece in _SENTENCE_END.split(text.strip()) if _WORD.search(piece))


def count_paragraphs(text: str) -> int:
    """Number of non-empty blocks separated by blank lines."""
    return sum(1 for block in _PARAGRAPH_BREAK.split(text) if block.strip())


def count_bullets(text: str) -> int:
    """Number of lines that start with a bullet mark (`-`, `*`, `•`) followed by a space."""
    return len(_BULLET_LINE.findall(text))


def count_keyword(text: str, keyword: str) -> int:
    """Case-insensitive whole-word occurrences of `keyword` (which may hold several words)."""
    # \b would fail next to a keyword that starts or ends with punctuation ("c++"): use lookarounds.
    pattern = rf"(?<!\w){re.escape(keyword.strip())}(?!\w)"
    return len(re.findall(pattern, text, flags=re.IGNORECASE))


def _within(value: int, args: Mapping[str, Any]) -> bool:
    low: int = args.get("min", 0)
    high: int = args.get("max", value)
    return low <= value <= high


def _strip_code_fence(text: str) -> str:
    match = _CODE_FENCE.match(text.strip())
    return match.group(1) if match else text.strip()


def _is_json(text: str) -> bool:
    try:
        json.loads(_strip_code_fence(text))
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- the constraint types

_COUNT = "count"  # a non-negative integer bound
_KEYWORDS = "keywords"  # a non-empty list of non-empty strings
_TEXT = "text"  # a non-empty string
_OBJECT = "object"  # a mapping (e.g. IFEval kwargs)
_INSTRUCTION = "instruction"  # an IFEval instruction id known to the checkers


@dataclass(frozen=True)
class ConstraintType:
    """One constraint type: its arguments (name -> kind) and its check."""

    name: str
    check: Callable[[str, Mapping[str, Any]], bool]
    required: Mapping[str, str]
    optional: Mapping[str, str]
    needs_bound: bool = False  # at least one of min/max must be given


def _range_type(name: str, measure: Callable[[str], int]) -> ConstraintType:
    return ConstraintType(
        name,
        check=lambda response, args: _within(measure(response), args),
        required={},
        optional={"min": _COUNT, "max": _COUNT},
        needs_bound=True,
    )


_TYPES: list[ConstraintType] = [
    _range_type("word_count", count_words),
    _range_type("sentence_count", count_sentences),
    _range_type("paragraph_count", count_paragraphs),
    _range_type("char_count", lambda text: len(text.strip())),
    _range_type("bullet_count", count_bullets),
    ConstraintType(
        "include_keywords",
        check=lambda r, a: all(count_keyword(r, k) > 0 for k in a["keywords"]),
        required={"keywords": _KEYWORDS},
        optional={},
    ),
    ConstraintType(
        "forbidden_keywords",
        check=lambda r, a: not any(count_keyword(r, k) > 0 for k in a["keywords"]),
        required={"keywords": _KEYWORDS},
        optional={},
    ),
    ConstraintType("all_lowercase", lambda r, a: r == r.lower(), {}, {}),
    ConstraintType("all_uppercase", lambda r, a: r == r.upper(), {}, {}),
    ConstraintType(
        "starts_with",
        check=lambda r, a: r.strip().lower().startswith(a["phrase"].strip().lower()),
        required={"phrase": _TEXT},
        optional={},
    ),
    ConstraintType(
        "ends_with",
        check=lambda r, a: r.strip().lower().endswith(a["phrase"].strip().lower()),
        required={"phrase": _TEXT},
        optional={},
    ),
    ConstraintType("json_parsable", lambda r, a: _is_json(r), {}, {}),
    ConstraintType("no_commas", lambda r, a: "," not in r, {}, {}),
    ConstraintType(
        "keyword_frequency",
        check=lambda r, a: _within(count_keyword(r, a["keyword"]), a),
        required={"keyword": _TEXT},
        optional={"min": _COUNT, "max": _COUNT},
        needs_bound=True,
    ),
]


def _follows_ifeval(response: str, args: Mapping[str, Any]) -> bool:
    """IFEval's strict check of one instruction (the maintained checkers, see avr_core.ifeval)."""
    kwargs = dict(args.get("kwargs") or {})
    return follows_instructions("", response, [args["id"]], [kwargs]).strict[0]


# IFEval-format constraints (`instruction_id_list` + `kwargs` rows, as in IFEval and Tulu 3 RLVR
# data) are checked by lm-eval's checkers, not written again here.
_TYPES.append(
    ConstraintType(
        "ifeval",
        check=_follows_ifeval,
        required={"id": _INSTRUCTION},
        optional={"kwargs": _OBJECT},
    )
)

CONSTRAINT_TYPES: dict[str, ConstraintType] = {t.name: t for t in _TYPES}
CONSTRAINT_CHECKERS: dict[str, Callable[[str, Mapping[str, Any]], bool]] = {
    t.name: t.check for t in _TYPES
}


# ---------------------------------------------------------------- validation


def _check_arg(kind: str, value: Any) -> str | None:
    """Why `value` is not a valid argument of `kind`, or None when it is."""
    if kind == _COUNT:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"must be a non-negative integer, got {value!r}"
    elif kind == _KEYWORDS:
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(k, str) and k.strip() for k in value)
        ):
            return f"must be a non-empty list of non-empty strings, got {value!r}"
    elif kind == _TEXT and (not isinstance(value, str) or not value.strip()):
        return f"must be a non-empty string, got {value!r}"
    elif kind == _OBJECT and not isinstance(value, Mapping):
        return f"must be an object, got {value!r}"
    elif kind == _INSTRUCTION and (not isinstance(value, str) or value not in instruction_ids()):
        return f"must be an IFEval instruction id (e.g. keywords:existence), got {value!r}"
    return None


def _as_constraint(constraint: Constraint | Mapping[str, Any], where: str) -> Constraint:
    if isinstance(constraint, Constraint):
        return constraint
    if not isinstance(constraint, Mapping) or not isinstance(constraint.get("type"), str):
        raise ValueError(f"{where}: expected {{'type': str, 'args': {{...}}}}, got {constraint!r}")
    args = constraint.get("args") or {}
    if not isinstance(args, Mapping):
        raise ValueError(f"{where} ({constraint['type']}): 'args' must be an object, got {args!r}")
    extra = set(constraint) - {"type", "args"}
    if extra:
        raise ValueError(f"{where} ({constraint['type']}): unknown keys {sorted(extra)}")
    return Constraint(type=constraint["type"], args=dict(args))


def validate_constraint(
    constraint: Constraint | Mapping[str, Any], where: str = "constraint"
) -> Constraint:
    """The constraint as a `Constraint`, or a ValueError naming its type and the bad argument."""
    constraint = _as_constraint(constraint, where)
    ctype = CONSTRAINT_TYPES.get(constraint.type)
    if ctype is None:
        raise ValueError(
            f"{where}: unknown constraint type {constraint.type!r}; "
            f"known types: {', '.join(sorted(CONSTRAINT_TYPES))}"
        )
    label = f"{where} ({constraint.type})"
    allowed = {**ctype.required, **ctype.optional}
    for name in constraint.args:
        if name not in allowed:
            expected = ", ".join(allowed) or "no arguments"
            raise ValueError(f"{label}: unknown argument {name!r} (expected {expected})")
    for name in ctype.required:
        if name not in constraint.args:
            raise ValueError(f"{label}: missing required argument {name!r}")
    for name, value in constraint.args.items():
        problem = _check_arg(allowed[name], value)
        if problem:
            raise ValueError(f"{label}: argument {name!r} {problem}")
    if ctype.needs_bound:
        low, high = constraint.args.get("min"), constraint.args.get("max")
        if low is None and high is None:
            raise ValueError(f"{label}: give at least one of the arguments 'min' and 'max'")
        if low is not None and high is not None and low > high:
            raise ValueError(f"{label}: argument 'min' ({low}) is greater than 'max' ({high})")
    return constraint


def validate_constraints(
    constraints: Sequence[Constraint | Mapping[str, Any]], where: str = "constraints"
) -> list[Constraint]:
    """Every constraint validated (see `validate_constraint`); the first bad one raises."""
    if isinstance(constraints, (str, bytes, Mapping)) or not isinstance(constraints, Sequence):
        raise ValueError(f"{where}: expected a list of constraints, got {constraints!r}")
    return [validate_constraint(c, f"{where}[{i}]") for i, c in enumerate(constraints)]


# ---------------------------------------------------------------- checking


def check_constraint(constraint: Constraint | Mapping[str, Any], response: str) -> bool:
    """Whether `response` satisfies one constraint (validated first, so bad args raise)."""
    constraint = validate_constraint(constraint)
    return CONSTRAINT_CHECKERS[constraint.type](response, constraint.args)


def score_constraints(
    response: str, constraints: Sequence[Constraint | Mapping[str, Any]]
) -> float:
    """Fraction of `constraints` that `response` satisfies; 1.0 when there are none."""
    checked = validate_constraints(constraints)
    if not checked:
        return 1.0
    satisfied = sum(CONSTRAINT_CHECKERS[c.type](response, c.args) for c in checked)
    return satisfied / len(checked)
