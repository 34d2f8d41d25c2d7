"""Where the decode mat-vec's time goes on this adapter: the kernel as it runs, then with one part
of its work taken out at a time (the weights' loads, their scales, the activations' loads, the
4-bit unpacking, the whole loop body).

    python benchmarks/matvec_parts.py [--adapter swiftshader] [--rows 1536 --cols 576] [--rounds 7] [--prefill | --variants]

--prefill does the same for the prefill mat-mat in the shape CPU adapters with 8-lane subgroups
run (lavapipe: tuning.MATMUL_XSHARE) over 128 tokens: as it runs, without the activations' loads
(values that differ from lane to lane instead, so that the arithmetic stays),
without the subgroup broadcasts that share them, without the weights' dequantization, without both
loads and dequantization. --prefill --variants times that mat-mat whole in several shapes (rows and
tokens an invocation, invocations a workgroup), fastest first, with the seconds each took to compile
(on 4-lane subgroups, SwiftShader's, a shape list of its own); with --glu, the gate-and-up mat-mat.

--int8 times the mat-vecs that share activations by broadcasts (the ones CPU adapters choose) as they run
and with 8-bit activations instead (a scale and a sum a block of 32, as llama.cpp's Q8_1): the 4-bit
weights' products summed as integers, either two at a time in the halves of one 32-bit multiply (the
bytes of a word paired with activations packed in 16-bit halves; the sum of a half block stays in
range) or by dot4I8Packed. Not what pyengine runs: its figures say whether such a mode would pay here.

--variants instead times every mat-vec variant the tuner may choose on this adapter (pyengine/tuning.py),
whole, fastest first: what the first load on an adapter measures, at any shape. With --copies N the
dispatches read N copies of the weight in turn, so that it is not in cache, as in a decode step
(--copies 20 at 8192x2048 reads 210 MB).

Each variant is the real WGSL of the tuned Q4_1 mat-vec, edited; the results are wrong on purpose,
only their times count. A part whose removal saves little is not what bounds the kernel. Prints
each variant's fastest replay of 20 dispatches (median and minimum over --rounds rounds, the
variants taking turns) and the weight bytes a second that time stands for. The weight lies where the
engine puts weights on this adapter (textures on CPU adapters, buffers on GPUs); PYENGINE_WEIGHTS=buffers
or =textures puts it in the other (kernels.weight_textures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyengine.gpu import Binding, Dispatch, open_backend  # noqa: E402
from pyengine.kernels import (UNIFORM_BYTES, VARIANTS, Kernels, activation_texture_rows, packed_nbytes,  # noqa: E402
                              texture_rows)
from pyengine.tuning import (MATMUL_XSHARE, every_variant, is_cpu, shared_matmul, space,  # noqa: E402
                             subgroup_size)

REPEAT = 20


def _loop_body(code: str) -> tuple[int, int]:
    """Start and end of the block loop's body."""
    start = code.index("{", code.index("for (var b = 0u; b < K / BV; b++)")) + 1
    depth, i = 1, start
    while depth:
        depth += {"{": 1, "}": -1}.get(code[i], 0)
        i += 1
    return start, i - 1


def no_weight_loads(code):
    code = re.sub(r"let q = W_at\(blk\);", "let q = vec4<u32>(blk, blk * 3u, blk ^ 0x5555u, blk + 77u);", code)
    return no_scale_loads(code)


def no_scale_loads(code):
    """W_wd, the scale words' reader (shaders/_quant.wgsl.j2: weight_binding), returning its index."""
    start = code.index("fn W_wd(")
    word = re.match(r"fn W_wd\(i: u32\) -> (.+?) \{", code[start:]).group(1)
    depth, i = 0, code.index("{", start)
    while True:
        depth += {"{": 1, "}": -1}.get(code[i], 0)
        i += 1
        if depth == 0:
            break
    return code[:start] + f"fn W_wd(i: u32) -> {word} {{ return {word}(i); }}" + code[i:]


