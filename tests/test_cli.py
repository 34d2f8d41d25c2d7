"""The `pyengine` command: answers on stdout, user errors as one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ggufs import write_tiny_llama


def pyengine(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "pyengine", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def assert_user_error(res, match):
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert match in lines[0], lines[0]


def test_generate_greedy_answers_the_default_model():
    res = pyengine("generate", "--temperature", "0", "What is the capital of France?")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "The capital of France is Paris.\n"


def test_generate_raw_and_options(tiny_llama):
    args = ("generate", "--model", tiny_llama, "--raw", "--max-tokens", "7", "--temperature", "0.9",
            "--top-p", "0.8", "--top-k", "20", "--seed", "4", "--context", "64", "the cat")
    a, b = pyengine(*args), pyengine(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.endswith("\n")


def test_chat_is_multi_turn(tiny_llama):
    res = pyengine("chat", "--model", tiny_llama, "--temperature", "0", "--max-tokens", "5", "--stats",
                   stdin="hello there\nand again\n")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.strip("\n").split("\n")) >= 2
    stats = [line for line in res.stderr.splitlines() if "prompt tokens" in line]
    assert len(stats) == 2
    assert "(0 cached)" in stats[0] and "(0 cached)" not in stats[1]   # turn two reuses turn one


def test_bench_prints_json(tiny_llama):
    res = pyengine("bench", "--model", tiny_llama, "--runs", "2", "--prompt-tokens", "20", "--gen-tokens", "8")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for key in ("cold_load_s", "warm_load_s", "prefill_tok_s", "decode_tok_s", "time_to_first_token_s",
                "first_request_time_to_first_token_s", "adapter",
                "dispatches_per_token", "gpu_bytes", "weight_bytes_per_token"):
        assert key in out
    assert out["prompt_tokens"] == 20 and out["decode_tok_s"] > 0
    assert out["host"]["cpu"] and out["host"]["cores"] >= 1     # CPU adapters' figures hinge on the host
    assert out["bandwidth"]["gb_s"] > 0 and 0 < out["decode_fraction_of_limit"]
    rate = out["arithmetic"]
    assert len(rate["runs_gflop_s"]) == 2 and rate["gflop_s"] == max(rate["variants_gflop_s"].values()) > 0
    assert out["prefill_limit_tok_s"] == pytest.approx(rate["gflop_s"] * 1e9 / out["prefill_flops_per_token"], rel=1e-3)
    assert 0 < out["prefill_fraction_of_limit"]
    kernels = out["profile"]["kernels"]
    assert {"matvec", "attention", "topk", "rmsnorm"} <= set(kernels)
    assert sum(k["dispatches"] for k in kernels.values()) == out["dispatches_per_token"]


def test_missing_model_file():
    assert_user_error(pyengine("generate", "--model", "/no/such/model.gguf", "hi"), "model file not found")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"hello world, not a model" * 10)
    assert_user_error(pyengine("generate", "--model", str(p), "hi"), "not a GGUF file")


def test_truncated_gguf(tmp_path, tiny_llama):
    p = tmp_path / "cut.gguf"
    p.write_bytes(open(tiny_llama, "rb").read()[:5000])
    assert_user_error(pyengine("generate", "--model", str(p), "hi"), "truncated")


def test_unsupported_architecture(tmp_path):
    p = write_tiny_llama(tmp_path / "m.gguf", arch="mamba")
    assert_user_error(pyengine("generate", "--model", str(p), "hi"), "architecture 'mamba' is not supported")


def test_unsupported_quant_type(tmp_path):
    p = write_tiny_llama(tmp_path / "q.gguf", qtypes={"ffn_down": "MXFP4"})
    assert_user_error(pyengine("generate", "--model", str(p), "hi"), "quant type MXFP4")


def test_context_too_small_for_the_prompt(tiny_llama):
    assert_user_error(pyengine("generate", "--model", tiny_llama, "--context", "8",
                               "a prompt that is clearly longer than eight tokens"), "context holds 8")


def test_model_without_template(tmp_path):
    p = write_tiny_llama(tmp_path / "base.gguf", chat_template=None)
    assert_user_error(pyengine("generate", "--model", str(p), "hi"), "no chat template")
    res = pyengine("generate", "--model", str(p), "--raw", "--max-tokens", "3", "hi")
    assert res.returncode == 0, res.stderr
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    res = pyengine("generate", "--model", str(p), "--chat-template", str(tpl), "--max-tokens", "3", "hi")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("args,field", [
    (("--temperature", "nan"), "temperature"),
    (("--top-p", "0"), "top_p"),
    (("--top-p", "1.5"), "top_p"),
    (("--max-tokens", "0"), "max_tokens"),
    (("--top-k", "-1"), "top_k"),
])
def test_bad_options_name_the_field(args, field):
    assert_user_error(pyengine("generate", *args, "hi"), field)


def test_an_adapter_is_chosen_by_name_and_an_unknown_one_is_named(tiny_llama):
    res = pyengine("generate", "--model", tiny_llama, "--adapter", "swiftshader", "--raw", "--temperature", "0",
                   "--max-tokens", "3", "--stats", "hello")
    assert res.returncode == 0, res.stderr
    assert_user_error(pyengine("info", "--model", tiny_llama, "--adapter", "no-such-gpu"),
                      "no WebGPU adapter matches 'no-such-gpu'; found:")


def test_prefill_flops_count_every_layer_weight_causal_attention_and_one_head(tiny_llama):
    """Checked against the file as the gguf package reads it: the layers' matrices for each token,
    q.k and p.v over the 1..n keys the tokens see, the output head (here the tied embedding) once."""
    import gguf

    from conftest import run
    from pyengine.bench import prefill_flops
    from pyengine.engine import Engine

    reader = gguf.GGUFReader(tiny_llama)
    field = lambda name: int(reader.fields[name].parts[-1][0])      # noqa: E731
    layers, heads = field("llama.block_count"), field("llama.attention.head_count")
    head_dim = field("llama.embedding_length") // heads
    tensors = {t.name: t for t in reader.tensors}
    mats = sum(int(t.n_elements) for n, t in tensors.items() if n.startswith("blk.") and len(t.shape) == 2)
    head = int(tensors.get("output.weight", tensors["token_embd.weight"]).n_elements)
    engine = run(Engine.open(tiny_llama, "native"))
    try:
        for n in (1, 7, 128):
            keys = n * (n + 1) // 2
            assert prefill_flops(engine, n) == 2 * (mats * n + 2 * layers * heads * head_dim * keys + head)
    finally:
        engine.close()


def test_the_bandwidth_kernel_gives_gpus_more_invocations(backend, monkeypatch):
    """A GPU hides a load's latency behind other invocations' loads, so on one the streaming kernel also
    runs with 16x the invocations a CPU adapter gets, and the limit is the best of the shapes."""
    from conftest import run
    from pyengine import bench
    from pyengine.kernels import Kernels

    k = Kernels(backend)
    cpu = run(bench.measure_bandwidth(backend, k, mb=16, reps=1))
    monkeypatch.setattr(bench, "is_cpu", lambda b: False)
    gpu = run(bench.measure_bandwidth(backend, k, mb=16, reps=1))
    assert not any("invocations" in name for name in cpu["variants_gb_s"])
    assert sum(name.endswith("262144 invocations") for name in gpu["variants_gb_s"]) == 2
    assert gpu["gb_s"] == max(gpu["variants_gb_s"].values()) > 0
