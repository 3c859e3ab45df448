"""Real servers on loopback for the remote-session tests: llama-cpp-python's OpenAI-compatible server
on the demo model, a TCP proxy in front of it that can cut or stall a stream, and small Starlette
apps that answer the way a failing or a different server does (real HTTP, not mocks).
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

requires_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python[server] is not installed (.ci/run installs it)",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(url: str, process: subprocess.Popen[bytes] | None = None, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up in {seconds:.0f} s")


@contextlib.contextmanager
def llama_cpp_server(model: Path, *, n_ctx: int = 2048) -> Iterator[str]:
    """`python -m llama_cpp.server` on `model`; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url + "/v1/models", process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


class FaultyProxy:
    """A TCP proxy on loopback in front of `target` (host, port). After `cut_after` bytes of the
    server's reply it drops the connection; with `stall_after` it stops forwarding (and holds the
    connection open) after that many bytes: a server that hangs mid-answer."""

    def __init__(self, target: tuple[str, int], *, cut_after: int | None = None, stall_after: int | None = None):
        self.target, self.cut_after, self.stall_after = target, cut_after, stall_after
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self._closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target)

        def pump_up() -> None:
            with contextlib.suppress(OSError):
                while data := client.recv(65536):
                    upstream.sendall(data)

        threading.Thread(target=pump_up, daemon=True).start()
        sent = 0
        with contextlib.suppress(OSError):
            while data := upstream.recv(4096):
                limit = self.cut_after if self.cut_after is not None else self.stall_after
                if limit is not None and sent + len(data) > limit:
                    client.sendall(data[: max(limit - sent, 0)])
                    if self.stall_after is not None:
                        self._closing.wait(60)  # hold the connection, send nothing
                    break
                client.sendall(data)
                sent += len(data)
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._closing.set()
        self.server.close()


@contextlib.contextmanager
def starlette_server(routes: list[Any]) -> Iterator[str]:
    """A small real HTTP server (Starlette on uvicorn, in a thread) with these routes; yields its URL."""
    import uvicorn
    from starlette.applications import Starlette

    port = free_port()
    config = uvicorn.Config(Starlette(routes=routes), host="127.0.0.1", port=port, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url + "/", seconds=20)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def route(path: str, handler: Callable[..., Any], methods: list[str] | None = None) -> Any:
    from starlette.routing import Route

    return Route(path, handler, methods=methods or ["GET", "POST"])
