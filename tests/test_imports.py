"""avr_core must import on a CPU machine without Prefect, vLLM or TRL (DESIGN section 1)."""

import subprocess
import sys

import pytest

# Every avr_core module; engines that need vLLM or TRL import them inside functions only.
MODULES = [
    "avr_core.schemas",
    "avr_core.config",
    "avr_core.templates",
    "avr_core.selection",
    "avr_core.storage",
    "avr_core.ingest",
    "avr_core.constraints",
    "avr_core.models",
    "avr_core.synthesis",
    "avr_core.reporting",
    "avr_core.engines",
    "avr_core.engines.transformers_backend",
    "avr_core.engines.vllm_backend",
    "avr_core.engines.openai_backend",
    "avr_core.engines.rules",
    "avr_core.training",
]


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_without_prefect_vllm_or_trl(module: str) -> None:
    # A None entry in sys.modules makes `import prefect` raise ImportError, as if not installed.
    code = (
        "import sys\n"
        "for name in ('prefect', 'vllm', 'trl'):\n"
        "    sys.modules[name] = None\n"
        f"import {module}\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
