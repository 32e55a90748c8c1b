"""Dataset cards: a Hugging Face-format `README.md` beside each sealed step's shards.

The card's YAML header names the shards as the data files (`configs`), so
`datasets.load_dataset(step_dir)` loads exactly them, never `_manifest.json`, `_plan.json` or
`_config.yaml`. Its body says what made the step and how to make it again: the flow and its
parameters (also written beside the card as `_config.yaml`, which the `avr run` command it gives
reads), the code version, the models, templates and sampling in the records' lineage, the counts
(kept, dropped and why), character lengths of the main text fields, token counts, and the license.

`render_dataset_card` is pure; `build_card_info` reads what it shows from storage;
`write_step_card` does both after a step is sealed and never raises: a card is documentation,
and failing to write one must not fail (or un-seal) a finished step.
"""

from __future__ import annotations

import logging
import shlex
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

from avr_core.layout import CARD_CONFIG_NAME, CARD_NAME, CHECKPOINTS, RunLayout, StepRef
from avr_core.reporting import COUNT_LABELS, markdown_table, report_rows
from avr_core.results import StepResult
from avr_core.schemas import (
    SCHEMA_VERSION,
    ArrowRecord,
    CoTSample,
    GreedySearch,
    Judgement,
    Lineage,
    Message,
    PreferencePair,
    PromptRecord,
    RefinedAnswers,
    RefinementTree,
    Sampling,
    SFTExample,
    ThoughtAnswer,
)
from avr_core.steps import StepPlan
from avr_core.storage import TOKEN_COUNTERS, DatasetStore, Manifest

__all__ = [
    "CARD_CONFIG_NAME",
    "CARD_NAME",
    "CardInfo",
    "LengthStats",
    "Reproduction",
    "SealedBy",
    "build_card_info",
    "card_header",
    "card_path",
    "flow_config",
    "length_stats",
    "lineage_values",
    "prompt_license",
    "render_config_file",
    "render_dataset_card",
    "reproduce_command",
    "text_fields",
    "token_stats",
    "write_step_card",
]

logger = logging.getLogger(__name__)

# CARD_CONFIG_NAME (avr_core.layout): the flow parameters that sealed the step, as a config file.
# Leading underscore like `_manifest.json`: the factory's metadata, which `datasets` also skips
# when it infers data files.
# What `datasets.load_dataset(step_dir)` loads: the shards (avr_core.layout.shard_name), only.
SHARD_GLOB = "part-*.parquet"
# Length statistics read at most this many rows (shards in order): a card must not cost a re-read
# of a huge step; the card says when its statistics cover only the first rows.
STATS_MAX_ROWS = 50_000
# Distinct lineage values listed per field; a step mixing more models than this says how many.
LINEAGE_MAX_VALUES = 10
# Counters that are filters: rows (or items) left out, and why (labels in COUNT_LABELS).
FILTER_COUNTS = ("rejected_rows", "duplicates")
# The bundled prompt sets (`ingest.prompts: bundled:*`, the default) are written for this project.
BUNDLED_PREFIX = "bundled:"
PACKAGE = "avr-factory"
SIZE_CATEGORIES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
)


@dataclass(frozen=True)
class SealedBy:
    """Who sealed a step: the flow's name, its parameters, the code version (from the task layer,
    which knows the Prefect flow run; the library does not import Prefect)."""

    flow: str | None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    code_version: Mapping[str, str | None] = field(default_factory=dict)


class Reproduction(BaseModel):
    """The flow and config that make the step again (`avr run FLOW --config _config.yaml`)."""

    flow: str
    config: dict[str, Any] = Field(description="the flow's parameters, as a config file")
    origin: Literal["flow run", "run record"] = Field(
        description="the flow run that sealed the step, or (no flow run known) the run's record "
        "(run.json), whose flow may not be the one that wrote this step"
    )


class LengthStats(BaseModel):
    """Character lengths of one text field over the rows read."""

    field: str
    count: int = Field(description="values measured (a field may hold several per row)")
    min: int
    median: float
    mean: float
    max: int


