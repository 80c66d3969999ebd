"""Module-scoped fixtures of the tests against a real vLLM server on the bundled SmolLM2 model:
the vLLM interpreter (`$HPCDISTILL_VLLM_PYTHON`, CI: .venv-vllm/bin/python, else `python3`; the
test is skipped when neither can import vllm), the model converted for vLLM and the same model
loaded in transformers.

    from vllmfixtures import handle, model_dir, vllm_python  # noqa: F401  (pytest finds them by name)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcdistill.models.loading import ModelHandle, bundled_gguf_path, converted_gguf_dir, load_model
from hpcdistill.models.vllm_server import resolve_vllm_python, vllm_importable

BUNDLED = "bundled:smollm2-135m-instruct"
QUESTIONS = ["What is 2+2?", "Name a color.", "Write a haiku about the sea."]


def require_vllm() -> str:
    """The vLLM interpreter, or skip the calling test with how to provide one."""
    python = resolve_vllm_python("python3")
    if not vllm_importable(python):
        pytest.skip(f"no vLLM python: {python!r} cannot import vllm (set HPCDISTILL_VLLM_PYTHON, "
                    "e.g. to .venv-vllm/bin/python; docs/vllm.md)")
    return python


@pytest.fixture(scope="module")
def vllm_python() -> str:
    return require_vllm()


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return converted_gguf_dir(bundled_gguf_path("smollm2-135m-instruct"), "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def handle() -> ModelHandle:
    return load_model(BUNDLED)
