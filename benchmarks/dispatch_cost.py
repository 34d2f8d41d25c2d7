"""What one dispatch costs on this adapter when it does almost nothing: the floor every kernel of a
decode step pays, however little work it has.

    python benchmarks/dispatch_cost.py [--adapter swiftshader] [--dispatches 300] [--rounds 7]

Replays plans of --dispatches tiny dispatches (each adds 1 to a few hundred floats, the size of a
small model's RMSNorm) and prints the median time per dispatch over --rounds replays, for a few
workgroup counts, and the CPU time one dispatch takes to encode. Multiplied by a decode step's
dispatch count (`pyengine bench`: dispatches_per_token) it is the part of a token's time that
fusing kernels can win back. On lavapipe the floor is the hand-over of every dispatch to the
driver's worker threads (LP_NUM_THREADS=0, which runs them on the submitting thread, takes it
from ~50 us to ~7 us, and loses the second core for the kernels that do work).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyengine.bench import _time_plan  # noqa: E402
from pyengine.gpu import Binding, Dispatch, open_backend  # noqa: E402

KERNEL = """
@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@compute @workgroup_size({wg})
fn main(@builtin(global_invocation_id) g: vec3<u32>) {{ if (g.x < {n}u) {{ y[g.x] += 1.0; }} }}
"""
SHAPES = [(64, 1), (64, 9), (32, 12), (64, 24)]     # (workgroup size, workgroups)


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", help="part of the adapter's name (default: the one wgpu prefers)")
    ap.add_argument("--dispatches", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    be = open_backend("native", adapter=a.adapter) if a.adapter else open_backend("native")
    y = be.create_buffer(1 << 16, "y")
    print(f"{be.adapter_info.get('device')}: {a.dispatches} dispatches a plan, median of {a.rounds} replays")
    for wg, groups in SHAPES:
        pipe = be.create_pipeline(KERNEL.format(wg=wg, n=wg * groups), {}, "tiny")
        plan = be.create_plan([Dispatch(pipe, {0: Binding(y)}, (groups, 1, 1), "tiny")] * a.dispatches)
        per = await _time_plan(be, plan, a.rounds) / a.dispatches
        t0 = time.perf_counter()
        for _ in range(a.rounds):
            be._encode(plan)
        encode = (time.perf_counter() - t0) / a.rounds / a.dispatches
        print(f"  {groups:3d} workgroups of {wg:3d}: {per * 1e6:6.1f} us a dispatch, "
              f"encoding {encode * 1e6:4.1f} us of CPU")


if __name__ == "__main__":
    asyncio.run(main())