class CardInfo(BaseModel):
    """Everything a dataset card shows about one sealed step."""

    run: str
    stage: str
    step: str
    uri: str = Field(description="the step directory")
    record_type: str
    rows: int
    shards: int
    fingerprint: str
    content_digest: str = Field(description="of every shard's bytes (the manifest's)")
    sealed_at: str
    sources: list[tuple[str, str]] = Field(
        default_factory=list, description="(upstream step, its fingerprint) it was computed from"
    )
    reproduction: Reproduction | None = None
    code_version: dict[str, str | None] = Field(default_factory=dict)
    lineage: dict[str, list[str]] = Field(
        default_factory=dict, description="label -> distinct values in the rows read"
    )
    counts: dict[str, int] = Field(default_factory=dict)
    lengths: list[LengthStats] = Field(default_factory=list, description="in characters")
    tokens: list[LengthStats] = Field(default_factory=list, description="per generated text")
    stats_rows: int = Field(0, description="rows the lineage, lengths and tokens were read from")
    prompt_source: str | None = None
    license: str = "other"
    license_note: str = ""

    @property
    def ref(self) -> StepRef:
        return StepRef(self.stage, self.step)

    @property
    def pretty_name(self) -> str:
        return f"avr-factory {self.run}: {self.stage}/{self.step}"


# ---- what the records hold -----------------------------------------------------------------------


def _text(conversation: Sequence[Message]) -> str:
    return "\n".join(message.content for message in conversation)


def text_fields(record: ArrowRecord) -> dict[str, list[str]]:
    """The main text fields of a record, by name: what the card measures in characters.

    Per record type because each keeps its text elsewhere; a list per field because a tree has
    several critiques. A record type not listed here has no length table.
    """
    match record:
        case PromptRecord():
            reference = [record.reference] if record.reference is not None else []
            return {"prompt": [_text(record.messages)], "reference": reference}
        case SFTExample():
            return {
                "prompt": [_text(record.messages[:-1])],
                "response": [record.messages[-1].content],
            }
        case PreferencePair():
            return {
                "prompt": [_text(record.prompt)],
                "chosen": [_text(record.chosen)],
                "rejected": [_text(record.rejected)],
            }
        case RefinementTree():
            return {
                "prompt": [_text(record.messages[:-1])],
                "answer": [record.answer],
                "critique": [c.text for c in record.critiques],
                "refinement": [r.text for c in record.critiques for r in c.refinements],
            }
        case GreedySearch():
            critiques = [c for r in record.rounds for c in r.critiques]
            return {
                "initial answer": [record.messages[-1].content],
                "critique": [c.text for c in critiques],
                "refinement": [r.text for c in critiques for r in c.refinements],
            }
        case CoTSample():
            return {
                "prompt": [_text(record.prompt)],
                "response": [s.response for s in record.samples],
                "final answer": [s.final_answer for s in record.samples if s.final_answer],
            }
        case RefinedAnswers():
            return {
                "starting answer": [r.answer for r in record.rounds[:1]],
                "final answer": [r.answer for r in record.rounds[-1:]],
                "critique": [r.critique for r in record.rounds if r.critique is not None],
            }
        case ThoughtAnswer():
            final = [record.final_answer] if record.final_answer is not None else []
            return {"response": [record.response], "final answer": final}
        case Judgement():
            return {"judge output": [record.detail]}
    return {}


def _distributions(values: Mapping[str, list[int]]) -> list[LengthStats]:
    """Min/median/mean/max of each named list of values, in name order; empty lists left out."""
    return [
        LengthStats(
            field=name,
            count=len(numbers),
            min=min(numbers),
            median=statistics.median(numbers),
            mean=round(statistics.fmean(numbers), 1),
            max=max(numbers),
        )
        for name, numbers in values.items()
        if numbers
    ]


def length_stats(records: Iterable[ArrowRecord]) -> list[LengthStats]:
    """Characters of each main text field (`text_fields`), in field order."""
    lengths: dict[str, list[int]] = {}
    for record in records:
        for name, texts in text_fields(record).items():
            lengths.setdefault(name, []).extend(len(text) for text in texts)
    return _distributions(lengths)


def token_stats(records: Iterable[ArrowRecord]) -> list[LengthStats]:
    """Tokens per generated text, from the records' `token_counts` (the engine's counts, one
    per generated text); none for records without them (not generated, or not counted)."""
    tokens: dict[str, list[int]] = {}
    for record in records:
        # Read by name: only records with generated texts have the field.
        for count in getattr(record, "token_counts", None) or []:
            for name in TOKEN_COUNTERS:
                value = getattr(count, name, None)
                if isinstance(value, int):
                    tokens.setdefault(name, []).append(value)
    return _distributions(tokens)


def _sampling_text(sampling: Sampling) -> str:
    return (
        f"n={sampling.n} temperature={sampling.temperature} top_p={sampling.top_p} "
        f"max_tokens={sampling.max_tokens} seed={sampling.seed}"
    )


