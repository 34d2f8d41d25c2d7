"""The errors a user can cause; each message says what was wrong in one sentence."""


class PyEngineError(Exception):
    """Base of every error pyengine raises on purpose."""


class GGUFError(PyEngineError):
    """The model file is not a GGUF file this reader can use."""


class UnsupportedModelError(PyEngineError):
    """The GGUF is valid but its architecture, quant type or tokenizer is not supported."""


class TemplateError(PyEngineError):
    """The chat template is missing or cannot be rendered."""


class ContextOverflowError(PyEngineError):
    """The prompt (plus the tokens to generate) does not fit in the context."""


class RequestError(PyEngineError, ValueError):
    """A generation request has a field with a wrong type or value."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class EngineBusyError(PyEngineError):
    """A request arrived while another ran on an engine told to reject instead of queueing."""


class GPUError(PyEngineError):
    """The GPU could not be set up or lost the device."""
