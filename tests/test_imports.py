"""avr_core must import on a CPU machine without Prefect, vLLM or TRL (DESIGN section 1).

The modules are found by walking the package, so a new module is checked the day it is added.
Engines that need vLLM, TRL or torch import them inside functions only.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import avr_core

HEAVY = ("prefect", "vllm", "trl")


def _avr_core_modules() -> list[str]:
    def fail(name: str) -> None:
        raise ImportError(f"cannot walk {name}")

    return sorted(
        info.name for info in pkgutil.walk_packages(avr_core.__path__, "avr_core.", onerror=fail)
    )


MODULES = _avr_core_modules()

# Each module is imported in a fresh interpreter whose import system refuses prefect, vllm and
# trl as if they were not installed, and records every attempt: an import guarded by
# `try/except ImportError` at module level would pass a plain "does it import" check while
# still loading the package wherever it is installed.
CHECK = """
import importlib, sys

HEAVY = {heavy!r}
attempts = []

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HEAVY:
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

for name in list(sys.modules):
    if name.partition(".")[0] in HEAVY:
        del sys.modules[name]
sys.meta_path.insert(0, Refuse())
importlib.import_module({module!r})
if attempts:
    sys.exit(f"{module} tried to import {{sorted(set(attempts))}} at import time")
"""


def test_the_walk_finds_every_module() -> None:
    # Guards the walk itself: if it silently found nothing, every parametrized case would vanish.
    assert len(MODULES) >= 20
    for expected in (
        "avr_core.steps",
        "avr_core.storage",
        "avr_core.synthesis",
        "avr_core.engines.vllm_backend",
        "avr_core.engines.transformers_backend",
        "avr_core.training",
    ):
        assert expected in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_without_prefect_vllm_or_trl(module: str) -> None:
    code = CHECK.format(heavy=HEAVY, module=module)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
