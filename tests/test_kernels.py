"""Every kernel against numpy, for every quant type and for sizes that are no multiple of anything."""

from __future__ import annotations

import asyncio
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from pyengine import tuning
from pyengine.engine import KVCache, State
from pyengine.graph import GraphBuilder, Tensor, Weight
from pyengine.kernels import TOPK, UNIFORM_BYTES, Kernels, packed_nbytes
from pyengine.weights import upload_weight

from ggufs import K_BLOCKS, random_kquant

QTYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


def quantized(x: np.ndarray, qtype: str, rng=None):
    """(raw GGUF bytes, the values they stand for). K-quants: random blocks of x's shape."""
    q = Q[qtype]
    if qtype == "F32":
        data = x.astype(np.float32)
    elif qtype == "F16":
        data = x.astype(np.float16)
    elif qtype in K_BLOCKS:
        data = random_kquant(x.shape[0], x.shape[1], qtype, rng or np.random.default_rng(x.size))
    else:
        data = quantize(x.astype(np.float32), q)
    return data.tobytes(), dequantize(data, q).reshape(x.shape).astype(np.float64)


class Rig:
    """A State, a KV cache and helpers to run single ops through the GraphBuilder."""

    def __init__(self, backend, vocab=300, max_chunk=128, context=200, n_kv_heads=1, head_dim=32, kv_f16=False,
                 kv_textures=None):
        self.be = backend
        self.k = Kernels(backend)
        self.state = State(backend, vocab, max_chunk)
        # the cache where this adapter keeps it (textures on CPU adapters; PYENGINE_KV), or as asked
        self.state.kv = KVCache(backend, 1, context, n_kv_heads, head_dim, f16=kv_f16,
                                textures=self.k.kv_textures if kv_textures is None else kv_textures)
        self.rng = np.random.default_rng(0)

    def weight(self, x: np.ndarray, qtype: str, name="w"):
        raw, values = quantized(x, qtype)
        staging = self.be.create_buffer(len(raw) + 4, "staging")

        def write(buf, off, n):
            part = raw[off:off + n]
            self.be.write_buffer(buf, 0, part + bytes(-len(part) % 4))

        w = asyncio.run(upload_weight(self.be, self.k, name, qtype, x.shape[0], x.shape[1], write, staging))
        return w, values

    def vector(self, v: np.ndarray) -> Weight:
        buf = self.be.create_buffer(v.size * 4, "vec")
        self.be.write_buffer(buf, 0, v.astype(np.float32).tobytes())
        return Weight("vec", "F32", 1, v.size, buf, v.size * 4)

    def tensor(self, x: np.ndarray) -> Tensor:
        x = np.atleast_2d(x).astype(np.float32)
        buf = self.be.create_buffer(x.nbytes + UNIFORM_BYTES, "input")
        self.be.write_buffer(buf, 0, x.tobytes())
        return Tensor(buf, x.shape[0], x.shape[1])

    def step(self, pos0: int, n: int, tokens=None, count=False):
        tokens = list(tokens) if tokens is not None else [0] * n
        self.be.write_buffer(self.state.step, 0, struct.pack(f"<4I{len(tokens)}I", pos0, n, int(count), 0, *tokens))

    def run(self, fn, m_cap: int):
        g = GraphBuilder(self.k, self.state, m_cap)
        compiled = set(self.k._pipelines)
        out = fn(g)
        self.families = [d.family for d in g.dispatches]     # what the last run dispatched
        self.labels = [d.label for d in g.dispatches]
        # no kernel compiles that the plan does not run (one a fold replaced: _fold_rope, _fold_rope_tokens)
        unused = [key[:2] for key, pipe in self.k._pipelines.items()
                  if key not in compiled and all(d.pipeline is not pipe for d in g.dispatches)]
        assert not unused, unused
        self.be.submit(self.be.create_plan(g.dispatches))
        return out

    def read(self, buf, n: int, dtype=np.float32) -> np.ndarray:
        buf, offset = (buf.buffer, buf.offset) if isinstance(buf, Tensor) else (buf, 0)
        raw = self.be.queue.read_buffer(buf, offset, n * np.dtype(dtype).itemsize)
        return np.frombuffer(bytes(raw), dtype=dtype).astype(np.float64)


@pytest.fixture(scope="module")
def rig(backend):
    return Rig(backend)


def close(a, b, rtol=2e-5):
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, atol=rtol * scale * 10, rtol=rtol)


def shapes_for(qtype):
    if qtype in ("F32", "F16", "BF16"):
        return [(1, 32), (77, 64), (300, 96), (130, 160)]
    if qtype in K_BLOCKS:
        return [(1, 256), (77, 512), (300, 256), (130, 768)]
    return [(1, 32), (77, 96), (300, 160), (130, 64)]


@pytest.mark.parametrize("qtype", QTYPES)
def test_repack_and_matvec(rig, qtype):
    for n, k in shapes_for(qtype):
        w, wv = rig.weight(rig.rng.standard_normal((n, k)), qtype)
        x = rig.rng.standard_normal(k)
        out = rig.run(lambda g: g.linear(rig.tensor(x), w), 1)
        close(rig.read(out, n), wv @ x)


@pytest.mark.parametrize("qtype", QTYPES)
def test_matvec_accumulates_into_the_residual(rig, qtype):
    n, k = shapes_for(qtype)[2]
    w, wv = rig.weight(rig.rng.standard_normal((n, k)), qtype)
    x, h = rig.rng.standard_normal(k), rig.rng.standard_normal(n)
    res = rig.tensor(h)
    rig.run(lambda g: g.linear(rig.tensor(x), w, accumulate=res), 1)
    close(rig.read(res, n), h + wv @ x)


def gelu_tanh(a):
    return 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)))


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("m", [1, 2, 13])
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_gated_mlp(rig, qtype, m, act):
    n, k = shapes_for(qtype)[3]
    g_w, gv = rig.weight(rig.rng.standard_normal((n, k)), qtype)
    u_w, uv = rig.weight(rig.rng.standard_normal((n, k)), qtype)
    x = rig.rng.standard_normal((m, k))
    rig.step(0, m)
    out = rig.run(lambda g: g.gated_mlp(rig.tensor(x), g_w, u_w, act), m)
    a, b = x @ gv.T, x @ uv.T
    gate = a / (1 + np.exp(-a)) if act == "silu" else gelu_tanh(a)
    close(rig.read(out, m * n).reshape(m, n), gate * b, rtol=5e-5)



