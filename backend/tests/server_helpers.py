"""Servers for the server/client tests: in a thread of this process (uvicorn) or as a `medsam2-server` process."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import uvicorn

from medsam2_backend.engine import DiskEngine
from medsam2_backend.server import make_app
from medsam2_backend.server.transport import uvicorn_config
from medsam2_client import MedSAM2Client, errors


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
                            stderr=subprocess.STDOUT, text=True)
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