def no_activation_loads(code):
    code = re.sub(r"let (x[0-7]) = x\[[^\]]*\];", r"let \1 = vec4<f32>(f32(c), 1.0, 2.0, 3.0);", code)
    return re.sub(r"\bx\[c( \+ 4u)? \+ sl\]", "vec4<f32>(f32(c), f32(sl), 1.0, 2.0)", code)     # shared by lanes


def no_unpacking(code):
    return re.sub(r"let s = nib_lo\(q\.x\) \* x0 [^;]*;", "let s = bitcast<vec4<f32>>(q) * x0;", code)


def empty_body(code):
    start, end = _loop_body(code)
    accs = re.findall(r"var (acc\d+) = 0\.0;", code)
    return code[:start] + "\n" + "".join(f"        {a} += f32(b);\n" for a in accs) + "    " + code[end:]


def mm_no_activation_loads(code):
    return re.sub(r"x_at\(xr(\d+) \+ c[^)]*\)", r"vec4<f32>(f32(xr\1), f32(c), f32(xr\1 + c), f32(xr\1 ^ c))", code)


def mm_no_broadcasts(code):
    return re.sub(r"subgroupBroadcast\((xv\d+_\d+), \d+u\)", r"\1", code)


def mm_no_dequant(code):
    return re.sub(r"let (\w*w\d+) = dequant\w*\([^;]*\);", r"var \1: array<vec4<f32>, 8>; for (var i = 0u; i < 8u; i++) "
                  r"{ \1[i] = vec4<f32>(f32(b), f32(j), f32(i), 1.0); }", code)


def mm_no_loads_or_dequant(code):
    return mm_no_dequant(mm_no_activation_loads(code))


PREFILL_PARTS = {"as it runs": None, "without activation loads": mm_no_activation_loads,
                 "without broadcasts": mm_no_broadcasts, "without dequantization": mm_no_dequant,
                 "without loads, dequantization": mm_no_loads_or_dequant}
PREFILL_TOKENS = 128
# shapes of the shared mat-mat (rows and tokens an invocation, invocations a workgroup) --prefill --variants times
# (with --glu, rows of each of gate and up: the engine runs half the rows of the store shape there)
PREFILL_SHAPES = [(1, 8, 64), (2, 6, 16), (2, 8, 16), (2, 8, 32), (2, 10, 16), (2, 16, 16), (3, 10, 16), (3, 16, 16),
                  (4, 8, 16), (4, 12, 16), (4, 16, 16), (4, 24, 16), (4, 32, 16), (6, 8, 16), (6, 10, 16), (6, 12, 16),
                  (6, 16, 16), (6, 24, 16), (8, 8, 8), (8, 10, 8), (8, 16, 8)]
# the same where subgroups hold 4 lanes (SwiftShader), whose compiler wants more rows an invocation
PREFILL_SHAPES4 = [(4, 8, 16), (8, 4, 16), (8, 8, 16), (8, 8, 8), (8, 16, 8), (12, 8, 8), (16, 8, 8), (16, 8, 16),
                   (16, 16, 16), (32, 8, 16)]


