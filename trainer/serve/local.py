"""`trainer serve` as a child process on a free local port: for tests, benchmarks and scripts.

    with serving("run/best.pt") as url:      # returns once GET /health says 200
        requests.post(url + "/predict", data=open("photo.jpg", "rb"))
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model: str | Path, *args: str, wait: float = 180) -> Iterator[str]:
    """`trainer serve MODEL ARGS` on 127.0.0.1 until /health says 200; yields its URL and stops it after."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "trainer", "serve", str(model), "--port", str(port), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + wait
        while not healthy(url):
            if process.poll() is not None:
                raise RuntimeError(f"trainer serve exited with {process.returncode}: {process.stdout.read()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"trainer serve {model} was not healthy after {wait:g} s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):  # not listening yet, or 503 while warming up
        return False