def test_products_of_one_input_that_cannot_all_share_a_dispatch(rig):
    """Several tokens, a weight of another type (Gemma's v in Q8_0 beside q and k in Q5_0) or a bias:
    the weights that can share a dispatch do, the others run one each, and every product is right."""
    k = 64
    (a, av), (c, cv) = (rig.weight(rig.rng.standard_normal((n, k)), "Q5_0") for n in (40, 24))
    b, bv = rig.weight(rig.rng.standard_normal((24, k)), "Q8_0")
    bias = rig.rng.standard_normal(24)
    x = rig.rng.standard_normal((3, k))
    rig.step(0, 3)
    for m, weights, values, biases, dispatches in [
            (1, [a, b, c], [av, bv, cv], None, 2), (3, [a, c], [av, cv], None, 2),
            (1, [a, c], [av, cv], [None, rig.vector(bias)], 2), (1, [b, a], [bv, av], None, 2)]:
        g = GraphBuilder(rig.k, rig.state, m)
        outs = g.linears(rig.tensor(x[:m]), weights, biases)
        assert len(g.dispatches) == dispatches
        rig.be.submit(rig.be.create_plan(g.dispatches))
        for i, (out, wv) in enumerate(zip(outs, values)):
            expect = x[:m] @ wv.T + (bias if biases and biases[i] is not None else 0)
            close(rig.read(out, expect.size).reshape(expect.shape), expect)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "F32"])
@pytest.mark.parametrize("m", [1, 13])
def test_linear_with_bias(rig, qtype, m):
    n, k = shapes_for(qtype)[1]
    w, wv = rig.weight(rig.rng.standard_normal((n, k)), qtype)
    b = rig.rng.standard_normal(n)
    x = rig.rng.standard_normal((m, k))
    rig.step(0, m)
    out = rig.run(lambda g: g.linear(rig.tensor(x), w, bias=rig.vector(b)), max(m, 2) if m > 1 else 1)
    close(rig.read(out, m * n).reshape(m, n), x @ wv.T + b)


def test_rmsnorm_per_head_and_into_the_residual(rig):
    m, heads, d = 5, 3, 40
    x, wt, res = rig.rng.standard_normal((m, heads * d)) * 2, rig.rng.standard_normal(d), rig.rng.standard_normal((m, heads * d))
    xh = x.reshape(m, heads, d)
    expect = (xh / np.sqrt((xh * xh).mean(-1, keepdims=True) + 1e-6) * wt).reshape(m, heads * d)
    rig.step(0, m)
    out = rig.run(lambda g: g.rms_norm(rig.tensor(x), rig.vector(wt), 1e-6, heads=heads), 8)
    close(rig.read(out, m * heads * d).reshape(m, -1), expect)
    r = rig.tensor(res)
    w2 = rig.rng.standard_normal(heads * d)
    rig.run(lambda g: g.rms_norm(rig.tensor(x), rig.vector(w2), 1e-6, into=r), 8)
    close(rig.read(r, m * heads * d).reshape(m, -1), res + x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w2)


# the mat-mats chosen by rule (GPUs, CPU adapters without subgroups, lavapipe, SwiftShader) and more shapes of
# the shared one
MATMULS = {"tiled": {"xshare": False}, "tiled-cpu": tuning.MATMUL_CPU_TILED, "xshare": tuning.MATMUL_XSHARE,
           "xshare-4-lanes": tuning.MATMUL_XSHARE4, "xshare-gpu": tuning.MATMUL_GPU,
           "xshare-2x3": {**tuning.MATMUL_XSHARE, "rows": 2, "glu_rows": 2, "t": 3, "wg": 32},
           # two fours of rows an invocation reading their scale words by fours; gate and up one four each
           "xshare-8x3": {**tuning.MATMUL_XSHARE, "rows": 8, "glu_rows": 4, "t": 3, "wg": 16},
           "xshare-1x8": {**tuning.MATMUL_XSHARE, "rows": 1, "glu_rows": 1, "t": 8, "wg": 64}}


def matvec_variants(rig):
    """Every mat-vec variant some adapter's tuner may choose, of those this one runs."""
    return tuning.every_variant(asyncio.run(tuning.subgroup_size(rig.be, rig.k)))


def runnable_matmuls(rig):
    """The mat-mats of MATMULS this adapter runs (the shared ones need subgroups of as many lanes as share)."""
    size = asyncio.run(tuning.subgroup_size(rig.be, rig.k))
    return [v for v in MATMULS.values() if size >= lanes_needed(v)]


def lanes_needed(variant) -> int:
    """The subgroup lanes a variant shares values over: `xl` lanes (for the shared mat-vecs 4 where not
    given, for the shared attention 8), none for the rest."""
    if variant.get("xshare"):
        return variant.get("xl", 4)
    return variant.get("xl", 8) if variant.get("share") else 0


def use_variant(rig, op, variant):
    """Runs `op` with `variant`; one that shares values over subgroup lanes only where subgroups hold as many."""
    size = asyncio.run(tuning.subgroup_size(rig.be, rig.k))
    if variant is None:                   # tuning.shared_matmul: no shared mat-mat for these subgroups
        pytest.skip(f"subgroups of {size} lanes: no {op} shares values over them")
    if size < lanes_needed(variant):      # SwiftShader: 4 lanes
        pytest.skip(f"subgroups of {size} lanes: the {op} that shares values over {lanes_needed(variant)} "
                    "is never chosen there")
    rig.k.tuning = {op: variant}


@pytest.mark.parametrize("variant", MATMULS)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("m,m_cap", [(2, 2), (13, 16), (40, 64), (7, 64)])
def test_matmul(rig, qtype, m, m_cap, variant):
    use_variant(rig, "matmul", MATMULS[variant])
    for n, k in shapes_for(qtype)[1:]:
        w, wv = rig.weight(rig.rng.standard_normal((n, k)), qtype)
        x = np.zeros((m_cap, k))
        x[:m] = rig.rng.standard_normal((m, k))
        rig.step(0, m)
        out = rig.run(lambda g: g.linear(rig.tensor(x), w), m_cap)
        close(rig.read(out, m * n).reshape(m, n), x[:m] @ wv.T)


@pytest.mark.parametrize("variant", MATMULS)
@pytest.mark.parametrize("qtype", QTYPES)
def test_gated_mlp_over_tokens_with_each_matmul(rig, qtype, variant):
    """Several tokens through each mat-mat an adapter may run; the shared one computes gate and up in
    one dispatch (rows of each an invocation) with the activation in its epilogue, no elementwise pass
    (after the copy of its input into a texture, on adapters that read activations from textures)."""
    use_variant(rig, "matmul", MATMULS[variant])
    n, k = shapes_for(qtype)[2]
    g_w, gv = rig.weight(rig.rng.standard_normal((n, k)), qtype)
    u_w, uv = rig.weight(rig.rng.standard_normal((n, k)), qtype)
    for m, m_cap, act in ((2, 2, "silu"), (13, 16, "gelu"), (37, 64, "silu")):
        x = np.zeros((m_cap, k))
        x[:m] = rig.rng.standard_normal((m, k))
        rig.step(0, m)
        seen = []
        out = rig.run(lambda g: (g.gated_mlp(rig.tensor(x), g_w, u_w, act), seen.extend(g.dispatches))[0], m_cap)
        a, b = x[:m] @ gv.T, x[:m] @ uv.T
        gate = a / (1 + np.exp(-a)) if act == "silu" else gelu_tanh(a)
        close(rig.read(out, m * n).reshape(m, n), gate * b, rtol=5e-5)
        if MATMULS[variant].get("xshare"):
            assert [d.family for d in seen] == ["to_texture"] * rig.k.activation_textures + ["matmul"]