def int8_activations(code: str, how: str) -> str:
    """The Q4_1 mat-vec `code` (shared activations) with 8-bit activations: each block of 32 a vec4 of u32
    words per four of its products (`how` "swar": words 4, each two activations in 16-bit halves, then
    scale and sum) or eight words and the scale and sum (`how` "dot4": dot4I8Packed), read by the lanes
    and broadcast as the f32 activations are."""
    texels = 5 if how == "swar" else 3
    code = code.replace("fn x_at(i: u32) -> vec4<f32> {",
                        "fn xq_at(i: u32) -> vec4<u32> { return bitcast<vec4<u32>>(x_at(i)); }\nfn x_at(i: u32) -> vec4<f32> {", 1)
    start = code.index("            let c = b * (BV / 4u) + j * 8u;")
    end = code.index("\n", code.index("let xsum = vec2<f32>(", start)) + 1
    lanes = int(re.search(r"let sl = sid % (\d+)u;", code).group(1))
    new = [f"            let c = b * {texels}u;", f"            let xa = xq_at(c + min(sl, {texels - 1}u));"]
    new += [f"            let X{i} = subgroupBroadcast(xa, {i}u);" for i in range(texels - 1)]
    new.append(f"            let xm = {f'subgroupBroadcast(xa, {texels - 1}u)' if texels <= lanes else f'xq_at(c + {texels - 1}u)'};")
    new.append("            let xscale = bitcast<f32>(xm.x);")
    code = code[:start] + "\n".join(new) + "\n" + code[end:]
    if how == "swar":
        # word k's bytes hold values 4k..4k+3 (low nibbles) and 16+4k.. (high): masked by 0x000F000F they are
        # two values in 16-bit halves; times a word of two activations (one in each half, swapped) the top
        # half gains their two products; a half block's sum of those stays within an i16
        body = """let M = vec4<u32>(0x000F000Fu);
                let p = (q & M) * X0 + ((q >> vec4<u32>(8u)) & M) * X1;
                let h = ((q >> vec4<u32>(4u)) & M) * X2 + ((q >> vec4<u32>(12u)) & M) * X3;
                let tl = bitcast<i32>(p.x + p.y + p.z + p.w);
                let th = bitcast<i32>(h.x + h.y + h.z + h.w);
                let t = f32(((tl - ((tl << 16u) >> 16u)) >> 16u) + ((th - ((th << 16u) >> 16u)) >> 16u)) * xscale;"""
    else:
        body = """let m = vec4<u32>(0x0F0F0F0Fu);
                let lo = q & m;
                let hi = (q >> vec4<u32>(4u)) & m;
                let t = f32(dot4I8Packed(lo.x, X0.x) + dot4I8Packed(lo.y, X0.y) + dot4I8Packed(lo.z, X0.z) + dot4I8Packed(lo.w, X0.w)
                        + dot4I8Packed(hi.x, X1.x) + dot4I8Packed(hi.y, X1.y) + dot4I8Packed(hi.z, X1.z) + dot4I8Packed(hi.w, X1.w)) * xscale;"""
    code, n = re.subn(r"let s = nib_lo\(q\.x\) \* x0 [^;]*;\s*let t = dot\(s, NIB\);", body, code)
    if not n:
        raise SystemExit("--int8: the kernel no longer has the 4-bit products this edit replaces")
    return code.replace("(xsum.x + xsum.y)", "bitcast<f32>(xm.y)")


INT8 = {"f32 activations (as it runs)": None, "8-bit, two products a multiply": "swar", "8-bit, dot4I8Packed": "dot4"}


PARTS = {"as it runs": None, "without weight loads": no_weight_loads, "without scale loads": no_scale_loads,
         "without activation loads": no_activation_loads, "without 4-bit unpacking": no_unpacking,
         "without the loop body": empty_body}


def weight(be, k, nbytes: int):
    """A weight of `nbytes` packed bytes where this adapter's weights lie: a texture or a buffer."""
    if k.weight_textures:
        return be.create_texture(texture_rows(nbytes), "weights")
    return be.create_buffer(nbytes, "weights")


def weight_binds(k, w, slot: int, words_slot: int) -> dict:
    """The bindings of weight `w` at `slot` (a buffer's scale words again at `words_slot`)."""
    if k.weight_textures:
        return {slot: Binding(w)}
    return {slot: Binding(w), words_slot: Binding(w)}


def reachable(code: str) -> str:
    """The text of main and of every function it calls, directly or not: what the kernel runs, so the
    bindings it reads (an edit can leave a function that loads a binding uncalled)."""
    bodies, at = {}, 0
    for m in re.finditer(r"^fn (\w+)\(", code, re.M):
        i = code.index("{", m.end())
        depth, j = 0, i
        while True:
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            j += 1
            if depth == 0:
                break
        bodies[m.group(1)] = code[i:j]
    seen, todo = set(), ["main"]
    while todo:
        f = todo.pop()
        if f in seen or f not in bodies:
            continue
        seen.add(f)
        todo += [g for g in bodies if re.search(rf"\b{g}\(", bodies[f])]
    return "\n".join(bodies[f] for f in seen)


