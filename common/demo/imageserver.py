"""An HTTP image server on 127.0.0.1 for the demo and the tests, with faults on demand.

    /img/NAME                 the file NAME from the root folder
    /files/PATH               any file under the root folder (shards, their index.json)
    /fault/404/NAME           404                     /fault/500/NAME        500, always
    /fault/flaky500/NAME      500 twice, then NAME    /fault/429/NAME        429 + Retry-After: 1 once, then NAME
    /fault/slow/NAME          NAME after `slow_s`     /fault/truncated/NAME  half of NAME, then the socket closes
    /fault/notimage/NAME      an HTML page (200)      /fault/oversized/NAME  a 200 MB body
    /fault/bomb/NAME          a PNG declaring 40000x40000 pixels
    /fault/redirect/NAME      302 to itself, forever
    /fault/moved/URL          302 to URL (percent-encoded), once

`latency_s` delays every answer (benchmarks use 50 ms). `hits` counts requests per path.
Run alone: `python -m common.demo.imageserver --root DIR --port 8765`.
"""
from __future__ import annotations

import argparse
import collections
import http.server
import struct
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import unquote

OVERSIZED_BYTES = 200 * 1024 * 1024


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A small PNG whose header claims a huge image: what a decompression bomb looks like to a reader."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # the tests and the demo read counts, not access logs
        return

    def _send(self, code: int, body: bytes, ctype: str = "image/jpeg", headers: dict | None = None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _file(self, name: str):
        path = (self.server.root / name).resolve()
        if self.server.root not in path.parents or not path.is_file():
            return self._send(404, b"not found", "text/plain")
        ctype = {".png": "image/png", ".jpg": "image/jpeg", ".json": "application/json"}.get(
            path.suffix, "application/octet-stream")
        self._send(200, path.read_bytes(), ctype)

    def do_GET(self):
        srv = self.server
        with srv.lock:
            srv.hits[self.path] += 1
            hit = srv.hits[self.path]
        if srv.latency_s:
            time.sleep(srv.latency_s)
        parts = self.path.lstrip("/").split("/", 2)
        if parts[0] == "img" and len(parts) == 2:
            return self._file(parts[1])
        if parts[0] == "files" and len(parts) >= 2:
            return self._file(self.path[len("/files/"):])
        if parts[0] != "fault" or len(parts) != 3:
            return self._send(404, b"not found", "text/plain")
        kind, name = parts[1], parts[2]
        if kind == "404":
            return self._send(404, b"not found", "text/plain")
        if kind == "500" or (kind == "flaky500" and hit <= 2):
            return self._send(500, b"server error", "text/plain")
        if kind == "429" and hit <= 1:
            return self._send(429, b"slow down", "text/plain", {"Retry-After": "1"})
        if kind == "slow":
            time.sleep(srv.slow_s)
        if kind == "truncated":
            path = srv.root / name
            body = path.read_bytes() if path.is_file() else b"\xff\xd8" + b"\x00" * 4096
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if kind == "notimage":
            return self._send(200, b"<html><body>Access denied</body></html>", "text/html")
        if kind == "bomb":
            return self._send(200, bomb_png(), "image/png")
        if kind in ("redirect", "moved"):
            self.send_response(302)
            self.send_header("Location", self.path if kind == "redirect" else unquote(name))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if kind == "oversized":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(OVERSIZED_BYTES))
            self.end_headers()
            block = b"\x00" * (1 << 20)
            try:
                for _ in range(OVERSIZED_BYTES >> 20):
                    self.wfile.write(block)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading at its size cap, which is the point
            self.close_connection = True
            return
        return self._file(name)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a burst of 64+ connections must not hit a full listen backlog
    allow_reuse_address = True


class ImageServer:
    """`with ImageServer(root) as srv: srv.url("/img/1.jpg")`; port 0 picks a free port."""

    def __init__(self, root: Path | str, port: int = 0, latency_s: float = 0.0, slow_s: float = 5.0):
        self.httpd = _Server(("127.0.0.1", port), _Handler)
        self.httpd.root = Path(root).resolve()
        self.httpd.latency_s = latency_s
        self.httpd.slow_s = slow_s
        self.httpd.hits = collections.Counter()
        self.httpd.lock = threading.Lock()
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hits(self) -> collections.Counter:
        return self.httpd.hits

    def url(self, path: str) -> str:
        return self.base_url + path

    def start(self) -> "ImageServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description="Serve a folder of images on 127.0.0.1, with fault routes.")
    ap.add_argument("--root", required=True, help="folder whose files are served under /img/")
    ap.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free port)")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every answer")
    args = ap.parse_args()
    srv = ImageServer(args.root, args.port, args.latency_ms / 1000)
    print(f"serving {args.root} on {srv.base_url}", flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.httpd.server_close()


if __name__ == "__main__":
    main()
