"""Fixture modules, one per area, each owned by the code it tests."""

import os

# Tests never reach a model hub: everything comes from local files or the bundled tiny model.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

pytest_plugins = [
    "tests.fixtures_models",
    "tests.fixtures_s3",
    "tests.fixtures_prefect",
    "tests.fixtures_vllm",
]
