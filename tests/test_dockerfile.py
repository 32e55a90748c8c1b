"""The worker Dockerfile, checked without a Docker engine: its structure, and that what it installs
resolves (the requirement script is the Dockerfile's own, run against the real pyproject.toml)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def index(self, keyword: str, pattern: str = "") -> int:
        """Position of the first `keyword` instruction whose arguments match `pattern`."""
        for i, (kw, args) in enumerate(self.instructions):
            if kw == keyword and re.search(pattern, args):
                return i
        raise AssertionError(f"stage {self.name}: no {keyword} matching {pattern!r}")

    def last(self, keyword: str) -> int:
        return max(i for i, (kw, _) in enumerate(self.instructions) if kw == keyword)


def parse_dockerfile(text: str) -> tuple[list[tuple[str, str]], list[Stage]]:
    """(global instructions, stages): line continuations joined, heredoc bodies kept with RUN."""
    lines = text.splitlines()
    instructions: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        heredoc = re.search(r"<<'?(\w+)'?", line)
        if heredoc:
            body = []
            while lines[i].strip() != heredoc.group(1):
                body.append(lines[i])
                i += 1
            i += 1
            line += "\n" + "\n".join(body)
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    globals_: list[tuple[str, str]] = []
    stages: list[Stage] = []
    for keyword, args in instructions:
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args, flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {args}"
            stages.append(Stage(match.group(2), match.group(1)))
        elif stages:
            stages[-1].instructions.append((keyword, args))
        else:
            globals_.append((keyword, args))
    return globals_, stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    _, parsed = parse_dockerfile(DOCKERFILE.read_text())
    return {stage.name: stage for stage in parsed}


def test_stages_and_default_target(stages: dict[str, Stage]) -> None:
    assert list(stages) == ["gpu-base", "cpu-base", "requirements", "cpu", "gpu"]
    # The last stage is what a plain `docker build .` produces: the GPU worker.
    assert stages["gpu"].base == "gpu-base" and stages["cpu"].base == "cpu-base"
    assert "cuda" in DOCKERFILE.read_text().split("ARG CUDA_IMAGE=")[1].split()[0]


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_runs_as_non_root(stages: dict[str, Stage], target: str) -> None:
    stage = stages[target]
    user = stage.instructions[stage.last("USER")][1]
    assert user not in ("root", "0") and not user.startswith("0:")
    assert stage.last("USER") > stage.last("RUN"), "nothing may run as root after USER"
    assert re.search(r"useradd .*\bavr\b", stage.instructions[stage.index("RUN", "useradd")][1])


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_dependencies_installed_before_source(stages: dict[str, Stage], target: str) -> None:
    stage = stages[target]
    copy_requirements = stage.index("COPY", rf"--from=requirements .*requirements-{target}\.txt")
    install_deps = stage.index("RUN", r"pip install .*-r /tmp/requirements\.txt")
    copy_source = stage.index("COPY", r"^\. \.$")
    install_project = stage.index("RUN", r"pip install --no-deps .*\.(\s|$)")
    assert copy_requirements < install_deps < copy_source < install_project
    # The requirements stage sees pyproject.toml and nothing else of the source tree.
    copies = [args for kw, args in stages["requirements"].instructions if kw == "COPY"]
    assert copies == ["pyproject.toml ./"]


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_git_commit_baked_in_after_dependencies(stages: dict[str, Stage], target: str) -> None:
    stage = stages[target]
    arg = stage.index("ARG", r"^GIT_COMMIT(=|$)")
    assert arg > stage.index("RUN", r"-r /tmp/requirements\.txt"), (
        "a commit must not bust the pip cache"
    )
    assert stage.index("LABEL", r"org\.opencontainers\.image\.revision=\$GIT_COMMIT") > arg
    env = stage.instructions[stage.index("ENV", r"AVR_GIT_COMMIT=\$GIT_COMMIT")][1]
    assert "AVR_PROJECT_DIR=/app" in env  # what prefect.yaml's pull step changes into


def test_cpu_target_pins_cpu_torch_first(stages: dict[str, Stage]) -> None:
    run = stages["cpu"].instructions[stages["cpu"].index("RUN", "torch==2.13.0")][1]
    torch_at = run.index("download.pytorch.org/whl/cpu torch==2.13.0")
    assert torch_at < run.index("-r /tmp/requirements.txt")
    assert "-c /opt/venv/constraints.txt -r /tmp/requirements.txt" in run


def _requirements_script() -> str:
    """The Python heredoc the `requirements` stage runs."""
    _, parsed = parse_dockerfile(DOCKERFILE.read_text())
    stage = next(s for s in parsed if s.name == "requirements")
    run = stage.instructions[stage.index("RUN", r"^python - <<")][1]
    return run.split("\n", 1)[1]


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
