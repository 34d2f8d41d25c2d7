"""`pyengine pack` manifests and shards, and `pyengine serve`'s types, ranges and cache headers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.request

import pytest

from ggufs import write_tiny_llama
from pyengine.gguf import read_gguf
from pyengine.serve import serve_in_thread
from pyengine.shards import MAX_SHARD, ManifestError, check_manifest, pack, plan_shards, read_manifest_header


def test_pack_covers_the_file_with_verified_shards(tmp_path, tiny_llama):
    m = pack(tiny_llama, tmp_path / "out", max_shard=40_000, piece=4096)
    data = open(tiny_llama, "rb").read()
    assert m["piece_size"] == 4096 and any(len(s["pieces"]) > 1 for s in m["shards"])
    assert m["model"]["sha256"] == hashlib.sha256(data).hexdigest() and m["model"]["size"] == len(data)
    joined = b""
    for s in m["shards"]:
        blob = (tmp_path / "out" / s["file"]).read_bytes()
        assert len(blob) == s["size"] <= 40_000 or s is m["shards"][0]
        assert hashlib.sha256(blob).hexdigest() == s["sha256"]
        # and each piece's, cut at multiples of the piece size within the shard
        assert s["pieces"] == [hashlib.sha256(blob[at:at + 4096]).hexdigest() for at in range(0, len(blob), 4096)]
        joined += blob
    assert joined == data
    check_manifest(json.loads((tmp_path / "out" / "manifest.json").read_text()))
    # a manifest from before piece hashes is still read
    older = json.loads((tmp_path / "out" / "manifest.json").read_text())
    del older["piece_size"]
    for s in older["shards"]:
        del s["pieces"]
    check_manifest(older)
    # shard 0 is exactly the header, and parses to the same tensor table
    header = (tmp_path / "out" / m["shards"][0]["file"]).read_bytes()
    g, h = read_gguf(tiny_llama), read_manifest_header(m, header)
    assert {n: (t.offset, t.nbytes) for n, t in g.tensors.items()} == \
        {n: (t.offset, t.nbytes) for n, t in h.tensors.items()}


def test_tensors_do_not_straddle_shards_unless_larger_than_one(tiny_llama):
    g = read_gguf(tiny_llama)
    cuts = plan_shards(g, 40_000)
    for t in g.tensors.values():
        inside = [c for c in cuts if c[0] < t.offset + t.nbytes and t.offset < c[0] + c[1]]
        assert len(inside) == 1 or t.nbytes > 40_000


def test_default_model_shards_fit_32_mib(model_path):
    g = read_gguf(model_path)
    cuts = plan_shards(g)
    assert all(size <= MAX_SHARD for _, size in cuts) and sum(s for _, s in cuts) == g.size


@pytest.mark.parametrize("change,match", [
    (lambda m: m.update(version=9), "version 9"),
    (lambda m: m.update(format="other"), "not a pyengine"),
    (lambda m: m["shards"][1].update(offset=5), "does not continue"),
    (lambda m: m["shards"][1].update(file="../../etc/passwd"), "outside"),
    (lambda m: m["model"].update(size=1), "cover"),
    (lambda m: m.update(shards=[]), "no shards"),
    (lambda m: m["shards"][1].update(sha256="Z" * 64), "needs a sha256"),
    (lambda m: m["model"].update(sha256="0" * 63), "model entry needs an integer size and a sha256"),
    (lambda m: m.update(piece_size=6), "piece_size must be a multiple of 4"),
    (lambda m: m.update(piece_size=1024), "the sha256 of each of its"),    # the pieces no longer fit
    (lambda m: m["shards"][1]["pieces"].pop(), "the sha256 of each of its"),
    (lambda m: m["shards"][1]["pieces"].__setitem__(0, "00" * 31), "the sha256 of each of its"),
    (lambda m: m.pop("piece_size"), "lists pieces but the manifest has no piece_size"),
])
def test_bad_manifests_are_named(tmp_path, tiny_llama, change, match):
    m = pack(tiny_llama, tmp_path / "out")
    change(m)
    with pytest.raises(ManifestError, match=match):
        check_manifest(m)


def test_cli_pack(tmp_path, tiny_llama):
    out = subprocess.run([sys.executable, "-m", "pyengine", "pack", tiny_llama, str(tmp_path / "p")],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["shards"] >= 2
    assert (tmp_path / "p" / "manifest.json").exists()


@pytest.fixture
def server(tmp_path):
    (tmp_path / "index.html").write_text("<!doctype html><title>x</title>")
    (tmp_path / "pyodide").mkdir()
    (tmp_path / "pyodide" / "pyodide.asm.wasm").write_bytes(b"\0asm" + bytes(100))
    (tmp_path / "shard-00001.bin").write_bytes(bytes(range(256)) * 4)
    httpd, url = serve_in_thread(str(tmp_path))
    yield url
    httpd.shutdown()


def fetch(url, headers=None):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as r:
        return r.status, r.headers, r.read()


def test_serve_types_ranges_and_cache_headers(server):
    status, h, body = fetch(server + "pyodide/pyodide.asm.wasm")
    assert h["Content-Type"] == "application/wasm" and "max-age" in h["Cache-Control"]
    status, h, body = fetch(server + "shard-00001.bin", {"Range": "bytes=10-19"})
    assert status == 206 and body == bytes(range(10, 20)) and h["Content-Range"] == "bytes 10-19/1024"
    status, h, body = fetch(server + "shard-00001.bin", {"Range": "bytes=-4"})
    assert body == bytes(range(252, 256))
    status, h, body = fetch(server + "index.html")
    assert h["Cache-Control"] == "no-cache" and h["Content-Type"].startswith("text/html")
    with pytest.raises(urllib.error.HTTPError) as e:
        fetch(server + "shard-00001.bin", {"Range": "bytes=5000-"})
    assert e.value.code == 416


def test_serve_refuses_a_folder_without_a_site(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pyengine", "serve", "--dist", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "no built site" in res.stderr
    assert not os.listdir(tmp_path)


def test_a_site_built_from_other_sources_than_the_checkout_is_named(tmp_path, capsys):
    # a browser benchmark against a site built before a change would measure the older code: the site
    # records the digest of what it was built from, and using one that differs says so
    import shutil

    from pyengine.headless import CHECKOUT, SOURCES, SOURCES_RECORD, dist_dir, sources_digest

    root = tmp_path / "checkout"
    for top in SOURCES:
        shutil.copytree(os.path.join(CHECKOUT, top), root / top, ignore=shutil.ignore_patterns("__pycache__"))
    now = sources_digest(str(root))
    assert now == sources_digest(CHECKOUT) and len(now) == 64
    (root / "pyengine" / "__pycache__").mkdir(exist_ok=True)
    (root / "pyengine" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"compiled")
    assert sources_digest(str(root)) == now                       # compiled files are no source
    shard_js = root / "web" / "shards.js"
    shard_js.write_bytes(shard_js.read_bytes() + b"\n")
    assert sources_digest(str(root)) != now                       # one byte more in one file
    assert sources_digest(str(tmp_path / "nowhere")) is None      # no checkout: nothing to compare

    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<!doctype html>")
    dist_dir(str(site))
    assert "records no digest" in capsys.readouterr().err
    (site / SOURCES_RECORD).write_text(json.dumps({"sha256": "0" * 64}))
    dist_dir(str(site))
    assert "was built from other sources" in capsys.readouterr().err
    (site / SOURCES_RECORD).write_text(json.dumps({"sha256": sources_digest()}))
    assert dist_dir(str(site)) == str(site) and capsys.readouterr().err == ""


def test_the_build_records_what_it_was_built_from(site):
    from pyengine.headless import stale_reason

    assert stale_reason(site[0]) is None
