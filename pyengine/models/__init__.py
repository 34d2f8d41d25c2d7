"""Architectures, each a short graph file; ARCHITECTURES maps a GGUF general.architecture to one."""

from .gemma3 import Gemma3
from .llama import Llama
from .phi3 import Phi3
from .qwen2 import Qwen2
from .qwen3 import Qwen3

ARCHITECTURES = {
    "llama": Llama,
    "qwen2": Qwen2,
    "qwen3": Qwen3,
    "gemma3": Gemma3,
    "phi3": Phi3,
}