@pytest.mark.parametrize("qtype", QTYPES)
def test_products_of_one_input_in_one_dispatch(rig, qtype):
    """q, k and v for one token: one mat-vec dispatch over two or three weights of different row counts,
    with every mat-vec variant the tuner may choose, each output a view at an aligned offset (after the
    copy of its input into a texture, where the shared ones read activations from textures)."""
    k = shapes_for(qtype)[1][1]
    rows = [300, 77, 130] if qtype not in K_BLOCKS else [130, 77, 33]
    ws = [rig.weight(rig.rng.standard_normal((n, k)), qtype, f"w{i}") for i, n in enumerate(rows)]
    x = rig.rng.standard_normal(k)
    rig.step(0, 1)
    try:
        for variant in matvec_variants(rig):
            rig.k.tuning = {"matvec": variant}
            for count in (2, 3):
                g = GraphBuilder(rig.k, rig.state, 1)
                outs = g.linears(rig.tensor(x), [w for w, _ in ws[:count]])
                copy = ["to_texture"] * (rig.k.activation_textures and variant.get("xshare", False))
                assert [d.family for d in g.dispatches] == copy + ["matvec"], variant
                rig.be.submit(rig.be.create_plan(g.dispatches))
                for out, (_, wv) in zip(outs, ws):
                    assert out.offset % 256 == 0 and out.cols == wv.shape[0]
                    close(rig.read(out, wv.shape[0]), wv @ x)
    finally:
        rig.k.tuning = {}


def check_normed_products(rig, qtype, m, m_cap, fused: bool):
    """g.normed(x) read by linears (two weights, one with a bias), linear and gated_mlp: each result
    against numpy, and the RMSNorm dispatches: none where the kernels fold the norm in, else one for
    each reader (linears computes it once for both weights)."""
    n, k = shapes_for(qtype)[2]
    (wa, va), (wb, vb) = (rig.weight(rig.rng.standard_normal((n, k)), qtype, f"w{i}") for i in range(2))
    nw, bias = rig.rng.standard_normal(k), rig.rng.standard_normal(n)
    x = np.zeros((m_cap, k))
    x[:m] = rig.rng.standard_normal((m, k)) * 3
    xn = x[:m] / np.sqrt((x[:m] ** 2).mean(-1, keepdims=True) + 1e-5) * nw
    rig.step(0, m)
    seen = []

    def build(g):
        xt, norm = rig.tensor(x), rig.vector(nw)
        p, q = g.linears(g.normed(xt, norm, 1e-5), [wa, wb], [None, rig.vector(bias)])
        r = g.linear(g.normed(xt, norm, 1e-5), wa)
        s = g.gated_mlp(g.normed(xt, norm, 1e-5), wa, wb)
        seen.extend(g.dispatches)
        return p, q, r, s

    p, q, r, s = rig.run(build, m_cap)
    a, b = xn @ va.T, xn @ vb.T
    for got, want in ((p, a), (q, b + bias), (r, a), (s, a / (1 + np.exp(-a)) * b)):
        close(rig.read(got, m * n).reshape(m, n), want, rtol=5e-5)
    assert len([d for d in seen if d.family == "rmsnorm"]) == (0 if fused else 3)


@pytest.mark.parametrize("variant", MATMULS)
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q6_K", "F16"])
def test_rmsnorm_read_by_the_next_mat_mats(rig, qtype, variant):
    use_variant(rig, "matmul", MATMULS[variant])
    for m, m_cap in ((13, 16), (37, 64)):
        check_normed_products(rig, qtype, m, m_cap, fused=bool(MATMULS[variant].get("xshare")))


@pytest.mark.parametrize("where", ["textures", "buffers", "textures too small"])
@pytest.mark.parametrize("m,m_cap", [(37, 64), (1, 1)])
def test_activations_read_from_textures_and_from_buffers_give_the_same_layer(rig, where, m, m_cap, monkeypatch):
    """A layer's mat-mats (prefill) or mat-vecs (decode) with each shared kernel this adapter runs, their
    activations copied into textures (to_texture) or read from storage, or in storage because no texture
    of the adapter's holds them: the same results. One copy serves readers of one input that follow one
    another (q and k of a normed residual); the residual is copied again once something has written it.
    A mat-vec or mat-mat writes its output to a texture too (ytex: the residual's adds, the gated product,
    for one token a product with a bias), which the next reads without a copy."""
    monkeypatch.setattr(rig.k, "activation_textures", where != "buffers")
    if where == "textures too small":
        monkeypatch.setattr(rig.be, "max_texture_rows", 1)
    k, n = 192, 96     # 64 tokens of 192 values: 3 texture rows
    (wa, va), (wb, vb) = (rig.weight(rig.rng.standard_normal((n, k)), "Q4_1", f"w{i}") for i in range(2))
    wo, vo = rig.weight(rig.rng.standard_normal((k, n)), "Q4_1", "wo")
    nw, bias = rig.rng.standard_normal(k), rig.rng.standard_normal(n)
    h = np.zeros((m_cap, k))
    h[:m] = rig.rng.standard_normal((m, k)) * 3

    def normed(x):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * nw

    want_h = h[:m].copy()
    p, q = normed(want_h) @ va.T, normed(want_h) @ vb.T
    want_h += p @ vo.T
    a, b = normed(want_h) @ va.T, normed(want_h) @ vb.T
    want_h += (a / (1 + np.exp(-a)) * b) @ vo.T
    r = want_h @ va.T + bias
    shared = [v for v in (runnable_matmuls(rig) if m > 1 else matvec_variants(rig)) if v.get("xshare")]
    if not shared:
        pytest.skip("no subgroups: the kernels that read activations from textures are never chosen here")
    try:
        for variant in shared:
            rig.k.tuning = {"matmul" if m > 1 else "matvec": variant}
            rig.step(0, m)

            def layer(g):
                ht, norm = rig.tensor(h), rig.vector(nw)
                gp, gq = g.linears(g.normed(ht, norm, 1e-5), [wa, wb])
                g.linear(gp, wo, accumulate=ht)
                gs = g.gated_mlp(g.normed(ht, norm, 1e-5), wa, wb)
                g.linear(gs, wo, accumulate=ht)
                return gp, gq, ht, g.linear(ht, wa, bias=rig.vector(bias))

            gp, gq, ht, gr = rig.run(layer, m_cap)
            close(rig.read(gp, m * n).reshape(m, n), p, rtol=5e-5)
            close(rig.read(gq, m * n).reshape(m, n), q, rtol=5e-5)
            close(rig.read(ht, m * k).reshape(m, k), want_h, rtol=1e-4)
            close(rig.read(gr, m * n).reshape(m, n), r, rtol=1e-4)
            # h for q and k, and p; h after each add and the gated product only where the mat-mat before
            # cannot write them to a texture too (rows not in fours). Decode: h and p (q and k are views
            # of one output), the rest written to textures by the mat-vec before
            copies = 2
            if m > 1:
                copies += 2 * (variant["rows"] % 4 != 0) + (variant["glu_rows"] % 4 != 0)
            assert rig.families.count("to_texture") == (copies if where == "textures" else 0), variant
    finally:
        rig.k.tuning = {}


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_1", "Q8_0", "Q6_K", "F16"])
def test_rmsnorm_read_by_the_next_mat_vecs(rig, qtype):
    """One token, with every mat-vec variant the tuner may choose here: the shared and the split ones fold
    the norm in."""
    try:
        for variant in matvec_variants(rig):
            rig.k.tuning = {"matvec": variant}
            check_normed_products(rig, qtype, 1, 1, fused=bool(variant.get("xshare") or variant.get("split")))
    finally:
        rig.k.tuning = {}


