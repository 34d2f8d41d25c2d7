"""Shared fixtures: the GPU (lavapipe in CI), the default model, tiny models written per session."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def run(coro):
    """asyncio.run, also from tests where Playwright's sync API already runs a loop in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="session")
def backend():
    from pyengine.gpu import open_backend

    return open_backend("native")   # no adapter: fails loudly, as a missing GPU stack should


@pytest.fixture(scope="session")
def model_path():
    from pyengine.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def gemma_path():
    """Gemma 3 270M Q4_K_M (a base model: Q4_K, Q6_K, Q5_0, Q8_0 and F32 tensors, SentencePiece vocabulary)."""
    from pyengine.default_model import packaged_model_path

    return packaged_model_path("gemma3-270m")


@pytest.fixture(scope="session")
def engine(model_path, backend):
    from pyengine.engine import Engine

    return run(Engine.open(model_path, backend))


@pytest.fixture(scope="session")
def reference(model_path):
    from reference import Reference

    return Reference(model_path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from ggufs import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama.gguf"))


@pytest.fixture(scope="session")
def tiny_llama_v2(tmp_path_factory):
    """The tiny model's next version: the same shapes and names, other weights."""
    from ggufs import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("models-v2") / "tiny-llama.gguf", seed=1))


@pytest.fixture(scope="session")
def site(tmp_path_factory, tiny_llama, tiny_llama_v2):
    """The web build in a temporary dist/, served on 127.0.0.1: (folder, base URL)."""
    import subprocess

    from pyengine.serve import serve_in_thread

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from pyengine.shards import pack

    out = str(tmp_path_factory.mktemp("site") / "dist")
    subprocess.run([sys.executable, os.path.join(root, "build", "build.py"), "--out", out], check=True,
                   stdout=subprocess.DEVNULL)
    # tiny models too, for tests that need many quick requests or two versions of one model
    pack(tiny_llama, os.path.join(out, "models", "tiny"), max_shard=40_000)
    pack(tiny_llama_v2, os.path.join(out, "models", "tiny-v2"), max_shard=40_000)
    httpd, url = serve_in_thread(out)
    yield out, url
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium with WebGPU (SwiftShader where there is no GPU). Module-scoped: Playwright's
    sync API runs an event loop in this thread while it is open, which asyncio.run elsewhere cannot share."""
    from playwright.sync_api import sync_playwright

    from pyengine.headless import CHROMIUM_ARGS, chromium_path

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()
