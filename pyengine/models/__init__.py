"""Architectures, each a short graph file; ARCHITECTURES maps a GGUF general.architecture to one."""

from .llama import Llama

ARCHITECTURES = {
    "llama": Llama,
}
