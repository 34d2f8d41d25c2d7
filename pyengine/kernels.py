"""Where a kernel is chosen: WGSL templates rendered per device and variant, compiled once, cached.

A variant is a set of template parameters. The table below says which variant
each operation uses on a device; sizes that change per model come in as
`override` constants, sizes that change per step come from the step buffer.
"""

from __future__ import annotations

import json
import os

from .errors import UnsupportedModelError
from .gpu import Pending

# quant types the mat-vec, mat-mat and embedding kernels read
KERNEL_QTYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
# quant types whose GGUF blocks the repack kernel lays out for aligned loads (the others are read as stored)
REPACKED_QTYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q6_K")
# values per block: a row's length must be a multiple of it
BLOCK_VALUES = {"F32": 32, "F16": 32, "BF16": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32,
                "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
# GGUF blocks: (values, bytes) per block, for the raw upload
GGUF_BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
               "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "F32": (1, 4), "F16": (1, 2),
               "BF16": (1, 2)}

TOPK = 64           # candidates read back per token
TOPK_CHUNK = 1024   # logits per workgroup in the first top-k pass
TOPK_MERGE = 16     # records per workgroup in the later passes
RESULT_WORDS = 4 + 2 * TOPK   # a top-k record: [max, sum, bound, n, TOPK x (value, index)], n of them set

# variant table: operation -> template parameters (before device features are added)
VARIANTS = {
    "matvec": {"wg": 32, "rows": 4, "xshare": False, "split": 0, "norm": False, "xtex": False, "ytex": False},
    "matmul": {"wg": 64, "xshare": False, "rows": 1, "tmax": 8, "norm": False, "xtex": False, "ytex": False, "rope": False},
    "rmsnorm": {"wg": 64},
    # decode_split: invocations a head's keys split over in decode; *_group: query heads a workgroup takes
    "attention": {"wg": 64, "share": False, "decode_split": 32, "decode_group": 1, "prefill_group": 1,
                  "otex": False},
}

TEXTURE_WIDTH = 1024         # texels (16 bytes) a row of a weight texture (shaders/_quant.wgsl.j2: weight_binding)
TEXTURE_ROW_BYTES = 16 * TEXTURE_WIDTH
UNIFORM_BYTES = 65536        # the uniform window kernels read activations through
UNIFORM_ALIGN = 256          # minUniformBufferOffsetAlignment
STORAGE_ALIGN = 256          # minStorageBufferOffsetAlignment


