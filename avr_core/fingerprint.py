"""Content hashes: config fingerprints (the shard cache key) and file digests.

A fingerprint is the first 16 hex characters of the sha256 of a config as sorted-key JSON, so two
configs that differ only in key order or in execution knobs kept out of the dict hash the same.
"""

from __future__ import annotations

from typing import Any

from avr_core.config import (
    IngestConfig,
    LongResponseConfig,
    ModelSpec,
    RefineConfig,
    SearchConfig,
    SelectionConfig,
    ThinkConfig,
    TreeConfig,
)
from avr_core.hashing import (
    canonical_json,
    config_fingerprint,
    file_sha256,
    json_default,
    sha256_hex,
    short_hash,
)
from avr_core.schemas import Sampling

__all__ = [
    "canonical_json",
    "config_fingerprint",
    "file_sha256",
    "answers_step_config",
    "ingest_step_config",
    "json_default",
    "long_response_step_config",
    "model_identity",
    "own_answers_step_config",
    "refine_step_config",
    "scored_trees_key",
    "scoring_step_config",
    "search_step_config",
    "selection_step_config",
    "sha256_hex",
    "short_hash",
    "think_step_config",
    "tree_step_config",
]


# ---- what decides each step's output (one function per step kind, shared by every caller) -----


# Where and on how many GPUs a model is served: they change speed, not what the data means, so
# moving a model to another server or GPU count never recomputes finished shards.
_SERVING_FIELDS = {"base_url", "tensor_parallel_size", "pipeline_parallel_size"}


def model_identity(spec: ModelSpec, revision: str | None) -> dict[str, Any]:
    """A model spec as it decides data: where it is served (base_url) and how it is spread over
    GPUs (tensor / pipeline parallel sizes) are left out."""
    return {"spec": spec.model_dump(mode="json", exclude=_SERVING_FIELDS), "revision": revision}


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


def search_step_config(
    policy: ModelSpec,
    policy_revision: str | None,
    reward: ModelSpec,
    reward_revision: str | None,
    templates_version: str,
    search: SearchConfig,
) -> dict[str, Any]:
    """A greedy search depends on both models (scores decide every round), the templates and
    the search settings."""
    return {
        "step": "search",
        "policy": model_identity(policy, policy_revision),
        "reward": model_identity(reward, reward_revision),
        "templates": templates_version,
        "search": search.model_dump(mode="json"),
    }


def long_response_step_config(
    policy: ModelSpec, policy_revision: str | None, long: LongResponseConfig
) -> dict[str, Any]:
    """Long responses depend on the (Stage II SFT) policy and how they are sampled."""
    return {
        "step": "long_responses",
        "policy": model_identity(policy, policy_revision),
        "long": long.model_dump(mode="json"),
    }


def answers_step_config(source_sha256: str, refine: RefineConfig) -> dict[str, Any]:
    """Imported answers depend on the file's bytes and how bad rows and shards are handled."""
    return {
        "step": "answers",
        "source_sha256": source_sha256,
        "on_bad_row": refine.on_bad_row,
        "shard_size": refine.shard_size,
    }


def own_answers_step_config(
    policy: ModelSpec, policy_revision: str | None, sampling: Sampling
) -> dict[str, Any]:
    """A model's own starting answers depend on it and their sampling."""
    return {
        "step": "own_answers",
        "policy": model_identity(policy, policy_revision),
        "sampling": sampling.model_dump(mode="json"),
    }


def refine_step_config(
    policy: ModelSpec,
    policy_revision: str | None,
    reward: ModelSpec | None,
    reward_revision: str | None,
    templates_version: str,
    refine: RefineConfig,
) -> dict[str, Any]:
    """Refinement rounds depend on the refining model, the reward (scores, keep_best), the
    templates, the rounds and their sampling (the start is the upstream step)."""
    return {
        "step": "refine",
        "policy": model_identity(policy, policy_revision),
        "reward": None if reward is None else model_identity(reward, reward_revision),
        "templates": templates_version,
        "refine": refine.model_dump(mode="json", include={"rounds", "sampling", "keep_best"}),
    }


def think_step_config(
    policy: ModelSpec, policy_revision: str | None, think: ThinkConfig
) -> dict[str, Any]:
    """Thinking depends on the (Stage II) model, its sampling and the retry bound."""
    return {
        "step": "think",
        "policy": model_identity(policy, policy_revision),
        "think": think.model_dump(mode="json"),
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
