"""Kernel variants chosen per adapter and weight shape: a small space, timed once, then cached.

Decode spends most of its time in the mat-vec, and its best shape differs between adapters:
CPU adapters (lavapipe, SwiftShader) want several rows per invocation (the activations are
read once for them all), GPUs want many invocations, and there the ones that split a four of rows over
its blocks (matvec.wgsl.j2: split), whose subgroups load the weights in runs, win (an H100 on Vulkan:
decode 4.2x at Llama 3.2 1B's shapes, 2.3x for SmolLM2); on CPU adapters those lose 5-9x and are not
timed. The first load on an adapter times each variant on one of the model's own weights and keeps
the fastest; the result is cached (a JSON file natively, IndexedDB in the browser) under the
adapter's name and the shape of the weight it was timed on, so later loads of a model of that shape
skip it.
Where nothing was measured, DEFAULTS applies.

The prefill mat-mat and attention are chosen by rule, not timed. On CPU adapters every invocation loads the
activations it reads for itself, so the kernels share them: where subgroups hold at least 8 lanes
(lavapipe) by subgroup broadcasts (`xshare`, 4x the tiled kernel there; 8 rows by 32 tokens an
invocation, 8 a workgroup, gate and up 4 rows of each: each broadcast value serves 8 rows, each dequantized
weight 32 tokens, and a four of rows reads its scale words in one load. With the activations read from
textures, on the Xeon of README.md's peer table (benchmarks/matvec_parts.py --prefill --variants [--glu]),
8 by 32 beats the 4 by 16 before it at every shape of SmolLM2: 576x576 1868 against 2224 us, 576x1536
4267 against 5263, 192x576 758 against about 800; gate and up at 1536x576 at 4 rows of each by 32 tokens
8898 against 9468 (8 by 16: 9763). The whole 128-token prefill plan of SmolLM2 709 -> 634 ms, Gemma 3
270M's (K-quants) 937 -> 804, the 1B shapes' 5412 -> 4780 (the plans taking turns in one process). A prompt
pays for whole tiles of 32 tokens: 12 tokens take 165 ms against 145, 40 already 308 against 357. The
kernels compile in 0.2-0.35 s each against 0.03-0.1); where they hold 4 (SwiftShader)
by broadcasts from 4 lanes, 8 rows by 8 tokens an invocation, 8 invocations a workgroup, gate and up 12 rows of
each (SmolLM2's 128-token prefill 9.1 -> 3.8 s there against the tiled kernel, which stays for adapters
without subgroups; then 8 rows a workgroup of 8, not 16, and gate and up at 12, not 4: 25.2 -> 30.4 tok/s in
Chromium. 16 rows, and 16 of gate and up, gain little more and compile for seconds longer: SwiftShader's
compile time grows with the unrolled body). GPUs with subgroups take
the shared mat-mat too: one dispatch a weight for all the step's tokens instead of one a tile of 8, with
the RMSNorm and RoPE folded in (an H100 on Vulkan prefilled the 1B's shapes at 1529-1541 tok/s against
233-235 with the one-row tiled kernel: time to first token 0.083 s against 0.55), in a shape of their own
(MATMUL_GPU: 2 rows by 8 tokens an invocation, 32 a workgroup; the 4 by 16 lavapipe then ran unrolled into kernels
NVIDIA's driver took 1-2.3 s each to compile): the 1B's shapes prefill at 3778-3906 tok/s against
1477-1482, time to first token 0.033 s against 0.087, and the plans compile in 2.2-2.8 s against 9.1-9.4.
Prefill attention shares each key and value by broadcasts the same way where subgroups hold 8 lanes or 4
(SwiftShader's 128-token prefill 4.68 -> 3.96 s). Decode attention
splits a head's keys over 8 invocations on CPU adapters and 32 on GPUs; on CPU adapters a workgroup
computes the query heads of one kv head together.
"""

from __future__ import annotations

import json
import os
import time

from .gpu import Binding, Dispatch
from .graph import GraphBuilder
from .kernels import Kernels

SPACE = {"matvec": [{"rows": 1, "wg": 64}, {"rows": 2, "wg": 32}, {"rows": 4, "wg": 32}]}
# with subgroups: activations shared by broadcasts, 4 lanes (SwiftShader) each loading a quarter of a block's
# activations, 8 lanes or more (lavapipe, GPUs) an eighth (shared activations beat the uniform window by 3-20%
# on lavapipe depending on the shape, 8 lanes 7-8% more than 4). Rows an invocation: SwiftShader wants 8-12
# (1.5-2.3x its 4-row shape), lavapipe 4-8 (8: up to 10% faster at 8192x2048):
# benchmarks/matvec_parts.py --variants
SUBGROUP_SPACE = {"matvec": {4: [{"rows": 8, "wg": 16, "xshare": True},
                                 {"rows": 12, "wg": 16, "xshare": True}],
                             8: [{"rows": 4, "wg": 32, "xshare": True, "xl": 8},
                                 {"rows": 8, "wg": 16, "xshare": True, "xl": 8}]}}
