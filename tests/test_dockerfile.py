"""The worker Dockerfile, checked without a Docker engine: what it installs (its own requirement
script, run against the real pyproject.toml) and that it resolves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def _requirements_script() -> str:
    """The Python heredoc (`RUN python - <<'PY'` ... `PY`) that the Dockerfile runs to write the
    requirement files."""
    text = DOCKERFILE.read_text()
    match = re.search(r"^RUN python - <<'?(\w+)'?\n(.*?)^\1$", text, flags=re.M | re.S)
    assert match, "the Dockerfile writes its requirement files with a python heredoc"
    return match.group(2)


@pytest.fixture(scope="module")
def requirement_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    workdir = tmp_path_factory.mktemp("docker-requirements")
    shutil.copy(ROOT / "pyproject.toml", workdir / "pyproject.toml")
    subprocess.run(
        [sys.executable, "-c", _requirements_script()], cwd=workdir, check=True, timeout=60
    )
    return {
        target: [
            line
            for line in (workdir / f"requirements-{target}.txt").read_text().splitlines()
            if line.strip()
        ]
        for target in ("cpu", "gpu")
    }


def test_requirement_script_output(requirement_files: dict[str, list[str]]) -> None:
    names = {
        t: {Requirement(line).name for line in lines} for t, lines in requirement_files.items()
    }
    assert {"prefect", "transformers", "trl", "pyarrow", "s3fs"} <= names["cpu"]
    assert names["gpu"] - names["cpu"] == {"vllm"}
    # torch comes from the CPU index (cpu) or from vLLM's pin (gpu), never from our list.
    assert "torch" not in names["cpu"]


@pytest.mark.slow
def test_cpu_requirements_resolve_with_the_torch_pin(
    requirement_files: dict[str, list[str]], tmp_path: Path
) -> None:
    """pip resolves the cpu image's install (torch 2.13.0 + requirements) without CUDA packages."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(requirement_files["cpu"]) + "\n")
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), "torch==2.13.0", "-r", str(requirements)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    installed = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert installed["torch"].startswith("2.13.0")
    assert not [name for name in installed if name.startswith("nvidia-")]
    assert "prefect" in installed and installed["prefect"].startswith("3.8.")
