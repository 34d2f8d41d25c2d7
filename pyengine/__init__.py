"""pyengine: LLM inference in Python on WebGPU, natively (wgpu-py) and in the browser (Pyodide)."""

__version__ = "0.1.0"

from .errors import (  # noqa: E402,F401
    ContextOverflowError, GGUFError, GPUError, PyEngineError, RequestError, TemplateError,
    UnsupportedModelError,
)
