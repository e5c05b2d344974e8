"""Servers for the server/client tests: in a thread of this process (uvicorn) or as a `medsam2-server` process."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import uvicorn

from medsam2_backend.engine import DiskEngine
from medsam2_backend.server import make_app
from medsam2_backend.server.transport import uvicorn_config
from medsam2_client import MedSAM2Client, errors, protocol, wire


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def thread_server(engine, header_timeout_s: float = 10.0, max_connections: int = 64, **options):
    """`make_app(engine, **options)` served as `medsam2-server` serves it, on a free loopback port; yields its URL."""
    app = make_app(engine, **options)
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", free_port(), log_level="warning",
                                           max_connections=max_connections, header_timeout_s=header_timeout_s))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.config.port}", app
    finally:
        server.should_exit = True
        thread.join(10)


def start_server_process(*args: str, port: int | None = None, ready_timeout: float = 60.0):
    """A `medsam2-server` subprocess on 127.0.0.1; returns (process, url) once it answers /v1/health."""
    port = port or free_port()
    env = dict(os.environ, TQDM_DISABLE="1")
    proc = subprocess.Popen([sys.executable, "-m", "medsam2_backend.server.cli", "--port", str(port),
                             "--log-level", "warning", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, encoding="utf-8", errors="replace")
    url = f"http://127.0.0.1:{port}"
    client = MedSAM2Client(url, connect_timeout=1.0)
    deadline = time.monotonic() + ready_timeout
    while True:
        try:
            client.health()
            return proc, url
        except errors.BackendUnavailable:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"medsam2-server did not start:\n{proc.communicate()[0]}")
            time.sleep(0.1)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()


class SlowDiskEngine(DiskEngine):
    """The disk engine taking `delay` seconds per tracked slice and counting them, to watch a propagation stop."""

    def __init__(self, delay: float, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay
        self.tracked = 0
        self.lock = threading.RLock()  # held per slice, as the SAM-2 engine holds its accelerator lock

    def open_session(self, *args, **kwargs):
        session = super().open_session(*args, **kwargs)
        track = session._track

        def slow_track(*track_args):
            for result in track(*track_args):
                with self.lock:
                    time.sleep(self.delay)
                self.tracked += 1
                yield result

        session._track = slow_track
        return session


def box_mask(shape, box, shrink: int = 0) -> np.ndarray:
    """The disk engine's mask for a box prompt, `shrink` slices away: the box eroded by `shrink` px per side."""
    x0, y0, x1, y1 = box
    m = np.zeros(shape, bool)
    m[y0 + shrink : y1 - shrink + 1, x0 + shrink : x1 - shrink + 1] = True
    return m


def random_volume(shape, seed=0, dtype=np.int16) -> np.ndarray:
    return np.random.default_rng(seed).integers(-500, 1500, shape).astype(dtype)


def peak_rss_mib(pid: int) -> float:
    """A process's lifetime peak resident memory (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def exchange(port: int, head: str, body_chunks=(), rcvbuf: int | None = None, timeout: float = 30.0):
    """Send a request's head and as much of its body as the server takes; (status, headers, body, seconds)."""
    t0 = time.monotonic()
    with socket.socket() as sock:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        sock.sendall(head.encode("latin-1"))
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered without reading the rest: what we want to see
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while True:
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body, time.monotonic() - t0


def request_head(method: str, path: str, port: int, *, token: str | None = None, length: int | None = None,
                 content_type: str = "application/json", chunked: bool = False, host: str | None = None) -> str:
    """An HTTP/1.1 request head as the client sends it (protocol header, optional bearer token)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", "Connection: close",
             f"Content-Type: {content_type}", f"{protocol.PROTOCOL_HEADER}: {protocol.PROTOCOL_VERSION}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    return "\r\n".join(lines) + "\r\n\r\n"


def chunked(chunks):
    for c in chunks:
        yield b"%x\r\n" % len(c) + c + b"\r\n"
    yield b"0\r\n\r\n"


def json_points_body(nbytes: int):
    """A syntactically valid prompt of about `nbytes`, in 1 MiB pieces (never all in the test's memory)."""
    piece = b"[1.5, 2.5]," * ((1 << 20) // 11)
    yield b'{"obj_id": 1, "slice_index": 0, "labels": [1], "points": ['
    for _ in range(nbytes // len(piece)):
        yield piece
    yield b"[1.0, 1.0]]}"


def bomb(shape, dtype=np.uint16, nbytes: int = 1 << 20) -> tuple[bytes, str]:
    """A volume header declaring `shape`, then zlib of zeros (a wrong fingerprint: it can only be refused)."""
    fingerprint = "ab" * 16
    header = struct.pack("<4sHBBH3I16s", wire.VOLUME_MAGIC, wire.VOLUME_VERSION, wire.DTYPE_CODES[np.dtype(dtype)],
                         wire.CODEC_ZLIB, 0, *shape, bytes.fromhex(fingerprint))
    return header + zeros_deflate(nbytes), fingerprint


def zeros_deflate(nbytes: int) -> bytes:
    """About `nbytes` of one zlib stream of zeros (~1000:1), built without compressing gigabytes: once the
    window holds only zeros, every flushed block of zeros compresses to the same bytes, so one is repeated."""
    z = zlib.compressobj(9)
    zeros = bytes(1 << 20)
    first = z.compress(zeros) + z.flush(zlib.Z_SYNC_FLUSH)
    block = z.compress(zeros) + z.flush(zlib.Z_SYNC_FLUSH)
    assert block == z.compress(zeros) + z.flush(zlib.Z_SYNC_FLUSH)
    return first + block * max(1, (nbytes - len(first)) // len(block))
