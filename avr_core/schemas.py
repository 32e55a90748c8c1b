"""Typed records that cross a stage boundary (DESIGN section 4), each with one explicit Arrow schema.

Field names are the contract between stages and with TRL; extra fields are allowed but these are
fixed. Every record converts losslessly to a pyarrow Table and back (`records_to_table`,
`table_to_records`); readers validate the schema and name the offending field when it differs.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = "1"

Role = Literal["system", "user", "assistant"]


class Message(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(frozen=True)
    role: Role
    content: str


Conversation = list[Message]

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
CONVERSATION_TYPE = pa.list_(MESSAGE_TYPE)


class Sampling(BaseModel):
    """Sampling settings of one generation call; `n` samples per conversation share its prompt."""

    # A misspelt key sent from the UI or a config file must fail, not silently keep the default.
    model_config = ConfigDict(extra="forbid")
    n: int = Field(1, ge=1, description="samples per conversation")
    temperature: float = Field(0.7, ge=0.0, description="0 means greedy decoding")
    top_p: float = Field(0.8, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1, description="new tokens per sample")
    seed: int | None = Field(0, description="base seed; None for nondeterministic sampling")


SAMPLING_TYPE = pa.struct(
    [
        ("n", pa.int64()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("max_tokens", pa.int64()),
        ("seed", pa.int64()),
    ]
)


class Lineage(BaseModel):
    """Where a record came from: enough to tell two datasets apart and to reproduce one."""

    run: str = ""
    stage: str = ""
    step: str = ""
    generator: str = ""
    reward_model: str = ""
    template_version: str = ""
    sampling: Sampling | None = None


LINEAGE_TYPE = pa.struct(
    [
        ("run", pa.string()),
        ("stage", pa.string()),
        ("step", pa.string()),
        ("generator", pa.string()),
        ("reward_model", pa.string()),
        ("template_version", pa.string()),
        ("sampling", SAMPLING_TYPE),
    ]
)


class Constraint(BaseModel):
    """A machine-checkable requirement on a response (see avr_core.constraints for the types).

    `args` is type-specific (e.g. {"min": 50, "max": 120} for `word_count`). In Arrow it is stored
    as a JSON string so that constraint types can be added without a schema change.
    """

    model_config = ConfigDict(frozen=True)
    type: str
    args: dict[str, Any] = Field(default_factory=dict)


CONSTRAINT_TYPE = pa.struct([("type", pa.string()), ("args", pa.string())])


class ArrowRecord(BaseModel):
    """Base of every stored record: an Arrow schema plus lossless row conversion."""

    arrow_schema: ClassVar[pa.Schema]
    # Fields added after data was first stored: a table without them still reads (defaults).
    optional_fields: ClassVar[frozenset[str]] = frozenset()

    def to_row(self) -> dict[str, Any]:
        row = self.model_dump(mode="python")
        return _encode_constraints(row)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ArrowRecord:
        return cls.model_validate(_decode_constraints(dict(row)))


def _encode_constraints(row: dict[str, Any]) -> dict[str, Any]:
    if "constraints" in row and row["constraints"] is not None:
        row["constraints"] = [
            {"type": c["type"], "args": json.dumps(c["args"], sort_keys=True)}
            for c in row["constraints"]
        ]
    return row


def _decode_constraints(row: dict[str, Any]) -> dict[str, Any]:
    if "constraints" in row and row["constraints"] is not None:
        row["constraints"] = [
            {"type": c["type"], "args": json.loads(c["args"]) if c["args"] else {}}
            for c in row["constraints"]
        ]
    return row


class PromptRecord(ArrowRecord):
    """One input prompt: a conversation ending with a user turn, plus optional constraints and
    an optional reference answer (a Stage II search may start from it)."""

    prompt_id: str
    messages: Conversation
    constraints: list[Constraint] = Field(default_factory=list)
    source: str = ""
    reference: str | None = None

    arrow_schema: ClassVar[pa.Schema] = pa.schema(
        [
            ("prompt_id", pa.string()),
            ("messages", CONVERSATION_TYPE),
            ("constraints", pa.list_(CONSTRAINT_TYPE)),
            ("source", pa.string()),
            ("reference", pa.string()),
        ]
    )
    optional_fields: ClassVar[frozenset[str]] = frozenset({"reference"})


class Refinement(BaseModel):
    text: str
    score: float | None = None


REFINEMENT_TYPE = pa.struct([("text", pa.string()), ("score", pa.float64())])


class Critique(BaseModel):
    text: str
    rating: int | None = None
    refinements: list[Refinement] = Field(default_factory=list)
    format_retries: int = Field(0, description="re-samples spent to get a parseable rating")


CRITIQUE_TYPE = pa.struct(
    [
        ("text", pa.string()),
        ("rating", pa.int64()),
        ("refinements", pa.list_(REFINEMENT_TYPE)),
        ("format_retries", pa.int64()),
    ]
)


class TokenCount(BaseModel):
    """The tokens of one generated text of a record, as the engine counted them: `text` names it
    by its path in the record (`messages[2].content`, `critiques[0].refinements[1].text`,
    `rounds[1].critique`, `samples[3].response`), `prompt_tokens` the rendered conversation it
    answered, `completion_tokens` the text itself (stop token included)."""

    text: str
    prompt_tokens: int
    completion_tokens: int


_PATH_PART = re.compile(r"([A-Za-z_]\w*)(?:\[(\d+)\])?")


def text_at(record: BaseModel, path: str) -> str:
    """The text a `TokenCount.text` path names in `record`, e.g. `critiques[0].refinements[1].text`
    (KeyError naming the path when it names nothing)."""
    node: Any = record
    for part in path.split("."):
        match = _PATH_PART.fullmatch(part)
        try:
            if match is None:
                raise KeyError(part)
            node = getattr(node, match.group(1))
            if match.group(2) is not None:
                node = node[int(match.group(2))]
        except (AttributeError, IndexError, KeyError, TypeError) as err:
            raise KeyError(f"{type(record).__name__} has no text at {path!r}") from err
    if not isinstance(node, str):
        raise KeyError(f"{type(record).__name__}.{path} is not a text")
    return node


TOKEN_COUNT_TYPE = pa.struct(
    [("text", pa.string()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())]
)
TOKEN_COUNTS_FIELD = ("token_counts", pa.list_(TOKEN_COUNT_TYPE))
# Records stored before token accounting have no such column: they read with no counts.
TOKEN_COUNTS_OPTIONAL = frozenset({"token_counts"})


class RefinementTree(ArrowRecord):
    """Stage I tree: the answer being refined (last message), its critiques and their refinements."""

    prompt_id: str
    messages: Conversation
    answer_score: float | None = None
    critiques: list[Critique] = Field(default_factory=list)
    constraints: list[Constraint] = Field(default_factory=list)
    lineage: Lineage = Field(default_factory=Lineage)
    token_counts: list[TokenCount] = Field(
        default_factory=list, description="tokens of each generated text (empty: not counted)"
    )

    @field_validator("messages")
    @classmethod
    def _ends_with_answer(cls, messages: Conversation) -> Conversation:
        if not messages or messages[-1].role != "assistant":
            raise ValueError("messages must end with the assistant answer being refined")
        return messages

    @property
    def answer(self) -> str:
        return self.messages[-1].content

    arrow_schema: ClassVar[pa.Schema] = pa.schema(
        [
            ("prompt_id", pa.string()),
            ("messages", CONVERSATION_TYPE),
            ("answer_score", pa.float64()),
            ("critiques", pa.list_(CRITIQUE_TYPE)),
            ("constraints", pa.list_(CONSTRAINT_TYPE)),
            ("lineage", LINEAGE_TYPE),
            TOKEN_COUNTS_FIELD,
        ]
    )
    optional_fields: ClassVar[frozenset[str]] = TOKEN_COUNTS_OPTIONAL


SFTKind = Literal["refinement", "original", "trajectory"]


class SFTExample(ArrowRecord):
    prompt_id: str
    messages: Conversation
    kind: SFTKind
    lineage: Lineage = Field(default_factory=Lineage)

    arrow_schema: ClassVar[pa.Schema] = pa.schema(
        [
            ("prompt_id", pa.string()),
            ("messages", CONVERSATION_TYPE),
            ("kind", pa.string()),
            ("lineage", LINEAGE_TYPE),
        ]
    )


PairKind = Literal["generation", "critique", "refinement", "trajectory"]


class PreferencePair(ArrowRecord):
    """TRL conversational preference row: `prompt`, `chosen`, `rejected` (+ scores and lineage)."""

    prompt_id: str
    kind: PairKind
    prompt: Conversation
    chosen: Conversation
    rejected: Conversation
    chosen_score: float
    rejected_score: float
    lineage: Lineage = Field(default_factory=Lineage)

    arrow_schema: ClassVar[pa.Schema] = pa.schema(
        [
            ("prompt_id", pa.string()),
            ("kind", pa.string()),
            ("prompt", CONVERSATION_TYPE),
            ("chosen", CONVERSATION_TYPE),
            ("rejected", CONVERSATION_TYPE),
            ("chosen_score", pa.float64()),
            ("rejected_score", pa.float64()),
            ("lineage", LINEAGE_TYPE),
        ]
    )


class Round(BaseModel):
    """One Stage II greedy round: critiques of `answer`, each with scored refinements."""

    answer: str
    critiques: list[Critique] = Field(default_factory=list)
    best: tuple[int, int] | None = Field(
        None,
        description="[critique_index, refinement_index] of the refinement that beat the current "
        "answer (None: the round did not improve, and the search stopped)",
    )
    best_score: float | None = Field(
        None,
        description="the round's highest refinement score (the winner's when `best` is set; "
        "None when no refinement was scored)",
    )


ROUND_TYPE = pa.struct(
    [
        ("answer", pa.string()),
        ("critiques", pa.list_(CRITIQUE_TYPE)),
        ("best", pa.list_(pa.int64())),
        ("best_score", pa.float64()),
    ]
)


class GreedySearch(ArrowRecord):
    prompt_id: str
    messages: Conversation
    initial_score: float | None = None
    rounds: list[Round] = Field(default_factory=list)
    constraints: list[Constraint] = Field(default_factory=list)
    lineage: Lineage = Field(default_factory=Lineage)
    token_counts: list[TokenCount] = Field(
        default_factory=list, description="tokens of each generated text (empty: not counted)"
    )

    arrow_schema: ClassVar[pa.Schema] = pa.schema(
        [
            ("prompt_id", pa.string()),
            ("messages", CONVERSATION_TYPE),
            ("initial_score", pa.float64()),
            ("rounds", pa.list_(ROUND_TYPE)),
            ("constraints", pa.list_(CONSTRAINT_TYPE)),
            ("lineage", LINEAGE_TYPE),
            TOKEN_COUNTS_FIELD,
        ]
    )
    optional_fields: ClassVar[frozenset[str]] = TOKEN_COUNTS_OPTIONAL


class CoTResponse(BaseModel):
    """One long response: the whole text, its parsed final answer (None: did not parse) and the
    score of that final answer alone."""

    response: str
    final_answer: str | None = None
    score: float | None = None
    format_retries: int = Field(0, description="re-samples spent to get a parseable final answer")


COT_RESPONSE_TYPE = pa.struct(
    [
        ("response", pa.string()),
        ("final_answer", pa.string()),
        ("score", pa.float64()),
        ("format_retries", pa.int64()),
    ]
)


class CoTSample(ArrowRecord):
    prompt_id: str
    prompt: Conversation
    reference_score: float | None = None
    samples: list[CoTResponse] = Field(default_factory=list)
    constraints: list[Constraint] = Field(default_factory=list)
    lineage: Lineage = Field(default_factory=Lineage)
    token_counts: list[TokenCount] = Field(
        default_factory=list, description="tokens of each generated text (empty: not counted)"
    )

    arrow_schema: ClassVar[pa.Schema] = pa.schema(
        [
            ("prompt_id", pa.string()),
            ("prompt", CONVERSATION_TYPE),
            ("reference_score", pa.float64()),
            ("samples", pa.list_(COT_RESPONSE_TYPE)),
            ("constraints", pa.list_(CONSTRAINT_TYPE)),
            ("lineage", LINEAGE_TYPE),
            TOKEN_COUNTS_FIELD,
        ]
    )
    optional_fields: ClassVar[frozenset[str]] = TOKEN_COUNTS_OPTIONAL


class AnswerRound(BaseModel):
    """One round of test-time refinement: the critique of the previous answer, the refinement it
    led to, and the answer after the round (the refinement, or with `keep_best` the previous
    answer when the refinement scored no higher). Round 0 is the starting answer alone."""

    answer: str
    critique: str | None = None
    refinement: str | None = None
    score: float | None = Field(None, description="reward of `answer` (when a reward model ran)")
    kept_previous: bool = False


ANSWER_ROUND_TYPE = pa.struct(
    [
        ("answer", pa.string()),
        ("critique", pa.string()),
        ("refinement", pa.string()),
        ("score", pa.float64()),
        ("kept_previous", pa.bool_()),
    ]
)


class RefinedAnswers(ArrowRecord):
    """Test-time refinement of one prompt: round 0 (the starting answer, by `generator`) and
    every refinement round after it, so one record gives the whole 0..N curve."""

    prompt_id: str
    prompt: Conversation
    generator: str = Field("", description="who wrote the starting answer (model id or name)")
    rounds: list[AnswerRound] = Field(default_factory=list)
    constraints: list[Constraint] = Field(default_factory=list)
    lineage: Lineage = Field(default_factory=Lineage)
    token_counts: list[TokenCount] = Field(
        default_factory=list, description="tokens of each generated text (empty: not counted)"
    )

    arrow_schema: ClassVar[pa.Schema] = pa.schema(
        [
            ("prompt_id", pa.string()),
            ("prompt", CONVERSATION_TYPE),
            ("generator", pa.string()),
            ("rounds", pa.list_(ANSWER_ROUND_TYPE)),
            ("constraints", pa.list_(CONSTRAINT_TYPE)),
            ("lineage", LINEAGE_TYPE),
            TOKEN_COUNTS_FIELD,
        ]
    )
    optional_fields: ClassVar[frozenset[str]] = TOKEN_COUNTS_OPTIONAL


class ThoughtAnswer(ArrowRecord):
    """A thinking (Stage II) model's long response to one prompt and the final answer parsed
    from it; `format_failure` marks a prompt whose response never parsed (kept, never dropped)."""

    prompt_id: str
    prompt: Conversation
    response: str
    final_answer: str | None = None
    format_retries: int = 0
    format_failure: bool = False
    constraints: list[Constraint] = Field(default_factory=list)
    lineage: Lineage = Field(default_factory=Lineage)
    token_counts: list[TokenCount] = Field(
        default_factory=list, description="tokens of each generated text (empty: not counted)"
    )

    arrow_schema: ClassVar[pa.Schema] = pa.schema(
        [
            ("prompt_id", pa.string()),
            ("prompt", CONVERSATION_TYPE),
            ("response", pa.string()),
            ("final_answer", pa.string()),
            ("format_retries", pa.int64()),
            ("format_failure", pa.bool_()),
            ("constraints", pa.list_(CONSTRAINT_TYPE)),
            ("lineage", LINEAGE_TYPE),
            TOKEN_COUNTS_FIELD,
        ]
    )
    optional_fields: ClassVar[frozenset[str]] = TOKEN_COUNTS_OPTIONAL


class Judgement(ArrowRecord):
    """One prompt x system x judge of an evaluation: the candidate's preference over the
    baseline (None: the judge gave no usable verdict, counted) and what it was computed from."""

    prompt_id: str
    system: str
    baseline: str
    judge: str
    preference: float | None = None
    candidate_score: float | None = None
    baseline_score: float | None = None
    candidate_chars: int = Field(0, description="characters of the candidate's (final) answer")
    baseline_chars: int = 0
    candidate_response_chars: int = Field(0, description="the whole response, thinking included")
    rounds: int = Field(0, description="refinement rounds behind the candidate's answer")
    consistent: bool | None = Field(None, description="pairwise judge: both orders agreed")
    detail: str = Field("", description="judge output (pairwise: both replies), for auditing")

    arrow_schema: ClassVar[pa.Schema] = pa.schema(
        [
            ("prompt_id", pa.string()),
            ("system", pa.string()),
            ("baseline", pa.string()),
            ("judge", pa.string()),
            ("preference", pa.float64()),
            ("candidate_score", pa.float64()),
            ("baseline_score", pa.float64()),
            ("candidate_chars", pa.int64()),
            ("baseline_chars", pa.int64()),
            ("candidate_response_chars", pa.int64()),
            ("rounds", pa.int64()),
            ("consistent", pa.bool_()),
            ("detail", pa.string()),
        ]
    )


RECORD_TYPES: dict[str, type[ArrowRecord]] = {
    cls.__name__: cls
    for cls in (
        PromptRecord,
        RefinementTree,
        SFTExample,
        PreferencePair,
        GreedySearch,
        CoTSample,
        RefinedAnswers,
        ThoughtAnswer,
        Judgement,
    )
}


class SchemaMismatchError(ValueError):
    """A stored table does not match the record type it is read as."""


def records_to_table(records: list[ArrowRecord], record_type: type[ArrowRecord]) -> pa.Table:
    """Rows of `record_type` as a Table with exactly its Arrow schema (empty lists allowed)."""
    for i, record in enumerate(records):
        if not isinstance(record, record_type):
            raise TypeError(
                f"row {i}: expected {record_type.__name__}, got {type(record).__name__}"
            )
    return pa.Table.from_pylist([r.to_row() for r in records], schema=record_type.arrow_schema)


def check_schema(table_schema: pa.Schema, record_type: type[ArrowRecord], where: str = "") -> None:
    """Fail with the first differing field if `table_schema` lacks or mistypes a contract field."""
    expected = record_type.arrow_schema
    prefix = f"{where}: " if where else ""
    for field in expected:
        idx = table_schema.get_field_index(field.name)
        if idx < 0 and field.name in record_type.optional_fields:
            continue
        if idx < 0:
            raise SchemaMismatchError(
                f"{prefix}missing field {field.name!r} for {record_type.__name__} "
                f"(schema version {SCHEMA_VERSION})"
            )
        actual = table_schema.field(idx).type
        if not actual.equals(field.type):
            raise SchemaMismatchError(
                f"{prefix}field {field.name!r} of {record_type.__name__} has type {actual}, "
                f"expected {field.type}"
            )


def table_to_records(table: pa.Table, record_type: type[ArrowRecord]) -> list[ArrowRecord]:
    """Validate the schema, then rebuild the records; a bad row is named by its index."""
    check_schema(table.schema, record_type)
    records = []
    present = [name for name in record_type.arrow_schema.names if name in table.schema.names]
    for i, row in enumerate(table.select(present).to_pylist()):
        try:
            records.append(record_type.from_row(row))
        except ValueError as err:
            raise SchemaMismatchError(f"row {i} of {record_type.__name__}: {err}") from err
    return records
