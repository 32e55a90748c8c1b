"""The bundled tiny models: a trainable safetensors conversion, safe under concurrent first use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from avr_core.checkpoints import upload_dir, verify_synced_dir
from avr_core.models import (
    TINY_MODEL,
    ModelCorruptError,
    ModelNotFoundError,
    resolve_model_dir,
)
from avr_core.rootfs import RootFS

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


def test_storage_models_are_cached_by_revision_not_by_uri(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    uri = "memory://avr-tests/models/tiny-copy"
    fs.pipe({f"{uri}/config.json": b"{}", f"{uri}/sub/weights.bin": b"abc"})
    try:
        local = resolve_model_dir(uri, cache_dir=tmp_path / "cache")
        assert local.parent == tmp_path / "cache" / "remote-models"
        assert (local / "config.json").read_bytes() == b"{}"
        assert (local / "sub" / "weights.bin").read_bytes() == b"abc"
        assert resolve_model_dir(uri, cache_dir=tmp_path / "cache") == local  # reused
        # Another model at the same URI: the old weights must not be used under its name.
        fs.pipe(f"{uri}/config.json", b'{"changed": 1}')
        changed = resolve_model_dir(uri, cache_dir=tmp_path / "cache")
        assert changed != local
        assert (changed / "config.json").read_bytes() == b'{"changed": 1}'
    finally:
        fs.rm("memory://avr-tests/models", recursive=True)


def _trained_model(root: Path, weights: bytes) -> str:
    """A model directory uploaded the way training uploads its final model; returns its URI."""
    local = root.parent / f"local-{len(weights)}-{weights[:4].hex()}"
    local.mkdir(parents=True, exist_ok=True)
    (local / "config.json").write_text("{}")
    (local / "model.safetensors").write_bytes(weights)
    files = RootFS(f"file://{root}")
    upload_dir(files, local, "runs/r/checkpoints/stage1_sft/final")
    files.write_json("runs/r/checkpoints/stage1_sft/_complete.json", {"fingerprint": "f"})
    return files.uri("runs/r/checkpoints/stage1_sft/final")


def test_a_damaged_trained_model_is_refused_by_name_and_marked_for_retraining(
    tmp_path: Path,
) -> None:
    uri = _trained_model(tmp_path / "store", b"0123456789")
    assert resolve_model_dir(uri) == Path(uri.removeprefix("file://"))
    weights = Path(uri.removeprefix("file://")) / "model.safetensors"
    weights.write_bytes(b"0123456788")  # same size: only the hash can tell
    with pytest.raises(ModelCorruptError, match=rf"model {uri}: model.safetensors changed"):
        resolve_model_dir(uri)
    checkpoints = weights.parent.parent
    assert not (checkpoints / "_complete.json").exists()
    assert list(checkpoints.glob("_complete.invalid-*.json"))


def test_verify_synced_dir_checks_sizes_from_a_listing_and_hashes_on_request(
    tmp_path: Path,
) -> None:
    uri = _trained_model(tmp_path / "store", b"weights-v1")
    files = RootFS(f"file://{tmp_path / 'store'}")
    final = "runs/r/checkpoints/stage1_sft/final"
    assert verify_synced_dir(files, final, check_hashes=True) == []
    weights = Path(uri.removeprefix("file://")) / "model.safetensors"
    weights.write_bytes(b"weights-v2")
    assert verify_synced_dir(files, final, check_hashes=False) == []
    assert verify_synced_dir(files, final, check_hashes=True) == [
        "model.safetensors changed since it was uploaded (sha256 differs)"
    ]
    weights.write_bytes(b"weights")
    assert verify_synced_dir(files, final, check_hashes=False) == [
        "model.safetensors has 7 bytes, 10 were uploaded"
    ]


def test_a_trained_model_in_object_storage_is_fetched_per_revision_and_verified(
    tmp_path: Path,
) -> None:
    files = RootFS("memory://avr-tests/store")
    local = tmp_path / "final"
    local.mkdir()
    (local / "model.safetensors").write_bytes(b"v1-weights")
    final = "runs/r/checkpoints/stage1_sft/final"
    try:
        upload_dir(files, local, final)
        files.write_json("runs/r/checkpoints/stage1_sft/_complete.json", {"fingerprint": "f"})
        uri = files.uri(final)
        first = resolve_model_dir(uri, cache_dir=tmp_path / "cache")
        assert (first / "model.safetensors").read_bytes() == b"v1-weights"
        # Retrained under the same URI: a new sync marker, so a new cache entry.
        (local / "model.safetensors").write_bytes(b"v2-weights")
        upload_dir(files, local, final)
        second = resolve_model_dir(uri, cache_dir=tmp_path / "cache")
        assert second != first
        assert (second / "model.safetensors").read_bytes() == b"v2-weights"
        # Damaged in storage: a fresh cache refuses it, naming the model.
        files.write_bytes(f"{final}/model.safetensors", b"v2-weightZ")
        with pytest.raises(ModelCorruptError, match=f"model {uri}"):
            resolve_model_dir(uri, cache_dir=tmp_path / "fresh-cache")
        assert files.read_json("runs/r/checkpoints/stage1_sft/_complete.json") is None
    finally:
        fsspec.filesystem("memory").rm("memory://avr-tests/store", recursive=True)


def test_the_remote_model_cache_evicts_least_recently_used_beyond_its_budget(
    tmp_path: Path,
) -> None:
    fs = fsspec.filesystem("memory")
    cache = tmp_path / "cache"
    uris = [f"memory://avr-tests/lru/m{i}" for i in range(3)]
    try:
        for uri in uris:
            fs.pipe({f"{uri}/weights.bin": b"x" * 1000})
        first = resolve_model_dir(uris[0], cache_dir=cache, cache_budget_bytes=2500)
        second = resolve_model_dir(uris[1], cache_dir=cache, cache_budget_bytes=2500)
        os.utime(first / ".avr-last-used", (1, 1))
        os.utime(second / ".avr-last-used", (2, 2))
        third = resolve_model_dir(uris[2], cache_dir=cache, cache_budget_bytes=2500)
        assert not first.exists()  # the least recently used one went
        assert second.exists() and third.exists()
        assert resolve_model_dir(uris[0], cache_dir=cache, cache_budget_bytes=2500).exists()
        assert not second.exists()
    finally:
        fs.rm("memory://avr-tests/lru", recursive=True)


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
