"""`pyengine serve`: the built site on 127.0.0.1, with WebAssembly types, range requests and cache headers."""

from __future__ import annotations

import functools
import os
import re
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from .errors import PyEngineError

TYPES = {
    ".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript",
    ".json": "application/json", ".bin": "application/octet-stream", ".whl": "application/zip",
    ".zip": "application/zip", ".html": "text/html; charset=utf-8", ".css": "text/css",
}
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **TYPES}
    isolate = False
    log_requests = False

    def end_headers(self):
        path = self.path.split("?", 1)[0]
        if "/pyodide/" in path or "/wheels/" in path:
            self.send_header("Cache-Control", "public, max-age=86400")
        else:
            self.send_header("Cache-Control", "no-cache")
        self.send_header("Accept-Ranges", "bytes")
        if self.isolate:   # cross-origin isolation, for pages that need SharedArrayBuffer
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def send_head(self):
        rng = self.headers.get("Range")
        if rng is None:
            return super().send_head()
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        m = _RANGE.match(rng.strip())
        if not m or (not m.group(1) and not m.group(2)):
            self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            return None
        if m.group(1):
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        else:
            start, end = max(0, size - int(m.group(2))), size - 1
        if start >= size or start > end:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return _Limited(f, end - start + 1)

    def log_message(self, fmt, *args):
        if self.log_requests:
            super().log_message(fmt, *args)


class _Limited:
    """A file object that reads at most n bytes (copyfile reads until EOF)."""

    def __init__(self, f, n):
        self.f, self.n = f, n

    def read(self, size=-1):
        if self.n <= 0:
            return b""
        size = self.n if size < 0 else min(size, self.n)
        data = self.f.read(size)
        self.n -= len(data)
        return data

    def close(self):
        self.f.close()


def make_server(directory: str, host: str = "127.0.0.1", port: int = 8000, isolate: bool = False,
                log_requests: bool = False) -> ThreadingHTTPServer:
    if not os.path.isfile(os.path.join(directory, "index.html")):
        raise PyEngineError(f"{directory} holds no built site: run `python build/build.py` first")
    handler = type("PyengineHandler", (Handler,), {"isolate": isolate, "log_requests": log_requests})
    httpd = ThreadingHTTPServer((host, port), functools.partial(handler, directory=directory))
    httpd.daemon_threads = True
    return httpd


def serve_in_thread(directory: str, **kw) -> tuple[ThreadingHTTPServer, str]:
    httpd = make_server(directory, port=kw.pop("port", 0), **kw)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    host, port = httpd.server_address[:2]
    return httpd, f"http://{host}:{port}/"