# GPUs: invocations split each four of rows over its blocks (matvec.wgsl.j2: split), which reads the weights
# in runs a subgroup loads together; the other shapes give each invocation whole rows
GPU_SPACE = {"matvec": [{"rows": 4, "wg": 64, "split": 8}, {"rows": 4, "wg": 64, "split": 16},
                        {"rows": 4, "wg": 128, "split": 32}]}
DEFAULTS = {"cpu": {"matvec": {"rows": 4, "wg": 32}}, "gpu": {"matvec": {"rows": 1, "wg": 64}}}
MATMUL_XSHARE = {"wg": 8, "xshare": True, "rows": 8, "glu_rows": 4, "t": 32, "xl": 8}
# GPUs with subgroups of 8 lanes or more: smaller invocations, more of them (an H100 on Vulkan, 128 tokens of
# Q4_1: gate and up at 8192x2048 409 us against 1596 with the CPU adapters' 4 by 16 of then, compiling in 0.38 s against 2.34;
# 2048x8192 514 us against 1406: benchmarks/matvec_parts.py --prefill --variants [--glu]). Rows not in
# fours: RoPE and the cache write keep their own kernel there (graph._fold_rope_tokens), a dispatch a layer
MATMUL_GPU = {"wg": 32, "xshare": True, "rows": 2, "glu_rows": 2, "t": 8, "xl": 8}
# SwiftShader compiles the gate and up of a K-quant at 8 rows of each with more than 8 GB (4: under 300 MB)
MATMUL_XSHARE4 = {"wg": 8, "xshare": True, "rows": 8, "glu_rows": 12, "glu_rows_k": 4, "t": 8, "xl": 4}
MATMUL_CPU_TILED = {"wg": 16, "xshare": False, "rows": 6, "tmax": 16}
# CPU adapters: decode attention splits a head's keys over 8 invocations, not 32: fewer wait at its
# barrier and less workgroup memory to combine (in Chromium on SwiftShader 46 -> 21 ms a SmolLM2 token);
# and a workgroup takes up to 4 query heads of one kv head, loading each key and value once for them
# (a decode step's attention: SmolLM2 4.4 -> 3.2 ms on lavapipe, 16.3 -> 11.3 on SwiftShader; the 1B
# shapes 7.0 -> 4.1 ms)
ATTENTION_CPU = {"decode_split": 8, "decode_group": 4}
# prefill attention shared over subgroup lanes: a workgroup takes up to 4 query heads of one kv head, each
# key and value fetched and broadcast once for them (SmolLM2, 128 tokens on lavapipe: 48 -> 39 ms, prefill
# 164.7 -> 171.4 tok/s, medians of three benches each, taking turns)
ATTENTION_SHARE = {"wg": 16, "share": True, "prefill_group": 4, **ATTENTION_CPU}
ATTENTION_SHARE4 = {**ATTENTION_SHARE, "xl": 4}
VERSION = 13      # a change to the kernels, the space or the key makes older measurements stale


def space(lanes: int, gpu: bool = False) -> list[dict]:
    """The mat-vec variants timed on an adapter whose subgroups hold `lanes` (0: no subgroups); on a GPU
    the split ones too, not on CPU adapters (lavapipe, SwiftShader), where one invocation is one SIMD
    lane of a core and the variants that keep whole rows in one win."""
    extra = SUBGROUP_SPACE["matvec"][8 if lanes >= 8 else 4] if lanes >= 4 else []
    return SPACE["matvec"] + extra + (GPU_SPACE["matvec"] if gpu else [])


def every_variant(lanes: int) -> list[dict]:
    """Every mat-vec variant some adapter may choose that runs on subgroups of `lanes` (the shared ones
    need 4 or 8)."""
    return (SPACE["matvec"] + [v for need, vs in SUBGROUP_SPACE["matvec"].items() if lanes >= need for v in vs]
            + GPU_SPACE["matvec"])


def adapter_key(backend) -> str:
    i = backend.adapter_info or {}
    # the driver's release too: the same device under a newer driver compiles kernels differently
    name = ":".join(str(i[k]) for k in ("device", "description") if i.get(k))
    return f"v{VERSION}:{backend.name}:{i.get('vendor')}:{name}"


def is_cpu(backend) -> bool:
    i = backend.adapter_info or {}
    return i.get("adapter_type") == "CPU" or any(
        s in str(i.get(k) or "").lower() for k in ("device", "description", "vendor", "architecture")
        for s in ("llvmpipe", "swiftshader", "lavapipe"))


