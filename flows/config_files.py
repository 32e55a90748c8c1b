"""Config files and `--set` overrides, validated into a flow's parameter model.

A config file nests like the parameter models of `flows.params` (`ingest:`, `policy:`, `tree:`,
`selection:`, `sft:`, ...). One file configures every flow: a flow takes the top-level keys its
model has, and a key that no flow has fails, naming it.

`--set a.b=value` overrides one field. The value is read against the type of the field it sets,
found by walking the model's fields along the dotted key:

* a scalar field (str, int, float, bool, a Literal) gets the raw string and pydantic converts it
  (lax mode: `"3"` becomes 3 for an int field, `version=20261120` stays the string '20261120'
  for a str field); `null` is None where the field allows None;
* a section, list, tuple or dict (or a free-form `Any` value, e.g. under `sft.extra`) gets the
  value parsed as YAML, as in the config file: `--set policy='{backend: vllm, path: x}'`,
  `--set dpo.loss_type='[sigmoid, sft]'`. A section value replaces the whole section.

Why not pydantic-settings' CLI source: tried on these models, it handles dotted keys, discriminated
unions and str-typed values, but (1) it reads structured values as JSON or comma lists, not YAML,
so a value would be spelled differently on the command line than in the config file; (2) it
cannot reach into free-form dicts (`sft.extra.warmup_ratio=0.1` is an unknown argument, and
`sft.extra=k=v` gives the string '0.1'); (3) it needs each parameter model turned into a
`BaseSettings` with its environment sources removed, or an environment variable such as
`TIMEZONE` or `VERSION` silently becomes a flow parameter; (4) its YAML source reads a whole file
into one model, while our files hold the sections of every flow and must be split per flow
anyway. What is left to write is the walk below (~100 lines); errors name the dotted key and list
the fields that exist.
"""

from __future__ import annotations

import copy
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from huggingface_hub import try_to_load_from_cache
from pydantic import BaseModel, ValidationError

from avr_core.config import TransformersModel, VLLMModel
from avr_core.models import TINY_MODEL, TINY_REWARD_MODEL, ModelNotFoundError, find_tiny_gguf
from flows.params import TrainDPOParams

__all__ = [
    "CONFIGS_DIR",
    "PAPER_CONFIG",
    "PROJECT_DIR",
    "TINY_CONFIG",
    "ConfigError",
    "apply_overrides",
    "build_params",
    "check_keys",
    "check_models",
    "load_config",
    "sections_for",
    "validate_config",
]

ModelT = TypeVar("ModelT", bound=BaseModel)

PROJECT_DIR = Path(__file__).resolve().parents[1]
CONFIGS_DIR = PROJECT_DIR / "deployments" / "configs"
TINY_CONFIG = CONFIGS_DIR / "tiny.yaml"
PAPER_CONFIG = CONFIGS_DIR / "paper.yaml"


class ConfigError(ValueError):
    """A config file, `--set` override, parameter or command argument is wrong; the message
    names the key (the CLI prints it and exits with status 2)."""


# ---- config files ------------------------------------------------------------------------------


