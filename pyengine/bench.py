"""`pyengine bench`: load time, prefill and decode speed, time to first token; medians of several runs."""

from __future__ import annotations

import statistics
import time

from .engine import Engine
from .sampling import SamplingParams

FILLER = ("The history of computing is a story of people who wanted machines to do arithmetic faster "
          "than any clerk could, and of the ideas, from punched cards to transistors, that let them. ")


def bench_prompt(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(FILLER, add_bos=False)
    return ids[:n]


async def run_bench(model_path, backend="native", runs=3, prompt_tokens=128, gen_tokens=128, context=None):
    loads, prefill, decode, ttft = [], [], [], []
    engine = None
    for _ in range(runs):
        if engine is not None:
            engine.backend.destroy()
            engine = None
        t0 = time.perf_counter()
        engine = await Engine.open(model_path, backend, context_length=context)
        loads.append(time.perf_counter() - t0)
    prompt = bench_prompt(engine.tokenizer, prompt_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=gen_tokens, ignore_eos=True)
    for i in range(runs + 1):           # the first run compiles the prefill plan: not counted
        engine.reset()
        gen = engine.generate(prompt, params)
        async for _ in gen:
            pass
        if i == 0:
            continue
        prefill.append(gen.timings.prefill_tok_s)
        decode.append(gen.timings.decode_tok_s)
        ttft.append(gen.timings.ttft_s)
    decode_plan = engine.decode_plan
    return {
        "model": str(model_path),
        "backend": backend,
        "adapter": engine.backend.adapter_info,
        "runs": runs,
        "load_s": round(statistics.median(loads), 3),
        "prompt_tokens": len(prompt),
        "prefill_tok_s": round(statistics.median(prefill), 2),
        "time_to_first_token_s": round(statistics.median(ttft), 3),
        "gen_tokens": gen_tokens,
        "decode_tok_s": round(statistics.median(decode), 2),
        "dispatches_per_token": len(decode_plan.dispatches),
        "gpu_bytes": getattr(engine.backend, "bytes_allocated", None),
        "weights_bytes": sum(w.nbytes for w in engine.weights.values()),
        "context": engine.context_length,
    }