def defaults(backend) -> dict:
    return {op: dict(v) for op, v in DEFAULTS["cpu" if is_cpu(backend) else "gpu"].items()}


async def subgroup_size(backend, kernels) -> int:
    """The smallest subgroup one workgroup of 64 runs in (0 without subgroups); measured once per device."""
    if "subgroups" not in backend.features:
        return 0
    size = getattr(backend, "subgroup_size", None)
    if size is None:
        buf = backend.create_buffer(64 * 4, "subgroup size")
        try:
            pipe = kernels.pipeline("subgroup_size", {}, {})
            plan = backend.create_plan([Dispatch(pipe, {0: Binding(buf)}, (1, 1, 1), "subgroup size")])
            raw = await backend.submit_and_read(plan, buf, 0, 64 * 4)
        finally:
            backend.destroy_buffer(buf)
        size = min(int.from_bytes(raw[i:i + 4], "little") for i in range(0, 64 * 4, 4))
        backend.subgroup_size = size
    return size


def shared_matmul(lanes: int, gpu: bool = False) -> dict | None:
    """The shared prefill mat-mat for subgroups of `lanes` (broadcasts from 8 lanes or 4), on a GPU or a CPU
    adapter; None below 4."""
    if lanes < 4:
        return None
    if lanes < 8:
        return dict(MATMUL_XSHARE4)
    return dict(MATMUL_GPU if gpu else MATMUL_XSHARE)


async def rule_choice(engine) -> dict:
    """The kernels chosen by rule for this adapter, not timed: the prefill mat-mat, and the attention's
    prefill shape and decode split (see the module's docstring)."""
    lanes = await subgroup_size(engine.backend, engine.kernels)
    gpu = not is_cpu(engine.backend)
    matmul = shared_matmul(lanes, gpu)
    if gpu:      # the shared mat-mat too, the attention as GPUs want it
        return {"matmul": matmul or {"xshare": False}}
    if matmul is None:
        return {"matmul": dict(MATMUL_CPU_TILED), "attention": dict(ATTENTION_CPU)}
    return {"matmul": matmul, "attention": dict(ATTENTION_SHARE if lanes >= 8 else ATTENTION_SHARE4)}


def _matvec_graph(engine, weight, variant: dict, repeat: int):
    """A graph of `repeat` mat-vecs of `weight` with `variant`: (graph, x, out)."""
    k = engine.kernels
    saved = k.tuning.get("matvec")
    k.tuning["matvec"] = variant
    try:
        g = GraphBuilder(k, engine.state, 1)
        x = g._tensor(weight.cols, 1)
        out = g._tensor(weight.rows, 1)
        for _ in range(repeat):
            g._matvec(weight, x, out.buffer, "store")
    finally:
        if saved is None:
            k.tuning.pop("matvec", None)
        else:
            k.tuning["matvec"] = saved
    return g, x, out


async def matvec_timer(engine, weight, variant: dict, repeat: int = 8):
    """A function timing one replay of `repeat` mat-vecs of `weight` with `variant` (seconds per mat-vec);
    the plan is built and compiled (and run once) before it returns."""
    be = engine.backend
    g, x, out = _matvec_graph(engine, weight, variant, repeat)
    # the mat-vecs alone: the copy of x into a texture where they read one (graph._x_texture), made once
    # for all of them, is no part of any variant's time
    plan = be.create_plan([d for d in g.dispatches if d.family != "to_texture"], "tuning")
    await be.submit_and_read(plan, engine.state.step, 0, 16)      # compiles, warms up

    async def once() -> float:
        t0 = time.perf_counter()
        await be.submit_and_read(plan, engine.state.step, 0, 16)
        return (time.perf_counter() - t0) / repeat

    once.keep = (g, x, out)       # the plan's buffers live as long as the timer
    return once


async def norm_timer(engine, norm, repeat: int = 8):
    """A function timing one replay of `repeat` RMSNorms by the 1-row weight `norm`, each its own dispatch
    (seconds per RMSNorm): what a decode step pays for each norm that its mat-vecs do not fold in."""
    be = engine.backend
    g = GraphBuilder(engine.kernels, engine.state, 1)
    x = g._tensor(norm.cols, 1)
    outs = [g.rms_norm(x, norm, 1e-6) for _ in range(repeat)]
    plan = be.create_plan(g.dispatches, "tuning")
    await be.submit_and_read(plan, engine.state.step, 0, 16)

    async def once() -> float:
        t0 = time.perf_counter()
        await be.submit_and_read(plan, engine.state.step, 0, 16)
        return (time.perf_counter() - t0) / repeat

    once.keep = (g, x, outs)
    return once