def _lineage_items(record: ArrowRecord) -> list[tuple[str, str]]:
    """(label, value) pairs of a record's lineage; a prompt's origin for prompt records."""
    if isinstance(record, PromptRecord):
        # `source#id`: the set a prompt came from, not each row's id.
        return [("prompt source", record.source.partition("#")[0])]
    lineage = getattr(record, "lineage", None)
    if not isinstance(lineage, Lineage):
        return []
    items = [
        ("generator", lineage.generator),
        ("reward model", lineage.reward_model),
        ("template version", lineage.template_version),
    ]
    if lineage.sampling is not None:
        items.append(("sampling", _sampling_text(lineage.sampling)))
    return items


def lineage_values(records: Iterable[ArrowRecord]) -> dict[str, list[str]]:
    """Distinct non-empty lineage values by label (at most `LINEAGE_MAX_VALUES` each, then a
    line saying how many more), in order of first appearance."""
    seen: dict[str, dict[str, None]] = {}
    for record in records:
        for label, value in _lineage_items(record):
            if value:
                seen.setdefault(label, {})[value] = None
    listed = {}
    for label, values in seen.items():
        names = list(values)
        extra = len(names) - LINEAGE_MAX_VALUES
        listed[label] = names[:LINEAGE_MAX_VALUES] + (
            [f"... and {extra} more"] if extra > 0 else []
        )
    return listed


# ---- provenance ----------------------------------------------------------------------------------


def flow_config(parameters: Mapping[str, Any]) -> dict[str, Any] | None:
    """The config file that gives a flow these parameters, or None if there is none.

    Every factory flow takes one pydantic model (flows/deployments.py, PARAM_NAME) whose fields
    are a config file's top-level keys; a flow called without it ran on the defaults (`{}`).
    """
    if len(parameters) != 1:
        return None
    (value,) = parameters.values()
    if value is None:
        return {}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):  # parameters read back from the Prefect API: JSON already
        return dict(value)
    return None


def _reproduction(sealed_by: SealedBy | None, run_record: Mapping[str, Any]) -> Reproduction | None:
    """The flow run that sealed the step; else the run's record (written by pipeline flows)."""
    if sealed_by is not None and sealed_by.flow:
        config = flow_config(sealed_by.parameters)
        if config is not None:
            return Reproduction(flow=sealed_by.flow, config=config, origin="flow run")
    flow, config = run_record.get("flow"), run_record.get("config")
    if isinstance(flow, str) and isinstance(config, dict):
        return Reproduction(flow=flow, config=config, origin="run record")
    return None


