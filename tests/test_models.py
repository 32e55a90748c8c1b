"""The bundled tiny models: a trainable safetensors conversion, safe under concurrent first use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from avr_core.models import (
    TINY_MODEL,
    ModelNotFoundError,
    resolve_model_dir,
)

REPO_ROOT = Path(__file__).parent.parent


def test_resolve_model_dir_errors_clearly_for_missing_models(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="'no-such-model' is neither a bundled model"):
        resolve_model_dir("no-such-model")
    with pytest.raises(ModelNotFoundError, match="is neither a bundled model"):
        resolve_model_dir(f"file://{tmp_path}/missing")
    with pytest.raises(ModelNotFoundError, match="does not exist in storage"):
        resolve_model_dir("memory://avr-tests/no-such-model")
    assert resolve_model_dir(str(tmp_path)) == tmp_path
    assert resolve_model_dir(f"file://{tmp_path}") == tmp_path


def test_storage_models_are_copied_once_into_the_given_cache(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    uri = "memory://avr-tests/models/tiny-copy"
    fs.pipe({f"{uri}/config.json": b"{}", f"{uri}/sub/weights.bin": b"abc"})
    try:
        local = resolve_model_dir(uri, cache_dir=tmp_path / "cache")
        assert local.parent == tmp_path / "cache" / "remote-models"
        assert (local / "config.json").read_bytes() == b"{}"
        assert (local / "sub" / "weights.bin").read_bytes() == b"abc"
        fs.pipe(f"{uri}/config.json", b"changed")  # a second call reuses the published copy
        assert resolve_model_dir(uri, cache_dir=tmp_path / "cache") == local
        assert (local / "config.json").read_bytes() == b"{}"
    finally:
        fs.rm("memory://avr-tests/models", recursive=True)


def _assert_plain_trainable_checkpoint(model_dir: Path) -> None:
    """The directory loads without gguf, carries no quantization config, and a step changes it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert not list(model_dir.glob("*.gguf"))
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert not getattr(model, "is_quantized", False)
    batch = tokenizer(["The cat sat on the mat."], return_tensors="pt")
    layer = model.model.layers[0].mlp.down_proj.weight
    before = layer.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, layer.detach())


@pytest.mark.slow
def test_tiny_model_is_a_trainable_plain_checkpoint(tiny_model_dir: Path) -> None:
    assert resolve_model_dir(TINY_MODEL) == tiny_model_dir
    _assert_plain_trainable_checkpoint(tiny_model_dir)


_CONVERT = (
    "import sys; from pathlib import Path; from avr_core.models import ensure_tiny_model; "
    "print(ensure_tiny_model(Path(sys.argv[1])))"
)


@pytest.mark.slow
def test_concurrent_first_use_converts_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # The cache is an argument; the old AVR_CACHE_DIR variable must no longer steer avr_core.
    ignored = tmp_path / "from-env"
    env = {**os.environ, "AVR_CACHE_DIR": str(ignored), "PYTHONPATH": str(REPO_ROOT)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _CONVERT, str(cache)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [worker.communicate(timeout=600) for worker in workers]
    for worker, (_, stderr) in zip(workers, results, strict=True):
        assert worker.returncode == 0, stderr[-2000:]
    target = cache / "models" / TINY_MODEL
    assert {out.strip().splitlines()[-1] for out, _ in results} == {str(target)}
    assert not ignored.exists()
    # One published directory, no half-built temporaries left beside it.
    leftovers = sorted(p.name for p in target.parent.iterdir() if p.name.startswith("."))
    assert leftovers == []
    names = {p.name for p in target.iterdir()}
    assert {".avr-complete", "config.json", "model.safetensors", "tokenizer.json"} <= names
    _assert_plain_trainable_checkpoint(target)