async def measure_variants(engine, weight, variants: list[dict], rounds: int = 5, norm=None,
                           repeat: int = 8) -> list[float]:
    """Seconds per mat-vec for each variant (with `norm`, then seconds per RMSNorm dispatch last): the
    timers take turns, round after round, and each keeps its fastest time, so a burst of other work on
    the machine weighs on none of them alone."""
    # every variant's kernels compile together first (natively side by side, a browser's GPU process
    # likewise), not one after another as each timer is made
    kernels = [kern for v in variants for kern in _matvec_graph(engine, weight, v, 1)[0].kernels]
    await engine.kernels.start_compile(kernels)
    timers = [await matvec_timer(engine, weight, v, repeat) for v in variants]
    if norm is not None:
        timers.append(await norm_timer(engine, norm, repeat))
    best = [float("inf")] * len(timers)
    for _ in range(rounds):
        for i, once in enumerate(timers):
            best[i] = min(best[i], await once())
    return best


def step_costs(engine, weight, variants: list[dict], times: list[float]) -> list[float]:
    """Seconds a decode step spends in mat-vecs and the RMSNorms before them with each variant: its time on
    `weight` scaled to every weight a step reads, plus, for the variants that do not fold the norms into
    the mat-vecs (those sharing activations by broadcasts or splitting rows do), a dispatch per norm (two
    a layer and the last one; the RMSNorm's time is times[-1]). On lavapipe a dispatch costs 50-100 us
    whatever it does: SmolLM2's 61 norms weigh as much as a 10% slower mat-vec."""
    scale = sum(w.nbytes for w in engine.weights.values() if w.rows > 1) / weight.nbytes
    norms = 2 * engine.args.n_layers + 1
    return [t * scale + (0.0 if Kernels.folds_norm(v) else norms * times[-1]) for v, t in zip(variants, times)]


def tuning_weight(engine):
    """The weight to time the variants on: the widest layer weight of the quant type that holds most
    of the model's bytes (the vocabulary-sized head is one mat-vec a token; the layers are the rest)."""
    mats = [w for w in engine.weights.values()
            if w.rows > 1 and len(w.parts) == 1 and w.qtype != "F32" and w.rows != engine.args.vocab_size]
    if not mats:
        return None
    by_type: dict[str, int] = {}
    for w in mats:
        by_type[w.qtype] = by_type.get(w.qtype, 0) + w.nbytes
    main = max(by_type, key=by_type.get)
    return max((w for w in mats if w.qtype == main), key=lambda w: w.nbytes)


def choice_key(backend, weight, activation_textures: bool = False) -> str:
    """The cache key of a measurement: the adapter, the shape of the weight it was timed on (the best
    variant for a 64-wide test model is not the best for a 2048-wide layer), and where the weights
    and the activations lie (storage or textures: kernels.weight_textures, activation_textures), which
    changes what each variant's loads cost."""
    where = f"w{'tex' if getattr(weight, 'texture', False) else 'buf'}:x{'tex' if activation_textures else 'buf'}"
    return f"{adapter_key(backend)}:{weight.qtype}:{weight.rows}x{weight.cols}:{where}"


async def tune(engine, cache: dict | None = None) -> tuple[dict, str, str | None]:
    """The mat-vec for this engine: (choice, how: "cached" | "measured" | "default", cache key).
    Only measurements are cached; the kernels chosen by rule come from rule_choice at every load."""
    weight = tuning_weight(engine)
    if weight is None:
        return defaults(engine.backend), "default", None
    key = choice_key(engine.backend, weight, engine.kernels.activation_textures)
    if cache and isinstance(cache.get(key), dict) and isinstance(cache[key].get("matvec"), dict):
        return {"matvec": cache[key]["matvec"]}, "cached", key
    gpu = not is_cpu(engine.backend)
    variants = space(await subgroup_size(engine.backend, engine.kernels), gpu)
    norm = next((w for w in engine.weights.values() if w.rows == 1 and w.cols == engine.args.dim), None)
    # a GPU runs a mat-vec in microseconds: enough of them in a replay that the submission's own cost
    # does not swamp the differences
    times = await measure_variants(engine, weight, variants, norm=norm, repeat=64 if gpu else 8)
    if norm is not None:
        times = step_costs(engine, weight, variants, times)
    return {"matvec": dict(variants[times.index(min(times))])}, "measured", key


# -- the native cache: a JSON file in the cache folder -------------------------------------------------

def _cache_file() -> str:
    from .default_model import cache_dir

    return os.path.join(cache_dir(), "tuning.json")


def load_native() -> dict:
    """Every measurement kept on this machine, by choice_key."""
    try:
        with open(_cache_file()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_native(key: str, choice: dict) -> None:
    path = _cache_file()
    data = {k: v for k, v in load_native().items() if k.startswith(f"v{VERSION}:")}    # older ones are stale
    data[key] = choice
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.part"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