def _package_license() -> str | None:
    """The license avr-factory's package metadata declares (pyproject.toml), if any."""
    try:
        meta = metadata.metadata(PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    declared = [*(meta.get_all("License-Expression") or []), *(meta.get_all("License") or [])]
    names = [str(value).strip().lower() for value in declared if str(value).strip()]
    return names[0] if names else None


def prompt_license(ingest: Mapping[str, Any] | None) -> tuple[str, str, str | None]:
    """(Hugging Face license id, why, prompt source) for the prompts an ingest config names.

    A generated dataset inherits the terms of its prompts, so the card's license is theirs:
    - an ingest config's own `license` (not an IngestConfig field yet: read if someone adds it);
    - the bundled prompt sets, written for this project: the package's declared license;
    - anything else: `other`, stated as unknown (nothing records a source's license).
    """
    if ingest is None:
        return "other", "unknown: no ingest config tells which prompts this step comes from", None
    source = str(ingest.get("prompts") or f"{BUNDLED_PREFIX}train")
    declared = ingest.get("license")
    if isinstance(declared, str) and declared:
        return declared, f"declared for the prompt source `{source}` in the ingest config", source
    if source.startswith(BUNDLED_PREFIX):
        package = _package_license()
        if package:
            return package, f"the bundled prompts `{source}` are avr-factory's ({package})", source
        return (
            "other",
            f"unknown: the bundled prompts `{source}` were written for avr-factory, whose "
            "package declares no license yet (no `license` in pyproject.toml)",
            source,
        )
    return (
        "other",
        f"unknown: nothing records the license of the prompt source `{source}`; check it "
        "before publishing",
        source,
    )


def _ingest_section(reproduction: Reproduction | None, run_record: Mapping[str, Any]) -> Any:
    """The ingest config of the flow that sealed the step, else of the run's record."""
    for config in (reproduction.config if reproduction else None, run_record.get("config")):
        if isinstance(config, dict) and isinstance(config.get("ingest"), dict):
            return config["ingest"]
    return None


def _read_rows(
    store: DatasetStore, plan: StepPlan, manifest: Manifest, limit: int
) -> list[ArrowRecord]:
    """The step's records, shard by shard as sealed (sha256-checked), up to about `limit`."""
    records: list[ArrowRecord] = []
    for info in sorted(manifest.shards, key=lambda s: s.index):
        if len(records) >= limit:
            break
        records += store.read_shard_records(
            plan.run, *plan.target, info.index, plan.record_type, info.sha256
        )
    return records[:limit]


def build_card_info(
    plan: StepPlan,
    result: StepResult,
    sealed_by: SealedBy | None = None,
    max_rows: int = STATS_MAX_ROWS,
) -> CardInfo:
    """What the card of the step `plan` sealed (`result`) shows, read from storage."""
    store, run = plan.store, plan.run
    manifest = store.read_manifest(run, *plan.target)
    if manifest is None:
        raise ValueError(f"{plan.uri}: not sealed, no card")
    run_record = store.read_json(RunLayout(run).run_record) or {}
    records = _read_rows(store, plan, manifest, max_rows)
    reproduction = _reproduction(sealed_by, run_record)
    license_id, license_note, prompt_source = prompt_license(
        _ingest_section(reproduction, run_record)
    )
    code_version = dict(sealed_by.code_version) if sealed_by and sealed_by.code_version else {}
    return CardInfo(
        run=run,
        stage=plan.target.stage,
        step=plan.target.step,
        uri=plan.uri,
        record_type=manifest.record_type,
        rows=manifest.total_rows,
        shards=len(manifest.shards),
        fingerprint=manifest.fingerprint,
        content_digest=manifest.content_digest,
        sealed_at=manifest.created_at,
        sources=[
            (str(source.ref), source_manifest.fingerprint)
            for source, source_manifest in zip(plan.sources, plan.source_manifests, strict=True)
        ],
        reproduction=reproduction,
        code_version=code_version or dict(run_record.get("code_version") or {}),
        lineage=lineage_values(records),
        counts=dict(result.counts),
        lengths=length_stats(records),
        tokens=token_stats(records),
        stats_rows=len(records),
        prompt_source=prompt_source,
        license=license_id,
        license_note=license_note,
    )


# ---- rendering -----------------------------------------------------------------------------------


def _size_category(rows: int) -> str:
    for bound, name in SIZE_CATEGORIES:
        if rows < bound:
            return name
    return "n>100M"


def _tags(info: CardInfo) -> list[str]:
    kind = {"PreferencePair": ["dpo", "preference"], "SFTExample": ["sft"]}
    synthetic = [] if info.record_type == "PromptRecord" else ["synthetic"]
    return ["avr-factory", *synthetic, *kind.get(info.record_type, []), info.stage]


def card_header(info: CardInfo) -> dict[str, Any]:
    """The card's YAML metadata: license, name, tags, and the shards as the only data files."""
    header: dict[str, Any] = {"license": info.license}
    if info.license == "other":
        # The Hub asks a card with `license: other` to name it.
        header["license_name"] = "unknown"
    header |= {
        "pretty_name": info.pretty_name,
        "tags": _tags(info),
        "size_categories": [_size_category(info.rows)],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": SHARD_GLOB}],
            }
        ],
    }
    return header


def reproduce_command(info: CardInfo) -> str | None:
    """`avr run FLOW --config _config.yaml --set run_name=.. --set storage_root=..`, or None.

    The config file holds the flow's effective parameters (config file and `--set` overrides
    already applied), not the file the run was started from: that file may have changed since,
    or live on another machine. run_name and storage_root are repeated as `--set` so the command
    says where the data goes; they equal the file's values.
    """
    if info.reproduction is None:
        return None
    config = info.reproduction.config
    words = ["avr", "run", info.reproduction.flow, "--config", CARD_CONFIG_NAME]
    for key in ("run_name", "storage_root"):
        if isinstance(config.get(key), str):
            words += ["--set", f"{key}={config[key]}"]
    return shlex.join(words)


def render_config_file(info: CardInfo) -> str | None:
    """`_config.yaml`: the parameters `reproduce_command` runs the flow with."""
    if info.reproduction is None:
        return None
    comment = (
        f"# The parameters of flow {info.reproduction.flow!r} that made {info.stage}/{info.step}"
        f" of run {info.run!r} (from its {info.reproduction.origin}).\n"
        f"# {reproduce_command(info)}\n"
    )
    return comment + yaml.safe_dump(info.reproduction.config, sort_keys=False)


