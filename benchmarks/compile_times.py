"""What each of a model's kernels costs to compile on this adapter: the part of a cold load that the
plans take (`pyengine bench`: cold_load_parts_s.plan_s), kernel by kernel.

    python benchmarks/compile_times.py [--model PATH | --synthetic llama-1b] [--adapter NAME]

Loads the model natively once, with every pipeline the load makes (the decode step's kernels, the
prefill's, the tuner's variants) timed as the driver builds it, and prints them slowest first with
their share of the whole. The driver's own shader cache can hide a compile: on NVIDIA set
__GL_SHADER_DISK_CACHE=0 (or a fresh __GL_SHADER_DISK_CACHE_PATH) to see cold figures. Kernels the
load compiles side by side (NativeBackend.create_pipelines, a thread a core) are timed each on its
own thread, so their sum can exceed the load's plan time.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyengine.engine import Engine  # noqa: E402
from pyengine.gpu import open_backend  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a GGUF file (default: the packaged SmolLM2-135M)")
    ap.add_argument("--synthetic", choices=["llama-1b", "llama-3b"], help="a model of these shapes instead")
    ap.add_argument("--adapter", help="part of the adapter's name (default: the one wgpu prefers)")
    ap.add_argument("--top", type=int, default=15, help="kernels to list")
    a = ap.parse_args()
    if a.synthetic:
        from pyengine.synthetic import synthetic_model
        path = synthetic_model(a.synthetic)
    elif a.model:
        path = a.model
    else:
        from pyengine.default_model import DEFAULT, packaged_model_path
        path = packaged_model_path(DEFAULT)
    be = open_backend("native", adapter=a.adapter) if a.adapter else open_backend("native")
    times, lock = [], threading.Lock()
    create = be.create_pipeline

    def timed(code, constants, label=""):
        t0 = time.perf_counter()
        try:
            return create(code, constants, label)
        finally:
            with lock:
                times.append((time.perf_counter() - t0, label, len(code)))
    be.create_pipeline = timed
    t0 = time.perf_counter()
    engine = Engine.load(path, be)
    load = time.perf_counter() - t0
    parts = {k: round(v, 3) for k, v in engine.load_times.items()}
    engine.close()
    total = sum(t for t, _, _ in times)
    print(f"{be.adapter_info.get('device')} ({be.adapter_info.get('description')}): {os.path.basename(path)}")
    print(f"load {load:.2f} s {parts}; {len(times)} kernels compiled in {total:.2f} s")
    for t, label, n in sorted(times, reverse=True)[:a.top]:
        print(f"  {t * 1e3:8.1f} ms  {100 * t / total:5.1f}%  {n // 1024:4d} KB of WGSL  {label}")


if __name__ == "__main__":
    main()
