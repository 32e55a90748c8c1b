"""Content hashes: config fingerprints (the shard cache key) and file digests.

A fingerprint is the first 16 hex characters of the sha256 of a config as sorted-key JSON, so two
configs that differ only in key order or in execution knobs kept out of the dict hash the same.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from enum import Enum
from pathlib import Path, PurePath
from typing import Any

from pydantic import BaseModel

from avr_core.config import IngestConfig, ModelSpec, SelectionConfig, TreeConfig

__all__ = [
    "config_fingerprint",
    "file_sha256",
    "ingest_step_config",
    "model_identity",
    "scored_trees_key",
    "scoring_step_config",
    "selection_step_config",
    "sha256_hex",
    "short_hash",
    "tree_step_config",
]


def json_default(value: Any) -> Any:
    """JSON form of the non-JSON values a config may hold."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"config value of type {type(value).__name__} has no JSON form: {value!r}")


def canonical_json(data: Any) -> str:
    """Sorted-key, compact JSON: equal data gives equal text."""
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=json_default
    )


def short_hash(data: Any) -> str:
    """First 16 hex chars of the sha256 of `data` as canonical JSON."""
    return hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()[:16]


def config_fingerprint(config: BaseModel | Mapping[str, Any]) -> str:
    """The shard cache key of a config (a pydantic model or a mapping)."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    return short_hash(data)


def sha256_hex(data: bytes) -> str:
    """sha256 of bytes, as hex."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- what decides each step's output (one function per step kind, shared by every caller) -----


def model_identity(spec: ModelSpec, revision: str | None) -> dict[str, Any]:
    """A model spec as it decides data: where it is served (base_url) is left out."""
    return {"spec": spec.model_dump(mode="json", exclude={"base_url"}), "revision": revision}


def ingest_step_config(source_sha256: str, ingest: IngestConfig) -> dict[str, Any]:
    """Ingested prompts depend on the source bytes and how they were filtered and sharded."""
    return {
        "step": "prompts",
        "source_sha256": source_sha256,
        **ingest.model_dump(mode="json", exclude={"prompts"}),
    }


def tree_step_config(
    policy: ModelSpec, policy_revision: str | None, templates_version: str, tree: TreeConfig
) -> dict[str, Any]:
    """Refinement trees depend on the policy, the templates and the tree settings."""
    return {
        "step": "trees",
        "policy": model_identity(policy, policy_revision),
        "templates": templates_version,
        "tree": tree.model_dump(mode="json"),
    }


def scoring_step_config(reward: ModelSpec, reward_revision: str | None) -> dict[str, Any]:
    """Scores depend on the reward model (and the trees, through the upstream fingerprint)."""
    return {"step": "scores", "reward": model_identity(reward, reward_revision)}


def selection_step_config(
    kind: str, selection: SelectionConfig, templates_version: str
) -> dict[str, Any]:
    """RSFT examples and pairs depend on the thresholds and the templates they quote."""
    return {
        "step": kind,
        "selection": selection.model_dump(mode="json"),
        "templates": templates_version,
    }


def scored_trees_key(
    policy: ModelSpec,
    policy_revision: str | None,
    reward: ModelSpec,
    reward_revision: str | None,
    templates_version: str,
    tree: TreeConfig,
) -> str:
    """What decides a prompt's scored tree: equal keys mean a stored tree can be reused."""
    return short_hash(
        {
            "trees": tree_step_config(policy, policy_revision, templates_version, tree),
            "scores": scoring_step_config(reward, reward_revision),
        }
    )