def _provenance_section(info: CardInfo) -> list[str]:
    commit = info.code_version.get("git_commit") or "unknown"
    version = info.code_version.get("package_version") or "unknown"
    rows = [
        ("step", f"`{info.stage}/{info.step}` of run `{info.run}`"),
        ("stored at", f"`{info.uri}`"),
        ("record type", f"{info.record_type} (schema version {SCHEMA_VERSION})"),
        ("rows", str(info.rows)),
        ("shards", str(info.shards)),
        ("fingerprint", f"`{info.fingerprint}`"),
        ("content digest", f"`{info.content_digest}`"),
        ("sealed at", info.sealed_at),
        ("flow", f"`{info.reproduction.flow}`" if info.reproduction else "unknown"),
        ("code", f"avr-factory {version}, git commit `{commit}`"),
    ]
    rows += [("built from", f"`{ref}` (fingerprint `{fp}`)") for ref, fp in info.sources]
    return ["## Provenance", "", markdown_table(rows, ("", "")), ""]


def _reproduce_section(info: CardInfo) -> list[str]:
    command = reproduce_command(info)
    if command is None or info.reproduction is None:
        return [
            "## Reproduce",
            "",
            "No flow run or run record names the flow that made this step, so no `avr run` "
            "command can be given.",
            "",
        ]
    lines = [
        "## Reproduce",
        "",
        "```bash",
        command,
        "```",
        "",
        f"`{CARD_CONFIG_NAME}`, beside this card, holds the flow's parameters as they were "
        "(config file and overrides applied); run the command where it is, or give its path "
        "(copied to this machine if the data is on an object store). It runs the whole flow: "
        "shards already committed under the same fingerprint are reused, so against this "
        "storage root nothing is recomputed, and into a new `run_name` or `storage_root` the "
        f"step is computed again and must get fingerprint `{info.fingerprint}`. Check out the "
        "git commit above first.",
        "",
    ]
    if info.reproduction.origin == "run record":
        lines += [
            "No flow run was known when the step was sealed: the flow and parameters are the "
            "run record's (`run.json`, its latest attempt), which may not be the flow that "
            "wrote this step.",
            "",
        ]
    return lines


def _lineage_section(info: CardInfo) -> list[str]:
    rows = [(label, "<br>".join(values)) for label, values in info.lineage.items()]
    if info.prompt_source:
        rows.append(("prompt set (ingest config)", f"`{info.prompt_source}`"))
    body = markdown_table(rows, ("", "")) if rows else "No lineage recorded in the rows."
    return ["## Lineage", "", body, "", *_rows_read_note(info)]


def _rows_read_note(info: CardInfo) -> list[str]:
    if info.stats_rows >= info.rows:
        return []
    return [f"Read from the first {info.stats_rows} of {info.rows} rows.", ""]


def _counts_section(info: CardInfo) -> list[str]:
    filters = [
        (COUNT_LABELS.get(key, key), str(value))
        for key, value in info.counts.items()
        if key.startswith("dropped_") or key in FILTER_COUNTS
    ]
    lines = ["## Counts and filters", "", f"Kept: **{info.rows}** rows.", ""]
    if filters:
        lines += ["Left out, and why:", "", markdown_table(filters, ("filter", "count")), ""]
    rows = report_rows({k: v for k, v in info.counts.items() if k not in TOKEN_COUNTERS})
    if rows:
        lines += ["Every counter the step reported:", "", markdown_table(rows, ("", "")), ""]
    return lines


def _distribution_table(stats: Sequence[LengthStats], label: Callable[[str], str]) -> str:
    rows = [
        (label(s.field), str(s.count), str(s.min), f"{s.median:g}", f"{s.mean:g}", str(s.max))
        for s in stats
    ]
    return markdown_table(rows, ("", "values", "min", "median", "mean", "max"))


def _lengths_section(info: CardInfo) -> list[str]:
    if not info.lengths:
        return []
    table = _distribution_table(info.lengths, str)
    return ["## Lengths (characters)", "", table, "", *_rows_read_note(info)]


def _token_label(key: str) -> str:
    return COUNT_LABELS.get(key, key.replace("_", " "))


