"""Builds a dispatch plan from a model's forward description.

The model calls ops (embed, rms_norm, linear, ...) on a GraphBuilder; each op
picks its kernel, allocates its output and appends a dispatch. Scratch buffers
come from a pool and return to it when the model drops the Python object that
names them (dispatches run in order, so a buffer nobody can name any more is
free for the next op). The model code therefore holds no buffer bookkeeping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .gpu import Binding, Dispatch, split_workgroups
from .kernels import (BLOCK_VALUES, REPACKED_QTYPES, RESULT_WORDS, STORAGE_ALIGN, TOPK, TOPK_CHUNK, TOPK_MERGE,
                      UNIFORM_BYTES, activation_texture_rows)

F32 = 4


@dataclass(eq=False)
class Weight:
    """A weight on the GPU: a [rows, cols] matrix (packed quantized) or a vector of f32.
    A matrix larger than one storage binding lies in several buffers of consecutive rows: `parts`
    holds (first row, rows, buffer) for each, and every op runs once per part."""

    name: str
    qtype: str
    rows: int
    cols: int
    buffer: object
    nbytes: int
    parts: list | None = None
    texture: bool = False       # its parts are textures, not buffers (kernels.weight_textures)
    allocated: int = 0          # GPU bytes its parts take (textures: whole rows); nbytes where not given

    def __post_init__(self):
        if self.parts is None:
            self.parts = [(0, self.rows, self.buffer)]
        self.allocated = self.allocated or self.nbytes

    @property
    def buffers(self) -> list:
        return [b for _, _, b in self.parts]

    def parts_like(self, other: "Weight") -> bool:
        """Whether `other` is split into buffers at the same rows (a kernel can read both part by part)."""
        return [p[:2] for p in self.parts] == [p[:2] for p in other.parts]


class Tensor:
    """An activation of `cols` f32 values per token, for up to `rows` tokens, at `offset` bytes into
    its buffer: a view into a larger tensor (one of the outputs of a fused mat-vec) keeps that
    tensor, so the buffer returns to the pool only when no view names it any more."""

    __slots__ = ("buffer", "rows", "cols", "offset", "_pool", "_base")

    def __init__(self, buffer, rows, cols, pool=None, offset: int = 0, base: "Tensor | None" = None):
        self.buffer, self.rows, self.cols, self._pool = buffer, rows, cols, pool
        self.offset, self._base = offset, base

    def view(self, offset: int, cols: int) -> "Tensor":
        """`cols` values per token from `offset` bytes on (a multiple of the storage offset alignment)."""
        return Tensor(self.buffer, self.rows, cols, offset=self.offset + offset, base=self)

    def bind(self) -> Binding:
        """The binding of this tensor: a view's ends where its values do, so that views of one buffer
        bound to one dispatch do not overlap (WebGPU rejects overlapping bindings one of which writes)."""
        return Binding(self.buffer, self.offset, None if self._base is None else self.rows * self.cols * F32)

    def window(self, row: int = 0) -> Binding:
        """The uniform window kernels read this tensor through, from token `row` on (the tensor's
        allocation leaves room for a whole window past its last row)."""
        return Binding(self.buffer, self.offset + row * self.cols * F32, UNIFORM_BYTES)

    def __del__(self):
        if self._pool is not None:
            self._pool.release(self.buffer)


class ScratchPool:
    """Scratch buffers shared by all plans (plans run one after another)."""

    def __init__(self, backend):
        self.backend = backend
        self.buffers: list = []     # (size, buffer)
        self.free: set = set()

    def begin(self):
        self.free = {id(b) for _, b in self.buffers}

    def alloc(self, nbytes: int):
        best = None
        for size, buf in self.buffers:
            if id(buf) in self.free and size >= nbytes and (best is None or size < best[0]):
                best = (size, buf)
        if best is None:
            buf = self.backend.create_buffer(nbytes, f"scratch{len(self.buffers)}")
            self.buffers.append((nbytes, buf))
            return buf
        self.free.discard(id(best[1]))
        return best[1]

    def release(self, buf):
        self.free.add(id(buf))

    @property
    def nbytes(self) -> int:
        return sum(s for s, _ in self.buffers)


@dataclass(eq=False)
class Normed:
    """RMSNorm(x) * w, not yet computed: the mat-vecs and mat-mats that read it apply the norm as they
    load x where they share activations by subgroup broadcasts; elsewhere it is computed by its own
    dispatch first."""

    x: Tensor
    w: Weight
    eps: float

    @property
    def rows(self) -> int:
        return self.x.rows

    @property
    def cols(self) -> int:
        return self.x.cols


def result_index(vocab: int) -> int:
    """Which of the two top-k buffers (State.topk) holds a step's final record (State.result): the
    merge passes of GraphBuilder.logits alternate between them."""
    lists, index = -(-vocab // TOPK_CHUNK), 0
    while lists > 1:
        lists, index = -(-lists // TOPK_MERGE), 1 - index
    return index


class _Kernel(tuple):
    """A dispatch's kernel before it is compiled: (family, parameters, constants)."""

    def __new__(cls, family: str, params: dict, constants: dict):
        return super().__new__(cls, (family, dict(params), dict(constants)))     # as they are now


