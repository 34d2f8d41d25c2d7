"""The synthetic benchmark models: valid GGUF (the gguf package reads them) that the engine runs."""

from __future__ import annotations

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from conftest import run
from pyengine.engine import Engine
from pyengine.sampling import SamplingParams
from pyengine.synthetic import write_synthetic

SMALL = dict(layers=2, dim=256, ffn=512, heads=4, kv_heads=2, head_dim=64, vocab=1000, rope_base=500000.0,
             context=512)


def test_a_synthetic_model_is_a_gguf_the_engine_runs(tmp_path, backend):
    # into a folder that does not exist yet (the cache folder of a fresh machine)
    path = write_synthetic(str(tmp_path / "cache" / "pyengine" / "s.gguf"), "small", SMALL)
    assert sorted(p.name for p in (tmp_path / "cache" / "pyengine").iterdir()) == ["s.gguf", "s.gguf.done"]
    r = GGUFReader(path)
    names = {t.name: t for t in r.tensors}
    assert len(names) == 2 + 9 * 2 and names["blk.1.ffn_down.weight"].tensor_type.name == "Q4_0"
    w = dequantize(names["blk.0.attn_q.weight"].data, names["blk.0.attn_q.weight"].tensor_type)
    assert np.isfinite(w).all() and 0.01 < np.abs(w).mean() < 0.1     # sane scales, not noise of any size
    engine = Engine.load(path, backend, context_length=128)
    gen = engine.generate("hello", SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))

    async def go():
        async for _ in gen:
            pass
    run(go())
    assert gen.usage.completion_tokens == 4
    engine.close()