async def replay_times(be, plans: dict, rounds: int) -> dict:
    """Seconds per dispatch of each plan of REPEAT dispatches, round after round, the plans taking turns."""
    times = {name: [] for name in plans}
    for _ in range(rounds + 1):
        for name, plan in plans.items():
            be.submit(plan)
            await be.sync()
            t0 = time.perf_counter()
            be.submit(plan)
            await be.sync()
            times[name].append((time.perf_counter() - t0) / REPEAT)
    return {name: ts[1:] for name, ts in times.items()}


async def time_variants(be, k, w, nbytes, a):
    lanes = await subgroup_size(be, k)
    x = be.create_buffer(max(UNIFORM_BYTES, a.cols * 4), "activations")
    y = be.create_buffer(a.rows * 4, "out")
    # --copies: REPEAT dispatches over that many copies of the weight in turn, as a decode step reads
    # weights that are not in cache; by default the same weight REPEAT times
    ws = [w] + [weight(be, k, nbytes) for i in range(1, a.copies)]
    plans = {}
    for v in every_variant(lanes):
        v = {**VARIANTS["matvec"], **v}
        uniform = k.matvec_uniform(a.cols) and not v["xshare"]
        code = k.render("matvec", qtype="Q4_1", wtex=k.weight_textures, epilogue="store", bias=False,
                        x_uniform=uniform, act="silu", **v)
        pipe = be.create_pipeline(code, {"N": a.rows, "K": a.cols, "ROW0": 0}, "mat-vec")
        groups = (-(-a.rows // k.matvec_rows_per_workgroup(v)), 1, 1)
        plans[json.dumps(v)] = be.create_plan([
            Dispatch(pipe, {**weight_binds(k, wi, 0, 4), 1: Binding(x, 0, UNIFORM_BYTES if uniform else None),
                            2: Binding(y)}, groups, "mat-vec")
            for wi in (ws[i % len(ws)] for i in range(REPEAT))])
    times = await replay_times(be, plans, a.rounds)
    where = f"{len(ws)} copies in turn" if len(ws) > 1 else "one copy, in cache"
    print(f"Q4_1 mat-vec {a.rows}x{a.cols} ({nbytes / 1e6:.2f} MB, {where}), every variant the tuner may "
          f"choose on {be.adapter_info.get('device')} (subgroups of {lanes} lanes)")
    for name, ts in sorted(times.items(), key=lambda t: min(t[1])):
        print(f"  median {statistics.median(ts) * 1e6:8.1f} us   min {min(ts) * 1e6:8.1f} us   "
              f"{nbytes / min(ts) / 1e9:5.2f} GB/s   {name}")


async def time_int8(be, k, w, nbytes, a):
    lanes = await subgroup_size(be, k)
    shared = [v for v in space(lanes) if v.get("xshare")]
    if not shared:
        raise SystemExit("--int8: this adapter's subgroups are too small for the shared mat-vecs")
    tex = k.activation_textures
    x = (be.create_texture(activation_texture_rows(1, a.cols * 2), "activations") if tex
         else be.create_buffer(max(UNIFORM_BYTES, a.cols * 8), "activations"))
    y = be.create_buffer(a.rows * 4, "out")
    ws = [w] + [weight(be, k, nbytes) for i in range(1, a.copies)]
    plans = {}
    for v in shared:
        v = {**VARIANTS["matvec"], **v, "xtex": tex}
        code = k.render("matvec", qtype="Q4_1", wtex=k.weight_textures, epilogue="store", bias=False,
                        x_uniform=False, act="silu", **v)
        groups = (-(-a.rows // k.matvec_rows_per_workgroup(v)), 1, 1)
        for name, how in INT8.items():
            pipe = be.create_pipeline(int8_activations(code, how) if how else code, {"N": a.rows, "K": a.cols, "ROW0": 0}, name)
            plans[f"{name}, {v['rows']} rows, {v['wg']} a workgroup"] = be.create_plan([
                Dispatch(pipe, {**weight_binds(k, wi, 0, 4), 1: Binding(x), 2: Binding(y)}, groups, name)
                for wi in (ws[i % len(ws)] for i in range(REPEAT))])
    times = await replay_times(be, plans, a.rounds)
    print(f"Q4_1 mat-vec {a.rows}x{a.cols} ({nbytes / 1e6:.2f} MB, {len(ws)} copies in turn), shared activations "
          f"as f32 and as 8 bits, {be.adapter_info.get('device')}")
    for name, ts in times.items():
        print(f"  median {statistics.median(ts) * 1e6:8.1f} us   min {min(ts) * 1e6:8.1f} us   "
              f"{nbytes / min(ts) / 1e9:5.2f} GB/s   {name}")


async def time_matmul_shapes(be, k, w, x, consts, fixed, a):
    lanes = await subgroup_size(be, k)
    base = shared_matmul(lanes, gpu=not is_cpu(be))
    if base is None:
        raise SystemExit("the shared mat-mat needs subgroups of at least 4 lanes; this adapter's hold "
                         f"{lanes}")
    plans, compile_s = {}, {}
    for rows, t, wg in PREFILL_SHAPES if lanes >= 8 else PREFILL_SHAPES4:
        v = {**VARIANTS["matmul"], **base, "rows": rows, "t": t, "wg": wg, "xtex": k.activation_textures}
        t0 = time.perf_counter()
        pipe = be.create_pipeline(k.render("matmul", qtype="Q4_1", wtex=k.weight_textures,
                                           epilogue="glu" if a.glu else "store", act="silu", bias=False, **v),
                                  consts, "mat-mat")
        name = f"{rows} rows x {t} tokens, {wg} a workgroup"
        compile_s[name] = time.perf_counter() - t0
        groups = (-(-a.rows // (wg * rows)), -(-PREFILL_TOKENS // t), 1)
        binds = {**fixed, **weight_binds(k, w, 0, 6), 1: Binding(x)}
        if a.glu:       # gate and up: the same weight twice
            binds.update(weight_binds(k, w, 4, 7))
        plans[name] = be.create_plan([Dispatch(pipe, binds, groups, "mm")] * REPEAT)
    times = await replay_times(be, plans, a.rounds)
    rows = base["glu_rows"] if a.glu else base["rows"]
    print(f"Q4_1 mat-mat of {PREFILL_TOKENS} tokens {a.rows}x{a.cols}, the shared kernel in each shape, "
          f"{be.adapter_info.get('device')} (the tuner's: {rows} rows x {base['t']} tokens, {base['wg']} a workgroup)")
    for name, ts in sorted(times.items(), key=lambda t: min(t[1])):
        flop = 2 * a.rows * a.cols * PREFILL_TOKENS * (2 if a.glu else 1)
        print(f"  median {statistics.median(ts) * 1e6:8.1f} us   min {min(ts) * 1e6:8.1f} us   "
              f"{flop / min(ts) / 1e9:6.1f} GFLOP/s   compile {compile_s[name]:5.2f} s   {name}")


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", help="part of the adapter's name (swiftshader, llvmpipe; default: the one wgpu prefers)")
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--cols", type=int, default=576)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prefill", action="store_true", help="the prefill mat-mat instead (see above)")
    ap.add_argument("--glu", action="store_true",
                    help="with --prefill --variants: the gate-and-up mat-mat (the \"glu\" epilogue)")
    ap.add_argument("--variants", action="store_true",
                    help="every mat-vec variant the tuner may choose, whole (with --prefill: mat-mat shapes)")
    ap.add_argument("--int8", action="store_true",
                    help="the shared mat-vecs with 8-bit activations against f32 ones (see above)")
    ap.add_argument("--copies", type=int, default=1,
                    help="with --variants or --int8: read this many copies of the weight in turn (out of cache, as in decode)")
    a = ap.parse_args()
    be = open_backend("native", adapter=a.adapter) if a.adapter else open_backend("native")
    k = Kernels(be)
    nbytes = packed_nbytes("Q4_1", a.rows, a.cols)
    w = weight(be, k, nbytes)
    if a.variants and not a.prefill:
        return await time_variants(be, k, w, nbytes, a)
    if a.int8:
        return await time_int8(be, k, w, nbytes, a)
    plans = {}
    tokens = 1
    if a.prefill:
        variant = {**VARIANTS["matmul"], **MATMUL_XSHARE, "xtex": k.activation_textures}
        tokens = PREFILL_TOKENS
        code = k.render("matmul", qtype="Q4_1", wtex=k.weight_textures, epilogue="store", bias=False, **variant)
        # the activations where this adapter's prefill reads them: a texture on CPU adapters
        x = (be.create_texture(activation_texture_rows(tokens, a.cols), "activations") if k.activation_textures
             else be.create_buffer(tokens * a.cols * 4, "activations"))
        y = be.create_buffer(tokens * a.rows * 4, "out")
        step = be.create_buffer(256, "step")
        be.write_buffer(step, 0, struct.pack("<II", 0, tokens))
        groups = (-(-a.rows // (variant["wg"] * variant["rows"])), -(-tokens // variant["t"]), 1)
        parts, names = PREFILL_PARTS, {1: "x_t" if k.activation_textures else "X["}
        wslots = (0, 6)
        consts = {"N": a.rows, "K": a.cols, "ROW0": 0, "NOUT": a.rows}
        fixed = {2: Binding(y), 3: Binding(step)}
        if a.variants:
            return await time_matmul_shapes(be, k, w, x, consts, fixed, a)
    else:
        # the variant the tuner prefers where this adapter's subgroups allow it (shared activations)
        shared = [v for v in space(await subgroup_size(be, k)) if v.get("xshare")]
        variant = {**VARIANTS["matvec"], **(shared[0] if shared else {})}
        code = k.render("matvec", qtype="Q4_1", wtex=k.weight_textures, epilogue="store", bias=False,
                        x_uniform=not variant["xshare"], act="silu", **variant)
        x = be.create_buffer(UNIFORM_BYTES, "activations")
        y = be.create_buffer(a.rows * 4, "out")
        groups = (-(-a.rows // k.matvec_rows_per_workgroup(variant)), 1, 1)
        parts, names = PARTS, {1: "x["}
        wslots = (0, 4)
        consts = {"N": a.rows, "K": a.cols, "ROW0": 0}
        fixed = {2: Binding(y)}
    for name, edit in parts.items():
        src = edit(code) if edit else code
        if edit and src == code:
            raise SystemExit(f"'{name}': the kernel no longer has the code this edit takes out")
        pipe = be.create_pipeline(src, consts, name)
        body = reachable(src)
        binds = dict(fixed)
        for slot, use in names.items():     # a binding the edited kernel no longer reads is not bound
            if use in body:
                binds[slot] = Binding(x, 0, None if a.prefill else UNIFORM_BYTES)
        binds.update({s: b for s, b in weight_binds(k, w, *wslots).items()
                      if re.search(r"\bW(_tex)?\b" if s == wslots[0] else r"\bW_words\b", body)})
        plans[name] = be.create_plan([Dispatch(pipe, binds, groups, name)] * REPEAT)
    times = await replay_times(be, plans, a.rounds)
    what = f"mat-mat of {tokens} tokens" if a.prefill else "mat-vec"
    print(f"Q4_1 {what} {a.rows}x{a.cols} ({nbytes / 1e6:.2f} MB), variant {variant}, "
          f"{be.adapter_info.get('device')}")
    for name, ts in times.items():
        rate = (f"{2 * a.rows * a.cols * tokens / min(ts) / 1e9:6.1f} GFLOP/s" if a.prefill
                else f"{nbytes / min(ts) / 1e9:5.2f} GB/s")
        print(f"  {name:30s} median {statistics.median(ts) * 1e6:8.1f} us   min {min(ts) * 1e6:8.1f} us   {rate}")


if __name__ == "__main__":
    asyncio.run(main())
