"""An HTTP server on 127.0.0.1 that serves a folder (Range requests included) and misbehaves on demand.

    with FaultServer(folder) as server:
        server.inject("drop", times=3, match=".tar")   # the next 3 requests for a .tar break mid-body
        url = server.url                                # http://127.0.0.1:PORT/

Faults, each applied to the next `times` requests whose path contains `match` (times=None: every one;
every=N: only every Nth of those):
    drop          the body stops half way and the socket is reset (RST, as a crashed proxy does)
    503           "503 Service Unavailable", no body
    stall         headers and half the body, then nothing, the connection left open (until the server stops)
    short         Content-Length promises the whole range, half of it is sent, then a clean close
    ignore-range  a Range request answered "200" with the whole file, as servers without Range support do
    endless       "200" with no length and a body that does not end: the file, then zeros (up to ENDLESS bytes,
                  so that a client that reads it all still finishes); `sent` counts what went out
"""

from __future__ import annotations

import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FAULTS = ("drop", "503", "stall", "short", "ignore-range")  # the ones a client recovers from
HOSTILE = ("endless",)  # the ones it must refuse (tests/test_hostile_manifests.py)
ENDLESS = 256 << 20


@dataclass
class Fault:
    kind: str
    times: int | None  # None: every matching request
    match: str
    every: int = 1
    seen: int = 0


@dataclass
class Log:
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (path, Range header, fault or "")


class FaultServer:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.faults: list[Fault] = []
        self.log = Log()
        self.sent = 0  # bytes the endless fault wrote
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers: a fault must not leak into the next request

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.handle(self)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that hung up on a fault (or timed out on a stall): expected here

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FaultServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()  # releases stalled handlers
        self.httpd.shutdown()
        self.httpd.server_close()

    def inject(self, kind: str, times: int | None = 1, match: str = ".tar", every: int = 1) -> None:
        assert kind in FAULTS + HOSTILE, kind
        with self.lock:
            self.faults.append(Fault(kind, times, match, every))

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def _take(self, path: str) -> str:
        with self.lock:
            for fault in self.faults:
                if fault.match in path and (fault.times is None or fault.times > 0):
                    fault.seen += 1
                    if fault.seen % fault.every:
                        continue
                    if fault.times is not None:
                        fault.times -= 1
                    return fault.kind
        return ""

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path.split("?", 1)[0]
        file = (self.folder / path.lstrip("/")).resolve()
        header = request.headers.get("Range", "")
        fault = self._take(path)
        with self.lock:
            self.log.requests.append((path, header, fault))
        if fault == "503":
            return self._send(request, 503, b"", {})
        if not file.is_file() or self.folder.resolve() not in file.parents:
            return self._send(request, 404, b"", {})
        size = file.stat().st_size
        start, end = 0, size
        status, headers = 200, {}
        if (found := re.fullmatch(r"bytes=(\d+)-(\d*)", header)) and fault != "ignore-range":
            start = int(found[1])
            end = min(int(found[2]) + 1, size) if found[2] else size
            if start >= size:
                return self._send(request, 416, b"", {"Content-Range": f"bytes */{size}"})
            status, headers = 206, {"Content-Range": f"bytes {start}-{end - 1}/{size}"}
        with open(file, "rb") as opened:
            opened.seek(start)
            body = opened.read(end - start)
        if fault == "endless":
            return self._endless(request, body)
        if fault in ("drop", "stall", "short"):
            return self._break(request, status, headers, body, fault)
        self._send(request, status, body, headers)

    def _endless(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        request.send_response(200)
        request.send_header("Connection", "close")  # no length: the body ends when the connection does
        request.end_headers()
        request.close_connection = True
        zeros = bytes(1 << 16)
        try:
            request.wfile.write(body)
            self.sent += len(body)
            while self.sent < ENDLESS and not self.stopping.is_set():
                request.wfile.write(zeros)
                self.sent += len(zeros)
        except OSError:  # the client stopped reading and hung up: what a good client does
            pass

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str]) -> None:
        request.send_response(status)
        for name, value in headers.items():
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(body)))
        request.send_header("Accept-Ranges", "bytes")
        request.end_headers()
        request.wfile.write(body)

    def _break(self, request: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes,
               fault: str) -> None:
        request.send_response(status)
        for name, value in headers.items():
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body[: len(body) // 2])
        request.wfile.flush()
        request.close_connection = True
        if fault == "stall":
            self.stopping.wait(120)  # silent, open: only the client's inactivity timeout ends this
        elif fault == "drop":
            request.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