def _heads_together(per_kv: int, most: int) -> int:
    """Query heads of one kv head an attention workgroup takes: the most, up to `most`, that divide the
    `per_kv` heads a kv head serves (each key and value then loaded once for them all)."""
    return max(g for g in range(1, min(most, per_kv) + 1) if per_kv % g == 0)


class GraphBuilder:
    """Turns op calls into dispatches for a plan over up to `m_cap` tokens."""

    def __init__(self, kernels, state, m_cap: int):
        self.k = kernels
        self.s = state          # persistent buffers: step, kv cache, logits, counts, results
        self.m_cap = m_cap
        # the plan's dispatches so far; each holds its kernel as (family, parameters, constants) until
        # `dispatches` compiles it, so that one a fold replaces (_fold_rope, _fold_rope_tokens) never compiles
        self._ops: list[Dispatch] = []
        # the last fused mat-vec of several weights: (its dispatch, parameters, constants, bindings, its
        # outputs), for rope_attention to fold RoPE into (_fold_rope)
        self._fused: tuple | None = None
        # the last shared mat-mats of one weight among the last three dispatches, {id(output): (its
        # dispatch's index, output, parameters, constants, bindings)}, for rope_attention to fold RoPE
        # into (_fold_rope_tokens)
        self._made: dict = {}
        # activations whose texture is current, {id(tensor): (tensor, texture)}, for the dispatch added when
        # the plan held _copies_at dispatches (_x_texture)
        self._copies: dict = {}
        self._copies_at = -1
        self.s.pool.begin()

    @property
    def kernels(self) -> list[_Kernel]:
        """The kernels of the plan's dispatches not compiled yet, for Kernels.start_compile to compile together."""
        return [d.pipeline for d in self._ops if isinstance(d.pipeline, _Kernel)]

    @property
    def dispatches(self) -> list[Dispatch]:
        """The plan's dispatches, their kernels compiled."""
        for d in self._ops:
            if isinstance(d.pipeline, _Kernel):
                d.pipeline = self.k.pipeline(*d.pipeline)
        return self._ops

    # -- helpers ------------------------------------------------------------

    def _tensor(self, cols: int, rows: int | None = None) -> Tensor:
        rows = self.m_cap if rows is None else rows
        # the slack lets kernels read any row through a full uniform window
        return Tensor(self.s.pool.alloc(rows * cols * F32 + UNIFORM_BYTES), rows, cols, self.s.pool)

    def _dispatch(self, family, params, constants, bindings, workgroups, label=""):
        pipe = _Kernel(family, params, constants)
        binds = {i: (b if isinstance(b, Binding) else Binding(b)) for i, b in bindings.items()}
        if isinstance(workgroups, int):
            workgroups = split_workgroups(workgroups, self.k.backend.max_workgroups_per_dim)
        self._ops.append(Dispatch(pipe, binds, workgroups, label or family, family))

    def _step(self):
        return self.s.step

    @staticmethod
    def _words(binds: dict, w: Weight, index: int, buf) -> dict:
        """Repacked weights keep their scales as single words, read through a second, u32 view."""
        if w.qtype in REPACKED_QTYPES and not w.texture:     # a texture's kernels read its words from it
            binds[index] = buf
        return binds

    # -- ops ----------------------------------------------------------------

    def embed(self, w: Weight, scale: float = 1.0) -> Tensor:
        out = self._tensor(w.cols)
        units = self.m_cap * w.cols // 32
        for row0, rows, buf in w.parts:     # each part fills the rows of the tokens it holds
            self._dispatch("embed", {"qtype": w.qtype, "wtex": w.texture},
                           {"N": rows, "K": w.cols, "SCALE": scale, "ROW0": row0, "NTOTAL": w.rows},
                           self._words({0: buf, 1: out.bind(), 2: self._step()}, w, 3, buf),
                           -(-units // 64), f"embed {w.name}")
        return out

    def rms_norm(self, x: Tensor, w: Weight, eps: float, last_row: bool = False, heads: int = 1,
                 into: Tensor | None = None) -> Tensor:
        """RMSNorm of each row, or of each of its `heads` equal segments (q/k norms per head).
        last_row: only the step's last token, written to row 0. into: the result is added to that
        tensor (a post-norm straight into the residual) and it is returned."""
        d = x.cols // heads
        out = into if into is not None else self._tensor(x.cols, 1 if last_row else x.rows)
        params = self.k.variant("rmsnorm", last_row=last_row, epilogue="accumulate" if into is not None else "store")
        self._dispatch("rmsnorm", params, {"D": d, "EPS": eps, "HEADS": heads},
                       {0: x.bind(), 1: w.buffer, 2: out.bind(), 3: self._step()},
                       (1 if last_row else x.rows * heads, 1, 1), f"rmsnorm {w.name}")
        return out

    def normed(self, x: Tensor, w: Weight, eps: float) -> Normed:
        """RMSNorm(x) * w for the mat-vecs or mat-mats that read it next (linear, linears, gated_mlp):
        folded into them where they share activations by subgroup broadcasts, else computed by its
        own dispatch. x must not change before they have read it."""
        return Normed(x, w, eps)

    def _shares(self, x) -> bool:
        """Whether the mat-mats or mat-vecs reading `x` share its activations by subgroup broadcasts:
        those apply a Normed's norm themselves, and read activations from textures where the adapter
        fetches texels faster (_x_texture)."""
        return bool(self.k.variant("matmul" if x.rows > 1 else "matvec").get("xshare"))

    def _folds_norm(self, x) -> bool:
        """Whether the mat-mats or mat-vecs reading `x` apply a Normed's norm themselves (Kernels.folds_norm)."""
        return self.k.folds_norm(self.k.variant("matmul" if x.rows > 1 else "matvec"))

    def _norm_now(self, x):
        """A Normed whose readers cannot fold it in, computed; anything else as it is."""
        if isinstance(x, Normed) and not self._folds_norm(x):
            return self.rms_norm(x.x, x.w, x.eps)
        return x

    def _norm_binds(self, x, binds: dict, consts: dict, params: dict, slot: int = 9) -> Tensor:
        """The activations a shared mat-mat or mat-vec reads; a Normed's weight (at `slot`) and
        epsilon go with them."""
        if isinstance(x, Normed):
            binds[slot] = x.w.buffer
            consts["EPS"] = x.eps
            params["norm"] = True
            return x.x
        return x

    def linear(self, x: Tensor | Normed, w: Weight, bias: Weight | None = None,
               accumulate: Tensor | None = None) -> Tensor:
        """x W^T (+ bias) for every token; with `accumulate`, adds the product into that tensor (the residual)."""
        x = self._norm_now(x)
        out = accumulate if accumulate is not None else self._tensor(w.rows, x.rows)
        epilogue = "accumulate" if accumulate is not None else "store"
        if x.rows == 1:
            self._matvec(w, x, out.bind(), epilogue, bias=bias, written=out)
            return out
        k = w.cols
        params = self.k.variant("matmul", qtype=w.qtype, epilogue=epilogue, bias=bias is not None, wtex=w.texture)
        if params.get("xshare"):
            # the residual after its add in a texture too, for the mat-mat after (q, k, v or gate and up)
            self._shared_matmul(x, w, out, params, bias=bias, written=out if accumulate is not None else None)
            return out
        t = self.k.matmul_tile(k, params["tmax"])
        uniform = t > 0
        t = t or 8
        params.update(t=t, x_uniform=uniform)
        for row0, rows, buf in w.parts:
            groups = -(-rows // (params["wg"] * params["rows"]))
            for i in range(-(-x.rows // t)):
                xb = x.window(i * t) if uniform else x.bind()
                binds = self._words({0: buf, 1: xb, 2: out.bind(), 3: self._step(), 4: self.s.tile_index(t, i)},
                                    w, 6, buf)
                if bias is not None:
                    binds[5] = bias.buffer
                self._dispatch("matmul", params, {"N": rows, "K": k, "ROW0": row0, "NOUT": w.rows}, binds,
                               groups, f"matmul {w.name}")
        return out

    def linears(self, x: Tensor, ws: list[Weight], biases: list | None = None) -> list[Tensor]:
        """[x W^T (+ bias) for W in ws], the products of weights of one input (q, k and v). For one token,
        weights that can share a kernel (same type and columns, one buffer each, no bias) run in one
        dispatch, their outputs views into one buffer; the others (a v of another type) one each."""
        biases = biases or [None] * len(ws)
        x = self._norm_now(x)         # computed once for all of them where they cannot fold it in
        out: list = [None] * len(ws)
        groups: dict = {}
        for i, (w, b) in enumerate(zip(ws, biases)):
            if x.rows == 1 and b is None and len(w.parts) == 1:
                groups.setdefault((w.qtype, w.cols, w.texture), []).append(i)
            else:
                out[i] = self.linear(x, w, b)
        for idx in groups.values():
            for c in range(0, len(idx), 3):         # the kernel takes up to three weights
                chunk = idx[c:c + 3]
                for i, t in zip(chunk, self._fused_matvec(x, [ws[i] for i in chunk])):
                    out[i] = t
        return out

    def _fused_matvec(self, x: Tensor, ws: list[Weight]) -> list[Tensor]:
        if len(ws) == 1:
            return [self.linear(x, ws[0])]
        w0 = ws[0]
        offsets, end = [], 0
        for w in ws:            # each output at an offset every binding may start at
            offsets.append(end)
            end += -(-w.rows * F32 // STORAGE_ALIGN) * STORAGE_ALIGN
        out = Tensor(self.s.pool.alloc(end + UNIFORM_BYTES), 1, end // F32, self.s.pool)
        params, xb, per_group = self._matvec_variant(w0, x, epilogue="store", bias=False, act="silu", multi=len(ws))
        groups = [-(-w.rows // per_group) for w in ws]
        binds = self._words({0: w0.buffer, 1: xb, 2: out.bind()}, w0, 4, w0.buffer)
        consts = {"N": w0.rows, "K": w0.cols}
        self._norm_binds(x, binds, consts, params, slot=8)
        for i, (w, slot, words) in enumerate(zip(ws[1:], (3, 6), (5, 7)), start=2):
            binds[slot] = w.buffer
            self._words(binds, w, words, w.buffer)
            consts.update({f"N{i}": w.rows, f"G{i}": sum(groups[:i - 1]), f"OFF{i}": offsets[i - 1] // F32})
        self._dispatch("matvec", params, consts, binds, sum(groups), "store " + " ".join(w.name for w in ws))
        self._read_copy(x, out, params)
        outs = [out.view(o, w.rows) for o, w in zip(offsets, ws)]
        self._fused = (self._ops[-1], params, consts, binds, outs)
        return outs

    def _matvec_variant(self, w: Weight, x: Tensor, **extra):
        """The mat-vec's parameters for weight `w`, the binding of its input and its rows per workgroup."""
        params = self.k.variant("matvec", qtype=w.qtype, x_uniform=self.k.matvec_uniform(w.cols), wtex=w.texture,
                                **extra)
        if params.get("split"):     # its invocations read other activations: from storage
            params["x_uniform"] = False
        uniform = params["x_uniform"] and not params["xshare"]
        per_group = self.k.matvec_rows_per_workgroup(params)
        x = x.x if isinstance(x, Normed) else x       # its norm's binding: _norm_binds
        tex = self._x_texture(x) if params["xshare"] else None
        if tex is not None:
            params["xtex"] = True
            return params, tex, per_group
        return params, x.window() if uniform else x.bind(), per_group

    def _matvec(self, w: Weight, x: Tensor, out, epilogue: str, w2: Weight | None = None,
                bias: Weight | None = None, act: str = "silu", written: Tensor | None = None):
        """`written`: the tensor `out` binds, whose texture the mat-vec may write too (_y_texture)."""
        params, xb, per_group = self._matvec_variant(w, x, epilogue=epilogue, bias=bias is not None, act=act)
        ytex = self._y_texture(w, written, params, xb if params.get("xtex") else None)
        if ytex is not None:
            params["ytex"] = True
        for p, (row0, rows, buf) in enumerate(w.parts):
            binds = self._words({0: buf, 1: xb, 2: out}, w, 4, buf)
            if ytex is not None:
                binds[13] = ytex[1]
            consts = {"N": rows, "K": w.cols, "ROW0": row0}
            self._norm_binds(x, binds, consts, params, slot=8)
            if w2 is not None:
                binds[3] = w2.parts[p][2]
                self._words(binds, w2, 5, w2.parts[p][2])
            elif bias is not None:
                binds[3] = bias.buffer
            self._dispatch("matvec", params, consts, binds, -(-rows // per_group), f"{epilogue} {w.name}")
        self._read_copy(x, out, params, ytex)

    def _shared_matmul(self, x, w: Weight, out: Tensor, params: dict, bias: Weight | None = None,
                       w2: Weight | None = None, written: Tensor | None = None) -> None:
        """The mat-mat that shares activations by subgroup broadcasts: one dispatch a part of the weight
        over every token (with w2, the "glu" epilogue's second weight, split at the same rows).
        `written`: out, whose texture the mat-mat may write too (_y_texture)."""
        norm_binds, norm_consts = {}, {}
        xt = self._norm_binds(x, norm_binds, norm_consts, params)
        tex = self._x_texture(xt)
        if tex is not None:
            params["xtex"] = True
        ytex = self._y_texture(w, written, params, tex)
        if ytex is not None:
            params["ytex"] = True
        for p, (row0, rows, buf) in enumerate(w.parts):
            binds, consts = dict(norm_binds), {**norm_consts, "N": rows, "K": w.cols, "ROW0": row0, "NOUT": w.rows}
            binds.update({0: buf, 1: tex if tex is not None else xt.bind(), 2: out.bind(), 3: self._step()})
            if ytex is not None:
                binds[13] = ytex[1]
            self._words(binds, w, 6, buf)
            if w2 is not None:
                binds[4] = w2.parts[p][2]
                self._words(binds, w2, 7, binds[4])
            if bias is not None:
                binds[5] = bias.buffer
            groups = (-(-rows // (params["wg"] * params["rows"])), -(-x.rows // params["t"]), 1)
            name = f"glu {w.name} {w2.name}" if w2 is not None else f"matmul {w.name}"
            self._dispatch("matmul", params, consts, binds, groups, name)
        if w2 is None and len(w.parts) == 1 and out.cols == w.rows and not out.offset:
            # only the last three can fold RoPE in; holding older outputs would keep the pool from reusing them
            end = len(self._ops)
            self._made = {i: m for i, m in self._made.items() if m[0] >= end - 3}
            self._made[id(out)] = (end - 1, out, params, consts, binds)
        self._read_copy(xt, out, params, ytex)

    def _read_copy(self, x, out, params: dict, written: tuple | None = None) -> None:
        """After the dispatches of a mat-mat or mat-vec that read x's texture (params xtex) into `out`:
        the next one of the same activations reads that texture too, if nothing runs in between; so
        does the next one of `written` ((tensor, texture): the output the last dispatch also wrote
        to a texture, params ytex)."""
        x = x.x if isinstance(x, Normed) else x
        out = out.buffer if isinstance(out, (Tensor, Binding)) else out
        copies = {}
        if params.get("xtex") and out is not x.buffer:
            copies[id(x)] = (x, self._copies[id(x)][1])
        if written is not None:
            copies[id(written[0])] = written
        self._copies, self._copies_at = copies, len(self._ops)

    def _x_texture(self, x: Tensor):
        """The state's activation texture of x's width holding x's tokens, for the shared mat-mats that
        read their activations from a texture (shaders/matmul.wgsl.j2: xtex) on adapters that fetch
        texels faster than they load storage (kernels.Kernels.activation_textures); None where x stays
        in its buffer. The copy is a dispatch (shaders/to_texture.wgsl.j2), made once for mat-mats of
        the same activations one after another (q, k and v)."""
        if not self._textured(x.cols):
            return None
        if self._copies_at == len(self._ops) and id(x) in self._copies:
            return self._copies[id(x)][1]
        tex = self.s.activation_texture(x.cols, 0)
        self._dispatch("to_texture", {}, {"D4": x.cols // 4}, {0: x.bind(), 1: tex, 2: self._step()},
                       -(-self.m_cap * x.cols // 256), f"to texture {x.cols}")
        self._copies, self._copies_at = {id(x): (x, tex)}, len(self._ops)
        return tex

    def _y_texture(self, w: Weight, out: Tensor | None, params: dict, read) -> tuple | None:
        """(out, the texture a mat-vec or mat-mat of `w` also writes its output to: params ytex), where
        the next one can read that texture instead of a copy (shaders/matvec.wgsl.j2 and matmul.wgsl.j2:
        ytex); None where not: one that reads no texture (`read`: the one it reads) or reads the one it
        would write, no tensor of the whole output given, a weight in parts or of rows not in fours."""
        if (out is None or read is None or not params.get("xshare") or len(w.parts) != 1 or w.rows % 4
                or params["rows"] % 4 or out.cols != w.rows or out.offset or out._base is not None
                or not self._textured(out.cols)):
            return None
        tex = self.s.activation_texture(out.cols, 1)
        return None if tex is read else (out, tex)

    def gated_mlp(self, x: Tensor, gate: Weight, up: Weight, act: str = "silu") -> Tensor:
        """act(x gate^T) * (x up^T): SwiGLU with act "silu", GeGLU with "gelu"."""
        x = self._norm_now(x)
        if x.rows == 1 and gate.qtype == up.qtype and gate.parts_like(up) and gate.texture == up.texture:
            out = self._tensor(gate.rows, 1)
            self._matvec(gate, x, out.bind(), "glu", w2=up, act=act, written=out)
            return out
        params = self.k.variant("matmul", qtype=gate.qtype, epilogue="glu", bias=False, act=act, wtex=gate.texture)
        if params.get("xshare") and gate.qtype == up.qtype and gate.parts_like(up) and gate.texture == up.texture:
            # gate and up in one pass over the activations, glu_rows rows of each an invocation (glu_rows_k
            # for the 256-value K-quants, whose unrolled dequantization is the larger)
            kquant = BLOCK_VALUES.get(gate.qtype) == 256
            params["rows"] = ((kquant and params.get("glu_rows_k")) or params.get("glu_rows")
                              or max(1, params["rows"] // 2))
            out = self._tensor(gate.rows, x.rows)
            self._shared_matmul(x, gate, out, params, w2=up, written=out)
            return out
        g = self.linear(x, gate)
        u = self.linear(x, up)
        self._dispatch("elementwise", {"op": "glu", "act": act}, {"D": g.cols},
                       {0: g.bind(), 1: u.bind(), 2: self._step()}, -(-g.rows * g.cols // 64), f"{act} glu")
        return g

    def rope_kv(self, q: Tensor, k: Tensor, v: Tensor, layer: int, n_heads: int, n_kv_heads: int,
                head_dim: int, n_rot: int, base: float, mode: str = "norm", freq_factors: Weight | None = None,
                attn_factor: float = 1.0, pos_scale: float = 1.0) -> None:
        """Rotates q in place and writes rotated k and v into the layer's cache at the step's positions."""
        cache = self.s.kv
        work = q.rows * (n_heads * head_dim // 2 + 2 * n_kv_heads * head_dim // 4)   # q's pairs, k's and v's vec4s
        binds = {0: q.bind(), 1: k.bind(), 2: v.bind(), 3: cache.k[layer], 4: cache.v[layer], 5: self._step()}
        if freq_factors is not None:
            binds[6] = freq_factors.buffer
        params, consts = self._rope(n_rot, base, mode, freq_factors, attn_factor, pos_scale)
        self._dispatch("rope", {**params, "kv_f16": cache.f16, "f16": cache.f16, "kvtex": cache.textures},
                       {**consts, "NH": n_heads, "NKV": n_kv_heads, "HD": head_dim}, binds, -(-work // 64),
                       f"rope_kv {layer}")

    @staticmethod
    def _rope(n_rot, base, mode, freq_factors, attn_factor, pos_scale) -> tuple[dict, dict]:
        """RoPE's template parameters and constants (shaders/_rope.wgsl.j2), for its own kernel or decode
        attention's."""
        return ({"rope_mode": mode, "freq_factors": freq_factors is not None},
                {"N_ROT": n_rot, "BASE": base, "ATTN_FACTOR": attn_factor, "POS_SCALE": pos_scale})

    def rope_attention(self, q: Tensor, k: Tensor, v: Tensor, layer: int, n_heads: int, n_kv_heads: int,
                       head_dim: int, n_rot: int, base: float, mode: str = "norm",
                       freq_factors: Weight | None = None, attn_factor: float = 1.0, pos_scale: float = 1.0,
                       scale: float | None = None, window: int = 0) -> Tensor:
        """RoPE on q and k, k and v into the layer's cache, then attention (see rope_kv and attention).
        For one token, where a workgroup of the decode attention holds every query head of its kv head,
        the attention does the RoPE and the cache write itself: a dispatch a layer fewer (not where the
        cache lies in textures, which a dispatch cannot both write and read)."""
        rope = {"k": k, "v": v, "n_rot": n_rot, "base": base, "mode": mode, "freq_factors": freq_factors,
                "attn_factor": attn_factor, "pos_scale": pos_scale}
        return self.attention(q, layer, n_heads, n_kv_heads, head_dim, scale, window, rope=rope)

    def attention(self, q: Tensor, layer: int, n_heads: int, n_kv_heads: int, head_dim: int,
                  scale: float | None = None, window: int = 0, rope: dict | None = None) -> Tensor:
        """Causal attention over the layer's cache; with `window`, each query sees its last `window` keys.
        With `rope` (rope_attention's), q and the step's k and v are rotated and cached first."""
        cache = self.s.kv
        out = self._tensor(q.cols, q.rows)
        params = self.k.variant("attention", hd=head_dim, kv_f16=cache.f16, kvtex=cache.textures)
        split, group = params.pop("decode_split"), params.pop("decode_group")
        prefill_group = params.pop("prefill_group")
        per_kv = n_heads // n_kv_heads
        if q.rows == 1:      # decode: each head's keys split over a workgroup
            split = min(split, 2048 // head_dim)
            # query heads of one kv head a workgroup, each key and value loaded once for them all: as
            # many as asked that divide the heads a kv head serves, within 8 KB of partial outputs
            group = _heads_together(per_kv, max(1, min(group, 2048 // (head_dim * split))))
            params.update(split=split, group=group, share=False)
            groups = n_heads // group
        else:
            # shared (prefill): query heads of one kv head a workgroup, each key and value fetched and
            # broadcast once for them all, as many as asked that divide the heads a kv head serves
            params.update(split=0, group=_heads_together(per_kv, prefill_group) if params.get("share") else 1)
            groups = -(-q.rows * n_heads // params["wg"])
        consts = {"NH": n_heads, "NKV": n_kv_heads, "WINDOW": window,
                  "SCALE": scale if scale is not None else 1.0 / math.sqrt(head_dim)}
        binds = {0: q.bind(), 1: cache.k[layer], 2: cache.v[layer], 3: out.bind(), 4: self._step()}
        # decode: RoPE and the cache write in the attention where one workgroup takes a kv head's query
        # heads and the cache is a buffer it may write and read, else in the mat-vec of q, k and v
        attention_ropes = q.rows == 1 and params["group"] == per_kv and not cache.textures
        if (rope is not None and q.rows == 1 and not attention_ropes
                and self._fold_rope(q, layer, n_kv_heads, head_dim, rope)):
            rope = None
        if rope is not None and q.rows > 1 and self._fold_rope_tokens(q, layer, n_kv_heads, head_dim, rope):
            rope = None
        if rope is not None:
            # each kv head's k and v written by one workgroup, into a cache it may also read (buffers)
            if attention_ropes:
                rp, rc = self._rope(**{n: a for n, a in rope.items() if n not in ("k", "v")})
                params.update(rope=True, **rp)
                consts.update(rc)
                binds.update({5: rope["k"].bind(), 6: rope["v"].bind()})
                if rope["freq_factors"] is not None:
                    binds[7] = rope["freq_factors"].buffer
            else:
                self.rope_kv(q, layer=layer, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, **rope)
        if params.get("share") and q.rows > 1:        # a workgroup per (group of heads, block of tokens)
            groups = n_heads // params["group"] * -(-q.rows // params["wg"])
        # the output in a texture too, for the mat-vec or mat-mat after (_x_texture) where it reads one
        tex = self._out_texture(out)
        if tex is not None:
            params["otex"] = True
            binds[8] = tex
        self._dispatch("attention", params, consts, binds, groups, f"attention {layer}")
        if tex is not None:
            self._copies, self._copies_at = {id(out): (out, tex)}, len(self._ops)
        return out

    def _out_texture(self, out: Tensor):
        """The texture a kernel writes `out` to as well, for a next mat-vec or mat-mat that reads its
        activations from one (shaders/matvec.wgsl.j2 and matmul.wgsl.j2: xtex; the first of out's
        width, which that one does not write); None where they read them from storage."""
        if not self._shares(out) or not self._textured(out.cols):
            return None
        return self.s.activation_texture(out.cols, 0)

    def _textured(self, cols: int) -> bool:
        """Whether activations of `cols` values a token go into textures (State.activation_texture):
        on adapters that read them from there (kernels.Kernels.activation_textures), in whole texels,
        where a texture of the adapter's holds the largest chunk of them."""
        return (self.k.activation_textures and cols % 4 == 0
                and activation_texture_rows(self.s.max_chunk, cols) <= self.k.backend.max_texture_rows)

    def _fold_rope(self, q: Tensor, layer: int, n_kv_heads: int, head_dim: int, rope: dict) -> bool:
        """For one token whose q, k and v the last dispatch made (a fused mat-vec of the three), RoPE
        ("norm" pairs) and the cache write in that mat-vec's epilogue (shaders/matvec.wgsl.j2: rope),
        where the decode attention cannot take them (a cache in textures, or query heads of one kv head
        over several workgroups, as on GPUs): a dispatch a layer fewer. Whether it did."""
        if self._fused is None or self._fused[0] is not self._ops[-1]:
            return False
        made, params, consts, binds, outs = self._fused
        if (outs != [q, rope["k"], rope["v"]] or rope["mode"] != "norm" or params["rows"] % 4
                or head_dim % 4 or rope["n_rot"] % 2):
            return False
        cache = self.s.kv
        rp, rc = self._rope(**{n: a for n, a in rope.items() if n not in ("k", "v")})
        folded = {**params, "rope": True, "freq_factors": rp["freq_factors"], "kv_f16": cache.f16,
                  "kvtex": cache.textures}
        if not self.k.fits("matvec", folded):      # a cache in buffers binds two more
            return False
        binds = {**binds, 9: self._step(), 10: cache.k[layer], 11: cache.v[layer]}
        if rope["freq_factors"] is not None:
            binds[12] = rope["freq_factors"].buffer
        self._ops.pop()
        self._dispatch("matvec", folded, {**consts, **rc, "HD": head_dim, "NKV": n_kv_heads}, binds,
                       made.workgroups, made.label + " rope")
        self._fused = None
        return True

    def _fold_rope_tokens(self, q: Tensor, layer: int, n_kv_heads: int, head_dim: int, rope: dict) -> bool:
        """For the step's tokens, where the last three dispatches are the shared mat-mats that made q, k
        and v: RoPE ("norm" pairs) and the cache write in their epilogues (shaders/matmul.wgsl.j2: rope),
        instead of the RoPE kernel's dispatch and its pass over them. Whether it did."""
        made = [self._made.get(id(t)) for t in (q, rope["k"], rope["v"])]
        end = len(self._ops)
        if (None in made or sorted(m[0] for m in made) != [end - 3, end - 2, end - 1]
                or any(m[1] is not t for m, t in zip(made, (q, rope["k"], rope["v"])))
                or rope["mode"] != "norm" or head_dim % 4 or rope["n_rot"] % 2
                or any(m[2]["rows"] % 4 or m[2].get("ytex") for m in made)):
            return False
        cache = self.s.kv
        rp, rc = self._rope(**{n: a for n, a in rope.items() if n not in ("k", "v")})
        folded = [{**m[2], "rope": which, "freq_factors": rp["freq_factors"] and which != "v",
                   "kv_f16": cache.f16, "kvtex": cache.textures} for which, m in zip("qkv", made)]
        if not all(self.k.fits("matmul", p) for p in folded):
            return False
        for which, (index, out, params, consts, binds), fparams in zip("qkv", made, folded):
            binds = dict(binds)
            if which != "q":        # into the cache, not into Y
                del binds[2]
                binds[10 if which == "k" else 11] = (cache.k if which == "k" else cache.v)[layer]
            if fparams["freq_factors"]:        # v is not rotated
                binds[12] = rope["freq_factors"].buffer
            old = self._ops[index]
            self._dispatch("matmul", fparams, {**consts, **rc, "HD": head_dim, "NKV": n_kv_heads}, binds,
                           old.workgroups, old.label + " rope")
            self._ops[index] = self._ops.pop()
        return True

    def logits(self, x: Tensor, head: Weight) -> None:
        """The output head into the logits buffer, then penalties, temperature and top-k on the GPU."""
        self._matvec(head, x, self.s.logits, "store")
        self.top_k(head.rows)

    def top_k(self, vocab: int) -> None:
        """Penalties, temperature and top-k of the state's logits over `vocab` tokens, on the GPU."""
        s = self.s
        lists = -(-vocab // TOPK_CHUNK)   # one record per TOPK_CHUNK logits
        self._dispatch("topk", {"stage": "chunk", "topk": TOPK, "chunk": TOPK_CHUNK}, {"COUNT": vocab},
                       {0: s.logits, 1: s.counts, 2: s.sparams, 3: s.processed, 4: s.topk[0]},
                       (lists, 1, 1), "topk chunk")
        src = 0
        while lists > 1:
            groups = -(-lists // TOPK_MERGE)   # a workgroup merges up to TOPK_MERGE records
            records = Binding(s.topk[src], 0, 4 * RESULT_WORDS * lists)   # their number is its length
            self._dispatch("topk", {"stage": "merge", "topk": TOPK}, {},
                           {0: records, 4: s.topk[1 - src]}, (groups, 1, 1), "topk merge")
            src = 1 - src
            lists = groups
        assert s.topk[src] is s.result

    def count_token(self, vocab: int) -> None:
        """The decode step's first dispatch: takes its token (the host's, or the last step's best:
        shaders/counts.wgsl.j2) and counts it."""
        self._dispatch("counts", {"op": "add"}, {"V": vocab},
                       {0: self.s.counts, 1: self._step(), 2: self.s.result}, 1, "count")

    def clear_counts(self, vocab: int) -> None:
        self._dispatch("counts", {"op": "clear"}, {"V": vocab}, {0: self.s.counts},
                       -(-vocab // 64), "clear counts")
