"""Content hashes with no dependencies inside the factory: canonical JSON, sha256 of bytes/files.

A leaf module, so that storage, checkpoints and models can hash without importing the configs
(`avr_core.fingerprint` builds step fingerprints from configs on top of these).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from enum import Enum
from pathlib import Path, PurePath
from typing import Any

from pydantic import BaseModel

__all__ = [
    "canonical_json",
    "config_fingerprint",
    "file_sha256",
    "json_default",
    "sha256_hex",
    "short_hash",
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