# 32-value types packed with rows interleaved by fours, rows padded to a multiple of 4 (shaders/_quant.wgsl.j2,
# where the templates know them as QUADS)
QUAD_QTYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def packed_nbytes(qtype: str, rows: int, cols: int) -> int:
    """Bytes of a [rows, cols] weight once repacked (see shaders/_quant.wgsl.j2)."""
    if qtype in QUAD_QTYPES:
        rows = -(-rows // 4) * 4
    blocks = rows * cols // 32
    kblocks = rows * cols // 256
    if qtype == "Q4_0":
        return blocks * 16 + -(-blocks // 2) * 4
    if qtype == "Q4_1":
        return blocks * 20
    if qtype == "Q5_0":
        return blocks * 20 + -(-blocks // 2) * 4
    if qtype == "Q5_1":
        return blocks * 24
    if qtype == "Q8_0":
        return blocks * 32 + -(-blocks // 2) * 4
    if qtype == "Q4_K":
        return kblocks * 144
    if qtype == "Q5_K":
        return kblocks * 176
    if qtype == "Q6_K":
        return kblocks * 212
    if qtype in ("F16", "BF16"):
        return rows * cols * 2
    if qtype == "F32":
        return rows * cols * 4
    raise UnsupportedModelError(
        f"quant type {qtype} is not supported; supported: {', '.join(KERNEL_QTYPES)}")


class Kernels:
    """Renders and compiles kernels for one backend; each (template, parameters, constants) once."""

    def __init__(self, backend):
        import jinja2

        self.backend = backend
        self.env = jinja2.Environment(loader=_shader_loader(), undefined=jinja2.StrictUndefined,
                                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        self.env.globals.update(QUADS=QUAD_QTYPES, tex_width=TEXTURE_WIDTH,
                                tex_shift=TEXTURE_WIDTH.bit_length() - 1, fail=_template_error)
        self._pipelines: dict = {}
        self._codes: dict = {}
        self.tuning: dict = {}      # op -> parameters measured best on this adapter (pyengine/tuning.py)
        self.device_params = {
            "backend": "dawn" if backend.name == "browser" else "naga",
            "subgroups": "subgroups" in backend.features,
            "f16": False,
            "wtex": False,          # set per weight: Weight.texture
            "kvtex": False,         # set per cache: KVCache.textures
        }
        self.weight_textures = weight_textures(backend)
        self.kv_textures = _textures(backend, "PYENGINE_KV")
        # the activations the shared mat-mats and mat-vecs read (shaders/matmul.wgsl.j2, matvec.wgsl.j2: xtex)
        self.activation_textures = _textures(backend, "PYENGINE_ACTIVATIONS")

    def render(self, family: str, **params) -> str:
        p = dict(self.device_params)
        p.update(params)
        if "qtype" in p:            # repacked types keep scale words apart, read through a u32 view
            p["words"] = p["qtype"] in REPACKED_QTYPES
        if p.get("kv_f16"):         # any kernel given an f16 cache declares f16, whatever made its params
            p["f16"] = True
        return self.env.get_template(f"{family}.wgsl.j2").render(**p)

    def code(self, family: str, params: dict) -> str:
        """The WGSL of kernel `family` with `params`, rendered once."""
        key = (family, json.dumps(params, sort_keys=True))
        code = self._codes.get(key)
        if code is None:
            code = self._codes[key] = self.render(family, **params)
        return code

    @staticmethod
    def _key(family: str, params: dict, constants: dict) -> tuple:
        return family, json.dumps(params, sort_keys=True), json.dumps(constants, sort_keys=True)

    def _source(self, family: str, params: dict, constants: dict) -> tuple:
        """(code, constants, label): what the backend compiles."""
        label = family + "".join(f".{k}={v}" for k, v in sorted(params.items()))
        return self.code(family, params), constants, label

    def pipeline(self, family: str, params: dict, constants: dict):
        key = self._key(family, params, constants)
        pipe = self._pipelines.get(key)
        if pipe is None:
            pipe = self._pipelines[key] = self.backend.create_pipeline(*self._source(family, params, constants))
        return pipe

    def start_compile(self, kernels):
        """Starts compiling the kernels of `kernels` ((family, parameters, constants) each, as
        GraphBuilder.kernels gives them) that are not compiled yet (Backend.start_pipelines: a browser's GPU
        process compiles them while the page goes on); awaiting what it returns finishes, and raises
        GPUError where one failed."""
        todo = {}
        for family, params, constants in kernels:
            key = self._key(family, params, constants)
            if key not in self._pipelines and key not in todo:
                todo[key] = self._source(family, params, constants)
        pending = self.backend.start_pipelines(list(todo.values())) if todo else None

        async def finish():
            if pending is not None:
                self._pipelines.update(zip(todo, await pending))
        return Pending(finish)

    def fits(self, family: str, params: dict) -> bool:
        """Whether the kernel binds no more storage buffers than the device allows one kernel (folding more
        work into one kernel binds more: a KV cache in buffers, RoPE's frequency factors)."""
        return self.code(family, params).count("var<storage") <= self.backend.max_storage_buffers

    @staticmethod
    def folds_norm(params: dict) -> bool:
        """Whether a mat-mat or mat-vec of `params` applies the RMSNorm of its input itself (norm): those
        sharing activations by broadcasts (xshare) and the mat-vecs splitting rows over invocations (split)."""
        return bool(params.get("xshare") or params.get("split"))

    @staticmethod
    def matvec_rows_per_workgroup(params: dict) -> int:
        """Rows of the weight one workgroup of the mat-vec `params` computes: `rows` an invocation, or
        with `split` a group of `rows` for every `split` invocations (shaders/matvec.wgsl.j2)."""
        return params["wg"] // (params.get("split") or 1) * params["rows"]

    @staticmethod
    def matvec_uniform(k: int) -> bool:
        return k * 4 <= UNIFORM_BYTES

    @staticmethod
    def matmul_tile(k: int, t_max: int = 8) -> int:
        """Tokens (at most t_max) per tiled mat-mat dispatch whose X tile fits the uniform window at an
        aligned offset; 0: none."""
        t = t_max
        while t >= 1:
            if t * k * 4 <= UNIFORM_BYTES and (t * k * 4) % UNIFORM_ALIGN == 0:
                return t
            t //= 2
        return 0

    def variant(self, op: str, **extra) -> dict:
        p = dict(VARIANTS.get(op, {}))
        p.update(self.tuning.get(op, {}))
        p.update(extra)
        if p.get("kv_f16") or p.get("f16"):
            if "shader-f16" not in self.backend.features:
                raise UnsupportedModelError("f16 kernels need a device with shader-f16")
            p["f16"] = True
        return p


def weight_textures(backend) -> bool:
    """Whether weight matrices go into textures on this backend (shaders/_quant.wgsl.j2: weight_binding):
    on CPU adapters, whose texel fetches are plain vector loads; GPUs keep storage buffers.
    PYENGINE_WEIGHTS=textures|buffers chooses instead (the kernel tests run both)."""
    return _textures(backend, "PYENGINE_WEIGHTS")


def _textures(backend, variable: str) -> bool:
    """Textures on CPU adapters, unless `variable` (textures|buffers) says otherwise: the weights'
    choice (PYENGINE_WEIGHTS), the KV cache's (PYENGINE_KV, shaders/_common.wgsl.j2: kv_binding) or
    the activations' the shared mat-mats and mat-vecs read (PYENGINE_ACTIVATIONS, graph._x_texture)."""
    choice = os.environ.get(variable, "")
    if choice not in ("", "textures", "buffers"):
        raise ValueError(f"{variable}={choice!r}: use textures or buffers")
    if choice:
        return choice == "textures" and backend.max_texture_rows > 0
    from .tuning import is_cpu

    return is_cpu(backend) and backend.max_texture_rows > 0


def kv_texture_rows(context: int, n_kv_heads: int, head_dim: int) -> int:
    """Rows of a layer's k (or v) cache texture: a texel a vec4 of a head (kv_binding)."""
    return activation_texture_rows(context, n_kv_heads * head_dim)


def activation_texture_rows(tokens: int, cols: int) -> int:
    """Rows of a texture holding `tokens` tokens of `cols` values, a texel 4 of them (activations, a
    layer's keys or values)."""
    return max(1, -(-tokens * (cols // 4) // TEXTURE_WIDTH))


def _template_error(message: str):
    raise ValueError(f"kernel template: {message}")


def texture_rows(nbytes: int) -> int:
    """Rows of the weight texture holding `nbytes` packed bytes."""
    return max(1, -(-nbytes // TEXTURE_ROW_BYTES))


def _shader_loader():
    import jinja2
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "shaders"), os.path.join(os.path.dirname(here), "shaders")):
        if os.path.isfile(os.path.join(cand, "matvec.wgsl.j2")):
            return jinja2.FileSystemLoader(cand)
    raise FileNotFoundError("the WGSL templates (shaders/*.wgsl.j2) are missing from this install")