@pytest.mark.parametrize("variant", ["xshare", "xshare-4-lanes"])
def test_shared_matmul_is_one_dispatch_over_every_token(rig, variant):
    """The shared mat-mats read every token's activations from storage in one dispatch, whatever K
    (8192 columns: 32 KB a token) and however the tokens and rows fall against their tiles of T tokens
    and R rows an invocation."""
    use_variant(rig, "matmul", MATMULS[variant])
    t, r = MATMULS[variant]["t"], MATMULS[variant]["rows"]
    for k, m, m_cap, n in ((576, 53, 64, 40), (1536, t + 1, t + 8, r * 16 + 1), (8192, 9, 16, 3)):
        w, wv = rig.weight(rig.rng.standard_normal((n, k)), "Q4_0")
        x = np.zeros((m_cap, k))
        x[:m] = rig.rng.standard_normal((m, k))
        rig.step(0, m)
        seen = []
        out = rig.run(lambda g: (g.linear(rig.tensor(x), w), seen.extend(g.dispatches))[0], m_cap)
        assert len([d for d in seen if d.family == "matmul"]) == 1
        close(rig.read(out, m * n).reshape(m, n), x[:m] @ wv.T, rtol=1e-4)


def test_matmul_and_matvec_beyond_the_uniform_window(rig):
    """K = 19200: x no longer fits a 64 KiB uniform binding, so the storage variants run."""
    n, k, m = 5, 19200, 3
    w, wv = rig.weight(rig.rng.standard_normal((n, k)), "Q8_0")
    assert not rig.k.matvec_uniform(k) and rig.k.matmul_tile(k) == 0
    x = rig.rng.standard_normal((m, k))
    rig.step(0, m)
    out = rig.run(lambda g: g.linear(rig.tensor(x), w), m)
    close(rig.read(out, m * n).reshape(m, n), x @ wv.T, rtol=1e-4)
    out = rig.run(lambda g: g.linear(rig.tensor(x[:1]), w), 1)
    close(rig.read(out, n), wv @ x[0], rtol=1e-4)


@pytest.mark.parametrize("variant", MATMULS)
def test_matmul_accumulates_and_adds_a_bias(rig, variant):
    use_variant(rig, "matmul", MATMULS[variant])
    n, k, m = 77, 96, 13
    w, wv = rig.weight(rig.rng.standard_normal((n, k)), "Q4_1")
    x, h = rig.rng.standard_normal((m, k)), rig.rng.standard_normal((m, n))
    res = rig.tensor(h)
    rig.step(0, m)
    rig.run(lambda g: g.linear(rig.tensor(x), w, accumulate=res), m)
    close(rig.read(res, m * n).reshape(m, n), h + x @ wv.T)
    b = rig.rng.standard_normal(n)
    out = rig.run(lambda g: g.linear(rig.tensor(x), w, bias=rig.vector(b)), 16)
    close(rig.read(out, m * n).reshape(m, n), x @ wv.T + b)


@pytest.mark.parametrize("qtype", QTYPES)
def test_embedding_rows(rig, qtype):
    vocab, dim = 300, (256 if qtype in K_BLOCKS else 96)
    w, wv = rig.weight(rig.rng.standard_normal((vocab, dim)), qtype)
    tokens = [0, 299, 5, 5, 123]
    rig.step(0, len(tokens), tokens)
    out = rig.run(lambda g: g.embed(w), len(tokens))
    close(rig.read(out, len(tokens) * dim).reshape(len(tokens), dim), wv[tokens])


@pytest.mark.parametrize("dim", [96, 576, 7])
def test_rmsnorm(rig, dim):
    m = 13
    x, wt = rig.rng.standard_normal((m, dim)) * 3, rig.rng.standard_normal(dim)
    expect = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * wt
    rig.step(0, m)
    out = rig.run(lambda g: g.rms_norm(rig.tensor(x), rig.vector(wt), 1e-5), 16)
    close(rig.read(out, m * dim).reshape(m, dim), expect)
    last = rig.run(lambda g: g.rms_norm(rig.tensor(x), rig.vector(wt), 1e-5, last_row=True), 16)
    close(rig.read(last, dim), expect[-1])


def rope_np(x, pos, base, n_rot, mode, factors=None, attn_factor=1.0):
    """x [heads, head_dim] rotated at position pos."""
    x = x.copy()
    half = n_rot // 2
    theta = pos * base ** (-2.0 * np.arange(half) / n_rot)
    if factors is not None:
        theta = theta / factors
    c, s = np.cos(theta) * attn_factor, np.sin(theta) * attn_factor
    if mode == "norm":
        a, b = x[:, 0:n_rot:2].copy(), x[:, 1:n_rot:2].copy()
        x[:, 0:n_rot:2], x[:, 1:n_rot:2] = a * c - b * s, a * s + b * c
    else:
        a, b = x[:, :half].copy(), x[:, half:n_rot].copy()
        x[:, :half], x[:, half:n_rot] = a * c - b * s, a * s + b * c
    return x