def _tokens_section(info: CardInfo) -> list[str]:
    present = [key for key in TOKEN_COUNTERS if key in info.counts]
    if not present and not info.tokens:
        return []
    lines = ["## Tokens", ""]
    if present:
        rows = [
            (
                _token_label(key),
                str(info.counts[key]),
                f"{info.counts[key] / info.rows:.1f}" if info.rows else "-",
            )
            for key in present
        ]
        lines += [
            "What the step's engine calls read and wrote, all of them (also for rows left out):",
            "",
            markdown_table(rows, ("", "total", "per kept row")),
            "",
        ]
    if info.tokens:
        lines += [
            "Per generated text of the rows kept:",
            "",
            _distribution_table(info.tokens, _token_label),
            "",
            *_rows_read_note(info),
        ]
    return lines


def _license_section(info: CardInfo) -> list[str]:
    return [
        "## License",
        "",
        f"`{info.license}`: {info.license_note}. Generated text may also fall under the terms "
        "of the models that generated or scored it (see Lineage).",
        "",
    ]


def _config_section(info: CardInfo) -> list[str]:
    text = render_config_file(info)
    if text is None:
        return []
    return [
        "## Config",
        "",
        f"<details><summary>{CARD_CONFIG_NAME}</summary>",
        "",
        "```yaml",
        text.rstrip("\n"),
        "```",
        "",
        "</details>",
        "",
    ]


def render_dataset_card(info: CardInfo) -> str:
    """The card: YAML header (safe_dump, so always valid YAML), then the markdown body."""
    header = yaml.safe_dump(card_header(info), sort_keys=False, allow_unicode=True)
    body = [
        f"# {info.pretty_name}",
        "",
        f"{info.record_type} records from the `{info.stage}/{info.step}` step of avr-factory "
        f'run `{info.run}`. Load them with `datasets.load_dataset("<this directory>")`: the '
        f"header above names the shards (`{SHARD_GLOB}`) as its only data files.",
        "",
        *_provenance_section(info),
        *_reproduce_section(info),
        *_lineage_section(info),
        *_counts_section(info),
        *_lengths_section(info),
        *_tokens_section(info),
        *_license_section(info),
        *_config_section(info),
    ]
    return f"---\n{header}---\n\n" + "\n".join(body).rstrip("\n") + "\n"


# ---- writing -------------------------------------------------------------------------------------


def card_path(run: str, ref: StepRef, name: str = CARD_NAME) -> str:
    """Root-relative path of the card (`CARD_NAME`) or its config (`CARD_CONFIG_NAME`)."""
    layout = RunLayout(run)
    return layout.step_config(ref) if name == CARD_CONFIG_NAME else layout.step_card(ref)


def write_step_card(
    plan: StepPlan,
    result: StepResult,
    sealed_by: Callable[[], SealedBy] | None = None,
) -> str | None:
    """Write the card (and its `_config.yaml`) of the step `plan` sealed; its URI, or None.

    Never raises: the step is sealed and complete without a card, so any failure (storage,
    a record the card cannot measure, `sealed_by` itself) is logged as a warning, and an earlier
    card is removed rather than left describing other shards. `sealed_by`
    is called here, inside that guard, because asking Prefect about the flow run can fail too.
    Re-sealing a step rewrites its card; each file is written whole (RootFS.write_bytes).
    """
    if not result.sealed or plan.target.stage == CHECKPOINTS:
        return None
    try:
        info = build_card_info(plan, result, sealed_by() if sealed_by else None)
        config = render_config_file(info)
        config_path = card_path(plan.run, plan.target, CARD_CONFIG_NAME)
        if config is None:
            # An earlier seal's config would name a flow this card no longer names.
            plan.store.files.remove(config_path)
        else:
            plan.store.files.write_bytes(config_path, config.encode("utf-8"))
        path = card_path(plan.run, plan.target)
        plan.store.files.write_bytes(path, render_dataset_card(info).encode("utf-8"))
    except Exception as err:  # noqa: BLE001 - documentation must never fail a sealed step
        logger.warning("%s: dataset card not written: %s: %s", plan.uri, type(err).__name__, err)
        _remove_stale_card(plan)
        return None
    return plan.store.uri(path)


def _remove_stale_card(plan: StepPlan) -> None:
    """Remove an earlier seal's card, best effort: it may describe other shards, and a card
    that no longer matches its step is worse than none (`datasets` loads the shards without)."""
    try:
        plan.store.files.remove(card_path(plan.run, plan.target))
    except Exception as err:  # noqa: BLE001 - the step stays sealed whatever happens here
        logger.warning("%s: an earlier dataset card may be stale: %s", plan.uri, err)