def load_config(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, got {type(data).__name__}")
    return data


def sections_for(config: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """The top-level keys of `config` that `model` has (a copy): what that flow takes."""
    return {k: copy.deepcopy(v) for k, v in config.items() if k in model.model_fields}


def check_keys(
    config: dict[str, Any], models: Sequence[type[BaseModel]], source: str = "config"
) -> None:
    """Fail naming every top-level key of `config` that none of `models` has."""
    known = {name for model in models for name in model.model_fields}
    unknown = [key for key in config if key not in known]
    if unknown:
        raise ConfigError(
            f"{source}: no flow has the key(s) {', '.join(map(repr, unknown))} "
            f"(keys: {', '.join(sorted(known))})"
        )


def validate_config(
    config: dict[str, Any], models: Sequence[type[BaseModel]], source: str = "config"
) -> None:
    """Every key of `config` belongs to some model, and every model validates its sections."""
    check_keys(config, models, source)
    for model in models:
        try:
            build_params(model, config)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from err


# ---- --set overrides ---------------------------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    """`annotation` without Annotated[...] metadata."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _options(annotation: Any) -> list[Any]:
    """The members of a union (X | Y, Optional[X]), or [annotation]."""
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [_unwrap(arg) for arg in typing.get_args(annotation)]
    return [annotation]


def _models(annotation: Any) -> list[type[BaseModel]]:
    return [
        option
        for option in _options(annotation)
        if isinstance(option, type) and issubclass(option, BaseModel)
    ]


def _is_structured(annotation: Any) -> bool:
    """Whether a value of this type is written as YAML (sections, lists, dicts, Any)."""
    for option in _options(annotation):
        origin = typing.get_origin(option) or option
        if option is Any or (isinstance(origin, type) and issubclass(origin, BaseModel)):
            return True
        if isinstance(origin, type) and issubclass(origin, list | tuple | set | dict):
            return True  # also NamedTuples such as StepRef
    return False


def _tags(model: type[BaseModel]) -> dict[str, Any]:
    """The single-valued Literal fields of a union member: its discriminator (`backend`)."""
    tags = {}
    for name, field in model.model_fields.items():
        annotation = _unwrap(field.annotation)
        if typing.get_origin(annotation) is Literal and len(typing.get_args(annotation)) == 1:
            tags[name] = typing.get_args(annotation)[0]
    return tags


def _member(models: list[type[BaseModel]], data: Any) -> type[BaseModel]:
    """The union member the current data selects by its tag (else the first)."""
    if isinstance(data, dict):
        for model in models:
            tags = _tags(model)
            if tags and all(data.get(k, v) == v for k, v in tags.items()):
                return model
    return models[0]


def _seed(field: Any, annotation: Any) -> dict[str, Any]:
    """A missing section, before `--set` fills one key of it: what its default set explicitly
    (e.g. Stage I's SFT defaults), plus the tag that selects the default's union member."""
    default = field.get_default(call_default_factory=True) if field is not None else None
    if not isinstance(default, BaseModel):
        return {}
    seed = default.model_dump(exclude_unset=True)
    if len(_models(annotation)) > 1:
        seed.update(_tags(type(default)))
    return seed


def _parse_item(item: str) -> tuple[list[str], str]:
    """`a.b=value` -> (["a", "b"], "value")."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    path = key.split(".")
    if not sep or not key or not all(path):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. tree.x=3")
    return path, raw


def _value(raw: str, annotation: Any, key: str) -> Any:
    """The raw `--set` string read for a field of type `annotation` (see the module docstring)."""
    if _is_structured(annotation):
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {err}") from err
    if raw.strip() == "null" and type(None) in _options(annotation):
        return None
    return raw


def _apply_one(data: dict[str, Any], path: list[str], raw: str, model: type[BaseModel]) -> None:
    key = ".".join(path)
    annotation: Any = model
    target = data
    for depth, part in enumerate(path):
        here = ".".join(path[:depth]) or model.__name__
        models = _models(annotation)
        field = None
        if models:
            having = [m for m in models if part in m.model_fields]
            if not having:
                names = sorted({name for m in models for name in m.model_fields})
                raise ConfigError(
                    f"--set {key}: {here} has no field {part!r} (fields: {', '.join(names)})"
                )
            field = _member(having, target).model_fields[part]
            annotation = field.annotation
        elif typing.get_origin(_unwrap(annotation)) is dict:
            args = typing.get_args(_unwrap(annotation))
            annotation = args[1] if args else Any  # a free-form dict: any key
        elif _unwrap(annotation) is not Any:
            raise ConfigError(f"--set {key}: {here} is not a section")
        if depth == len(path) - 1:
            target[part] = _value(raw, annotation, key)
            return
        if not isinstance(target.get(part), dict):
            target[part] = _seed(field, annotation)
        target = target[part]


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], model: type[BaseModel]
) -> dict[str, Any]:
    """`data` (not changed) with each `--set KEY=VALUE` applied, in order."""
    result = copy.deepcopy(data)
    for item in overrides:
        path, raw = _parse_item(item)
        _apply_one(result, path, raw, model)
    return result


# ---- validation ----------------------------------------------------------------------------------


def _location(loc: tuple[Any, ...], model: type[BaseModel]) -> tuple[str, str]:
    """A pydantic error location as a dotted key without union tags (`policy.base_url`, not
    `policy.openai.base_url`), and a note naming the tag that was dropped."""
    parts: list[str] = []
    note = ""
    annotation: Any = model
    position = 0
    while position < len(loc):
        part = loc[position]
        parts.append(str(part))
        position += 1
        having = [
            m for m in _models(annotation) if isinstance(part, str) and part in m.model_fields
        ]
        annotation = having[0].model_fields[part].annotation if having else Any
        members = _models(annotation)
        if len(members) > 1 and position < len(loc):
            tagged = [m for m in members if loc[position] in _tags(m).values()]
            if tagged:
                tag = ", ".join(f"{k} {v!r}" for k, v in _tags(tagged[0]).items())
                note = f" for {'.'.join(parts)} with {tag}"
                annotation = tagged[0]
                position += 1
    return ".".join(parts) or "(parameters)", note


def _format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    """One line per problem: dotted key, message, offending value."""
    lines = []
    for problem in err.errors():
        where, note = _location(tuple(problem["loc"]), model)
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key{note}")
        elif problem["type"] == "missing":
            lines.append(f"  {where}: {problem['msg']}{note}")
        else:
            lines.append(f"  {where}: {problem['msg']} (got {problem.get('input')!r})")
    return "\n".join(lines)


def build_params(
    model: type[ModelT], config: dict[str, Any], overrides: Sequence[str] = ()
) -> ModelT:
    """The flow's parameters from its sections of `config` plus `--set` overrides, or a
    ConfigError naming every wrong key."""
    data = apply_overrides(sections_for(config, model), overrides, model)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            f"invalid parameters for {model.__name__}:\n{_format_validation_error(err, model)}"
        ) from err


# ---- pre-flight: do the models exist? ------------------------------------------------------------


def _check_model_path(key: str, path: str) -> None:
    if path in (TINY_MODEL, TINY_REWARD_MODEL):
        try:
            find_tiny_gguf()
        except ModelNotFoundError as err:
            raise ConfigError(f"{key}: {err}") from err
    elif "://" in path or Path(path).expanduser().is_dir():
        return  # storage URIs are fetched by the task, with the workers' credentials
    elif path.startswith(("/", ".", "~")) or path.count("/") != 1:
        raise ConfigError(
            f"{key}: model {path!r} not found: not a local directory, storage URI, hub id "
            f"(org/name) or bundled name ({TINY_MODEL}, {TINY_REWARD_MODEL})"
        )
    elif os.environ.get("HF_HUB_OFFLINE") == "1" and not isinstance(
        try_to_load_from_cache(path, "config.json"), str
    ):
        raise ConfigError(
            f"{key}: hub model {path!r} is not in the local cache and HF_HUB_OFFLINE=1 forbids "
            "downloading it"
        )


def check_models(params: BaseModel) -> None:
    """Fail before the run starts if a model the parameters name cannot be found here.

    Checks the weights-backed specs (transformers, vllm) and DPO's explicit `base_model`;
    served models (openai) and rules have nothing local to check.
    """
    for name in type(params).model_fields:
        value = getattr(params, name)
        if isinstance(value, TransformersModel | VLLMModel):
            _check_model_path(f"{name}.path", value.path)
    if isinstance(params, TrainDPOParams) and params.base_model is not None:
        _check_model_path("base_model", params.base_model)