def attention_np(q, keys, vals, group, window=0):
    """q [heads, d], keys/vals [L, kv_heads, d]; with a window, only the last `window` keys."""
    if window:
        keys, vals = keys[-window:], vals[-window:]
    out = np.zeros_like(q)
    for h in range(q.shape[0]):
        s = keys[:, h // group] @ q[h] / np.sqrt(q.shape[1])
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ vals[:, h // group]
    return out


# prefill attention: an invocation per (token, head) loading its keys, or keys shared by broadcasts
# (the shared ones take up to prefill_group query heads of one kv head a workgroup)
ATTENTIONS = {"plain": {"wg": 64, "share": False}, "cpu": tuning.ATTENTION_CPU, "share": tuning.ATTENTION_SHARE,
              "share-4-lanes": tuning.ATTENTION_SHARE4,
              "share-1-head": {**tuning.ATTENTION_SHARE, "prefill_group": 1},
              "cpu-2-heads": {**tuning.ATTENTION_CPU, "decode_group": 2}}


# "separate": RoPE's own dispatch, then attention; "folded": rope_attention, which folds RoPE and the cache
# write into decode attention where a workgroup holds every query head of its kv head (3 of them here, or 1)
HOW = {"separate": 2, "folded": 2, "folded-mha": 6, "folded-pairs": 3}      # kv heads of the 6 query heads


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("variant", ATTENTIONS)
@pytest.mark.parametrize("kv_f16", [False, True])
@pytest.mark.parametrize("mode,n_rot,window,factors,hd", [("norm", 32, 0, False, 32), ("neox", 32, 0, False, 32),
                                                           ("neox", 16, 0, False, 48), ("neox", 32, 24, True, 32),
                                                           ("norm", 32, 50, True, 48)])
def test_rope_kv_and_attention(backend, kv_f16, mode, n_rot, window, factors, hd, variant, how):
    if kv_f16 and "shader-f16" not in backend.features:
        pytest.skip("adapter without shader-f16: the f16 variant is never chosen there")
    nh, nkv, base = 6, HOW[how], 10000.0
    # folded in decode where the variant's workgroup takes every query head of a kv head
    folds = how != "separate" and ATTENTIONS[variant].get("decode_group", 1) >= nh // nkv
    rig = Rig(backend, n_kv_heads=nkv, head_dim=hd, kv_f16=kv_f16)
    use_variant(rig, "attention", ATTENTIONS[variant])
    lanes = asyncio.run(tuning.subgroup_size(backend, rig.k))
    # where the next mat-vec or mat-mat reads activations from a texture, attention writes its output to
    # one as well
    textured = rig.k.activation_textures and lanes >= 4
    if textured:
        rig.k.tuning["matvec"] = {"rows": 4, "wg": 32, "xshare": True, "xl": 8 if lanes >= 8 else 4}
        rig.k.tuning["matmul"] = tuning.shared_matmul(lanes)
    rng = np.random.default_rng(3)
    keys = np.zeros((0, nkv, hd))
    vals = np.zeros((0, nkv, hd))
    tol = 2e-3 if kv_f16 else 2e-5
    ff = rng.uniform(1.0, 8.0, n_rot // 2) if factors else None
    attn_factor = 1.2 if factors else 1.0
    # a prefill of 70 tokens (past one key chunk), another of 9, then decode steps far along
    for pos0, n, m_cap in [(0, 70, 128), (70, 9, 16), (79, 1, 1), (80, 1, 1)]:
        q, k, v = (rng.standard_normal((n, h * hd)) for h in (nh, nkv, nkv))
        rig.step(pos0, n)
        qt, kt, vt = rig.tensor(np.resize(q, (m_cap, nh * hd))), rig.tensor(np.resize(k, (m_cap, nkv * hd))), \
            rig.tensor(np.resize(v, (m_cap, nkv * hd)))

        def build(g):
            freqs = rig.vector(ff) if factors else None
            if how != "separate":
                return g.rope_attention(qt, kt, vt, 0, nh, nkv, hd, n_rot, base, mode, freq_factors=freqs,
                                        attn_factor=attn_factor, window=window)
            g.rope_kv(qt, kt, vt, 0, nh, nkv, hd, n_rot, base, mode, freq_factors=freqs, attn_factor=attn_factor)
            return g.attention(qt, 0, nh, nkv, hd, window=window)

        out = rig.run(build, m_cap)
        assert ("rope" not in rig.families) == (folds and n == 1 and not rig.state.kv.textures), rig.families
        got = rig.read(out, n * nh * hd).reshape(n, nh, hd)
        if textured:
            raw = asyncio.run(rig.be.read_texture(rig.state.activation_texture(nh * hd, 0), n * nh * hd * 4))
            np.testing.assert_array_equal(np.frombuffer(raw, np.float32), got.reshape(-1).astype(np.float32))
        for i in range(n):
            pos = pos0 + i
            kr = rope_np(k[i].reshape(nkv, hd), pos, base, n_rot, mode, ff, attn_factor)
            keys = np.concatenate([keys, kr[None]])
            vals = np.concatenate([vals, v[i].reshape(nkv, hd)[None]])
            qr = rope_np(q[i].reshape(nh, hd), pos, base, n_rot, mode, ff, attn_factor)
            close(got[i], attention_np(qr, keys, vals, nh // nkv, window), rtol=tol)
        cache_dtype = np.float16 if kv_f16 else np.float32
        count = (pos0 + n) * nkv * hd
        for which, want in (("k", keys), ("v", vals)):
            raw = asyncio.run(rig.state.kv.read(rig.be, which, 0, count * np.dtype(cache_dtype).itemsize))
            close(np.frombuffer(raw, cache_dtype).astype(np.float32).reshape(-1, nkv, hd), want, rtol=tol)


@pytest.mark.parametrize("kv_f16", [False, True])
@pytest.mark.parametrize("n_rot,factors", [(32, False), (20, True)])
@pytest.mark.parametrize("where", ["textures", "buffers", "buffers, a kv head's query heads a workgroup"])
def test_decode_rope_in_the_qkv_matvec(backend, kv_f16, n_rot, factors, where):
    """Decode steps through one mat-vec of q, k and v and rope_attention: RoPE and the cache write go into
    that mat-vec (matvec.wgsl.j2: rope), except where the attention takes them (a cache in buffers and
    one workgroup for the query heads of a kv head); the attention and the cache as RoPE on numpy's
    products would make them."""
    if kv_f16 and "shader-f16" not in backend.features:
        pytest.skip("adapter without shader-f16: the f16 variant is never chosen there")
    nh, nkv, hd, dim, base = 6, 2, 32, 96, 10000.0
    rig = Rig(backend, n_kv_heads=nkv, head_dim=hd, kv_f16=kv_f16, kv_textures=where == "textures")
    grouped = where.endswith("workgroup")
    if grouped:
        rig.k.tuning["attention"] = dict(tuning.ATTENTION_CPU)      # 4 a workgroup: the 3 of each kv head
    rng = np.random.default_rng(11)
    (wq, q_w), (wk, k_w), (wv, v_w) = (rig.weight(rng.standard_normal((h * hd, dim)), "Q4_1", n)
                                       for n, h in (("q", nh), ("k", nkv), ("v", nkv)))
    ff = rng.uniform(1.0, 8.0, n_rot // 2) if factors else None
    attn_factor = 1.2 if factors else 1.0
    tol = 2e-3 if kv_f16 else 2e-5
    keys, vals = np.zeros((0, nkv, hd)), np.zeros((0, nkv, hd))
    for pos in range(4):
        x = rng.standard_normal(dim)
        rig.step(pos, 1)
        xt = rig.tensor(x)

        def build(g):
            q, k, v = g.linears(xt, [wq, wk, wv])
            return g.rope_attention(q, k, v, 0, nh, nkv, hd, n_rot, base, "norm",
                                    freq_factors=rig.vector(ff) if factors else None, attn_factor=attn_factor)

        out = rig.run(build, 1)
        folded = sum(label.endswith(" rope") for label in rig.labels)
        # the folded mat-vec binds 10 storage buffers from a cache in buffers (W, W2, W3, their scale words,
        # y, the step, k and v caches), 11 with frequency factors: it folds only where the device allows
        # as many (SwiftShader: 10), else RoPE keeps its kernel
        folds = not grouped and (where == "textures" or rig.be.max_storage_buffers >= 10 + bool(factors))
        assert folded == int(folds), rig.labels
        assert ("rope" in rig.families) == (not folds and not grouped), rig.families
        kr = rope_np((k_w @ x).reshape(nkv, hd), pos, base, n_rot, "norm", ff, attn_factor)
        keys = np.concatenate([keys, kr[None]])
        vals = np.concatenate([vals, (v_w @ x).reshape(nkv, hd)[None]])
        qr = rope_np((q_w @ x).reshape(nh, hd), pos, base, n_rot, "norm", ff, attn_factor)
        close(rig.read(out, nh * hd).reshape(nh, hd), attention_np(qr, keys, vals, nh // nkv), rtol=tol)
    cache_dtype = np.float16 if kv_f16 else np.float32
    for which, want in (("k", keys), ("v", vals)):
        raw = asyncio.run(rig.state.kv.read(rig.be, which, 0, want.size * np.dtype(cache_dtype).itemsize))
        close(np.frombuffer(raw, cache_dtype).astype(np.float32).reshape(-1, nkv, hd), want, rtol=tol)


@pytest.mark.parametrize("kv_f16", [False, True])
@pytest.mark.parametrize("mode,n_rot,factors,bias", [("norm", 32, False, False), ("norm", 20, True, True),
                                                     ("neox", 32, False, False)])
def test_prefill_rope_in_the_qkv_matmuls(backend, kv_f16, mode, n_rot, factors, bias):
    """Prefill chunks through the shared mat-mats of q, k and v (with biases, as Qwen2's) and rope_attention:
    RoPE's "norm" pairs and the cache write go into those mat-mats' epilogues (matmul.wgsl.j2: rope), no
    RoPE dispatch; "neox" pairs keep it. The attention and the cache as RoPE on numpy's products make them."""
    if kv_f16 and "shader-f16" not in backend.features:
        pytest.skip("adapter without shader-f16: the f16 variant is never chosen there")
    nh, nkv, hd, dim, base = 6, 2, 32, 96, 10000.0
    rig = Rig(backend, n_kv_heads=nkv, head_dim=hd, kv_f16=kv_f16)
    lanes = asyncio.run(tuning.subgroup_size(backend, rig.k))
    use_variant(rig, "matmul", tuning.shared_matmul(lanes))
    rng = np.random.default_rng(12)
    (wq, q_w), (wk, k_w), (wv, v_w) = (rig.weight(rng.standard_normal((h * hd, dim)), "Q4_1", n)
                                       for n, h in (("q", nh), ("k", nkv), ("v", nkv)))
    bs = [rng.standard_normal(h * hd) if bias else np.zeros(h * hd) for h in (nh, nkv, nkv)]
    ff = rng.uniform(1.0, 8.0, n_rot // 2) if factors else None
    attn_factor = 1.2 if factors else 1.0
    tol = 2e-3 if kv_f16 else 5e-5
    keys, vals = np.zeros((0, nkv, hd)), np.zeros((0, nkv, hd))
    for pos0, n, m_cap in [(0, 13, 16), (13, 30, 32)]:
        x = np.zeros((m_cap, dim))
        x[:n] = rng.standard_normal((n, dim))
        rig.step(pos0, n)
        xt = rig.tensor(x)

        def build(g):
            q, k, v = g.linears(xt, [wq, wk, wv], [rig.vector(b) for b in bs] if bias else None)
            return g.rope_attention(q, k, v, 0, nh, nkv, hd, n_rot, base, mode,
                                    freq_factors=rig.vector(ff) if factors else None, attn_factor=attn_factor)

        out = rig.run(build, m_cap)
        folded = sum(label.endswith(" rope") for label in rig.labels)
        assert folded == (3 if mode == "norm" else 0), rig.labels
        assert ("rope" in rig.families) == (mode != "norm"), rig.families
        qs, ks, vs = (x[:n] @ w.T + b for w, b in zip((q_w, k_w, v_w), bs))
        got = rig.read(out, n * nh * hd).reshape(n, nh, hd)
        for i in range(n):
            keys = np.concatenate([keys, rope_np(ks[i].reshape(nkv, hd), pos0 + i, base, n_rot, mode, ff,
                                                 attn_factor)[None]])
            vals = np.concatenate([vals, vs[i].reshape(nkv, hd)[None]])
            qr = rope_np(qs[i].reshape(nh, hd), pos0 + i, base, n_rot, mode, ff, attn_factor)
            close(got[i], attention_np(qr, keys, vals, nh // nkv), rtol=tol)
    cache_dtype = np.float16 if kv_f16 else np.float32
    for which, want in (("k", keys), ("v", vals)):
        raw = asyncio.run(rig.state.kv.read(rig.be, which, 0, want.size * np.dtype(cache_dtype).itemsize))
        close(np.frombuffer(raw, cache_dtype).astype(np.float32).reshape(-1, nkv, hd), want, rtol=tol)


@pytest.mark.parametrize("kv_textures", [False, True])
def test_every_kernel_given_an_f16_cache_declares_f16(backend, monkeypatch, kv_textures):
    """The kernels that read or write the KV cache, as prefill and decode make them (RoPE folded into the
    q/k/v mat-mats and mat-vec, the RoPE kernel, attention), declare `enable f16` once the cache is f16,
    whatever built their parameters: WGSL refuses f16 types without it, so on adapters with shader-f16
    the f16 cache would fail to compile. Checked on the WGSL text, so adapters without f16 check it too."""
    nh, nkv, hd, dim = 6, 2, 32, 96
    rig = Rig(backend, n_kv_heads=nkv, head_dim=hd, kv_textures=kv_textures)
    seen = {}
    real = rig.k.pipeline

    def record(family, params, constants):
        if "kv_f16" in params:
            seen.setdefault((family, params.get("rope")), params)
        return real(family, params, constants)

    monkeypatch.setattr(rig.k, "pipeline", record)
    lanes = asyncio.run(tuning.subgroup_size(backend, rig.k))
    use_variant(rig, "matmul", tuning.shared_matmul(lanes))
    rng = np.random.default_rng(13)
    ws = [rig.weight(rng.standard_normal((h * hd, dim)), "Q4_1", n)[0] for n, h in (("q", nh), ("k", nkv), ("v", nkv))]
    for pos0, n, m_cap, mode in [(0, 13, 16, "norm"), (13, 1, 1, "norm"), (14, 13, 16, "neox")]:
        rig.step(pos0, n)
        xt = rig.tensor(rng.standard_normal((m_cap, dim)))
        rig.run(lambda g: g.rope_attention(*g.linears(xt, ws), 0, nh, nkv, hd, hd, 10000.0, mode), m_cap)
    kinds = set(seen)
    assert {("matmul", "q"), ("matmul", "k"), ("matmul", "v"), ("attention", None), ("rope", None)} <= kinds, kinds
    if rig.state.kv.textures:
        assert ("matvec", True) in kinds, kinds
    for (family, _), params in seen.items():
        code = rig.k.render(family, **{**params, "kv_f16": True})
        assert code.lstrip().startswith("enable f16;"), (family, params)


def topk_np(logits, counts, rep, presence, frequency, inv_t):
    l = logits.astype(np.float32).copy()
    hit = counts > 0
    if rep != 1.0:
        l[hit] = np.where(l[hit] > 0, l[hit] / np.float32(rep), l[hit] * np.float32(rep))
    l[hit] -= np.float32(presence) + np.float32(frequency) * counts[hit].astype(np.float32)
    l *= np.float32(inv_t)
    order = sorted(range(len(l)), key=lambda i: (-l[i], i))
    return l, order


@pytest.mark.parametrize("vocab", [300, 5000, 49152, 262144])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("want", [TOPK, 1])     # sampling's candidates, or greedy decoding's one
def test_logits_processing_and_top_k(backend, vocab, ties, want):
    rig = Rig(backend, vocab=vocab)
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal(vocab).astype(np.float32) * 4
    if ties:
        logits = np.round(logits).astype(np.float32)   # many equal values: ties go to the lower index
    counts = np.zeros(vocab, np.uint32)
    counts[rng.integers(0, vocab, 40)] = rng.integers(1, 4, 40)
    sp = (1.3, 0.4, 0.2, 1 / 0.7)
    rig.be.write_buffer(rig.state.logits, 0, logits.tobytes())
    rig.be.write_buffer(rig.state.counts, 0, counts.tobytes())
    rig.be.write_buffer(rig.state.sparams, 0, struct.pack("<5f", *sp, want))
    rig.run(lambda g: g.top_k(vocab), 1)     # logits() without the head's mat-vec, covered above
    res = rig.read(rig.state.result, 4 + 2 * TOPK, np.uint32).astype(np.uint32)
    mx, z, bound = np.frombuffer(res[:3].tobytes(), np.float32)
    vals = np.frombuffer(res[4::2].tobytes(), np.float32)
    idx = res[5::2]
    want_proc, _ = topk_np(logits, counts, *sp)
    # WGSL lets division and fused multiply-adds round differently (2.5 ulp for f32 division), so
    # the processed logits match numpy's closely; the candidates must then be exactly those of the
    # processed logits the kernel kept, which sampling reads
    proc = rig.read(rig.state.processed, vocab)
    np.testing.assert_allclose(proc, want_proc, rtol=1e-6)
    order = sorted(range(vocab), key=lambda i: (-proc[i], i))
    assert mx == proc.max()
    np.testing.assert_allclose(z, np.exp(proc.astype(np.float64) - proc.max()).sum(), rtol=1e-4)
    assert res[3] == want
    n = min(want, vocab)
    valid = idx[:n] < vocab
    np.testing.assert_array_equal(vals[:n][valid], proc[idx[:n][valid]])
    # the candidates above the bound are exactly the head of the sorted vocabulary ...
    exact = int(np.sum(vals[:n] > bound))
    assert exact >= 1
    assert list(idx[:exact]) == order[:exact]
    # ... and every token left out has a processed logit <= bound
    left_out = np.setdiff1d(np.arange(vocab), idx[:n])
    if len(left_out):
        assert proc[left_out].max() <= bound
    assert idx[0] == order[0]   # the argmax, the lower index among equals
    if vocab >= 5000 and not ties:
        assert exact == want   # with a real vocabulary the whole list is exact


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q6_K", "Q4_K", "F16"])
def test_a_weight_larger_than_one_binding_is_split_transparently(rig, qtype, monkeypatch):
    n, k = (301, 256)
    limit = packed_nbytes(qtype, n, k) // 3 - 100      # forces four parts of consecutive rows
    monkeypatch.setattr(rig.be, "max_storage_binding", limit)
    w, wv = rig.weight(rig.rng.standard_normal((n, k)), qtype)
    assert len(w.parts) == 4 and sum(r for _, r, _ in w.parts) == n
    assert all(packed_nbytes(qtype, r, k) <= limit for _, r, _ in w.parts)
    x = rig.rng.standard_normal((5, k))
    out = rig.run(lambda g: g.linear(rig.tensor(x[0]), w), 1)
    close(rig.read(out, n), wv @ x[0])
    rig.step(0, 5)
    for variant in runnable_matmuls(rig):
        rig.k.tuning = {"matmul": variant}
        out = rig.run(lambda g: g.linear(rig.tensor(x), w), 8)
        close(rig.read(out, 5 * n).reshape(5, n), x @ wv.T)
        out = rig.run(lambda g: g.gated_mlp(rig.tensor(x), w, w), 8)
        a = x @ wv.T
        close(rig.read(out, 5 * n).reshape(5, n), a / (1 + np.exp(-a)) * a, rtol=5e-5)
    rig.k.tuning = {}
    tokens = [r for row0, rows, _ in w.parts for r in (row0, row0 + rows - 1)] + [12]   # both ends of each part
    rig.step(0, len(tokens), tokens)
    out = rig.run(lambda g: g.embed(w), len(tokens))
    close(rig.read(out, len(tokens) * k).reshape(len(tokens), k), wv[tokens])


@pytest.mark.parametrize("variant", ATTENTIONS)
@pytest.mark.parametrize("hd,n", [(64, 1200), (256, 600)])
def test_attention_over_more_keys_than_a_cpu_adapter_loops_by_default(backend, hd, n, variant):
    """llvmpipe stops an invocation's loops after 65535 iterations in all: a query head walking n keys
    with a loop per dimension would be cut short here (past about 65535 / (2 * hd) keys)."""
    nh, nkv = 4, 1
    rig = Rig(backend, n_kv_heads=nkv, head_dim=hd, context=n + 1, max_chunk=n)
    use_variant(rig, "attention", ATTENTIONS[variant])
    rng = np.random.default_rng(hd)
    q, k, v = (rng.standard_normal((n, h * hd)) for h in (nh, nkv, nkv))
    rig.step(0, n)
    qt, kt, vt = rig.tensor(q), rig.tensor(k), rig.tensor(v)

    def build(g):
        g.rope_kv(qt, kt, vt, 0, nh, nkv, hd, hd, 1e6, "neox")
        return g.attention(qt, 0, nh, nkv, hd)

    got = rig.read(rig.run(build, n), n * nh * hd).reshape(n, nh, hd)
    keys = np.stack([rope_np(k[i].reshape(nkv, hd), i, 1e6, hd, "neox") for i in range(n)])
    vals = v.reshape(n, nkv, hd)
    for i in (0, n // 3, n - 2, n - 1):
        qr = rope_np(q[i].reshape(nh, hd), i, 1e6, hd, "neox")
        close(got[i], attention_np(qr, keys[:i + 1], vals[:i + 1], nh // nkv))
    # and one decode step after them, its keys split over a workgroup
    q1, k1, v1 = (rng.standard_normal(h * hd) for h in (nh, nkv, nkv))
    rig.step(n, 1)
    qt, kt, vt = rig.tensor(q1), rig.tensor(k1), rig.tensor(v1)
    got = rig.read(rig.run(build, 1), nh * hd).reshape(nh, hd)
    keys = np.concatenate([keys, rope_np(k1.reshape(nkv, hd), n, 1e6, hd, "neox")[None]])
    vals = np.concatenate([vals, v1.reshape(1, nkv, hd)])
    close(got, attention_np(rope_np(q1.reshape(nh, hd), n, 1e6, hd, "neox"), keys, vals, nh // nkv))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q6_K"])
def test_repack_through_a_staging_window_smaller_than_the_weight(rig, qtype, monkeypatch):
    import pyengine.weights as weights

    n, k = 301, 256
    monkeypatch.setattr(weights, "STAGING_BYTES", 5000)      # several runs of rows, the last one short (and odd)
    w, wv = rig.weight(rig.rng.standard_normal((n, k)), qtype)
    x = rig.rng.standard_normal(k)
    close(rig.read(rig.run(lambda g: g.linear(rig.tensor(x), w), 1), n), wv @ x)


@pytest.mark.parametrize("qtype", QTYPES)
def test_every_matvec_variant_the_tuner_may_choose(rig, qtype):
    n, k = shapes_for(qtype)[2]
    w, wv = rig.weight(rig.rng.standard_normal((n, k)), qtype)
    w2, wv2 = rig.weight(rig.rng.standard_normal((n, k)), qtype, "w2")
    x, h, bias = rig.rng.standard_normal(k), rig.rng.standard_normal(n), rig.rng.standard_normal(n)
    a, b = wv @ x, wv2 @ x
    try:
        for variant in matvec_variants(rig):
            rig.k.tuning = {"matvec": variant}
            close(rig.read(rig.run(lambda g: g.linear(rig.tensor(x), w), 1), n), a)
            close(rig.read(rig.run(lambda g: g.linear(rig.tensor(x), w, bias=rig.vector(bias)), 1), n), a + bias)
            res = rig.tensor(h)
            rig.run(lambda g: g.linear(rig.tensor(x), w, accumulate=res), 1)
            close(rig.read(res, n), h + a)
            out = rig.run(lambda g: g.gated_mlp(rig.tensor(x), w, w2, "silu"), 1)
            close(rig.read(out, n), a / (1 + np.exp(-a)) * b, rtol=5e-5)
    finally:
        rig.k.tuning = {}


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("where", ["textures", "buffers"])
def test_weights_in_textures_and_in_buffers_give_the_same_products(rig, qtype, where, monkeypatch):
    # whichever this adapter uses by default, the other placement too: GPUs read buffers, CPU adapters
    # textures, and each kernel family (mat-vec in every variant, fused and gated; mat-mat; embedding)
    # reads both
    monkeypatch.setattr(rig.k, "weight_textures", where == "textures")
    n, k = shapes_for(qtype)[2]
    w, wv = rig.weight(rig.rng.standard_normal((n, k)), qtype)
    w2, wv2 = rig.weight(rig.rng.standard_normal((n, k)), qtype, "w2")
    assert w.texture is (where == "textures") and w2.texture is w.texture
    vec = rig.vector(rig.rng.standard_normal(k))
    assert not vec.texture          # vectors stay in buffers
    x = rig.rng.standard_normal((5, k))
    a, b = x @ wv.T, x @ wv2.T
    try:
        for variant in matvec_variants(rig):
            rig.k.tuning = {"matvec": variant}
            close(rig.read(rig.run(lambda g: g.linear(rig.tensor(x[0]), w), 1), n), a[0])
            out = rig.run(lambda g: g.gated_mlp(rig.tensor(x[0]), w, w2, "silu"), 1)
            close(rig.read(out, n), a[0] / (1 + np.exp(-a[0])) * b[0], rtol=5e-5)
            q, kk = rig.run(lambda g: g.linears(rig.tensor(x[0]), [w, w2]), 1)
            close(rig.read(q, n), a[0])
            close(rig.read(kk, n), b[0])
        rig.step(0, 5)
        for variant in runnable_matmuls(rig):
            rig.k.tuning = {"matmul": variant}
            close(rig.read(rig.run(lambda g: g.linear(rig.tensor(x), w), 8), 5 * n).reshape(5, n), a)
    finally:
        rig.k.tuning = {}
    tokens = [0, n - 1, 7]
    rig.step(0, len(tokens), tokens)
    out = rig.run(lambda g: g.embed(w), len(tokens))
    close(rig.read(out, len(tokens) * k).reshape(len(tokens), k), wv[tokens])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q6_K", "Q4_K", "F16"])
def test_a_weight_larger_than_one_texture_is_split_transparently(rig, qtype, monkeypatch):
    from pyengine.kernels import TEXTURE_WIDTH, texture_rows

    monkeypatch.setattr(rig.k, "weight_textures", True)
    n, k = 601, 512
    rows = texture_rows(packed_nbytes(qtype, n, k)) // 3 + 1          # three or four parts' worth of texture
    monkeypatch.setattr(rig.be, "max_texture_rows", rows)
    w, wv = rig.weight(rig.rng.standard_normal((n, k)), qtype)
    assert w.texture and len(w.parts) >= 3 and sum(r for _, r, _ in w.parts) == n
    assert all(packed_nbytes(qtype, r, k) <= rows * TEXTURE_WIDTH * 16 for _, r, _ in w.parts)
    x = rig.rng.standard_normal((5, k))
    close(rig.read(rig.run(lambda g: g.linear(rig.tensor(x[0]), w), 1), n), wv @ x[0])
    rig.step(0, 5)
    close(rig.read(rig.run(lambda g: g.linear(rig.tensor(x), w), 8), 5 * n).reshape(5, n), x @ wv.T)
    tokens = [r for row0, r_n, _ in w.parts for r in (row0, row0 + r_n - 1)]
    rig.step(0, len(tokens), tokens)
    close(rig.read(rig.run(lambda g: g.embed(w), len(tokens)), len(tokens) * k).reshape(len(tokens), k), wv[tokens])
