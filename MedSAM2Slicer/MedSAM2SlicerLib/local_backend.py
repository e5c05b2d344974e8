"""A `medsam2-server` on this computer, started and stopped by the extension (no Qt, so it is testable headless).

The model runs in its own process, not in Slicer's: a crash or an out-of-memory kills the server, not the app, and
the same client code serves a local and a remote backend. It listens on 127.0.0.1 on a free port with a random
token (given through a private file, not argv), logs to a file, and is ready once `/v1/health` answers.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable

BACKEND_REQUIREMENT = ("medsam2-slicer-backend[server] @ "
                       "git+https://github.com/MedSAM2Slicer/MedSAM2Slicer.git#subdirectory=backend")
INSTALL_HINT = (
    "The MedSAM2 backend is not installed in this Python. Install it (PyTorch, SAM-2, the backend) with\n"
    f"  {{python}} -m pip install torch sam2==1.1.0 \"{BACKEND_REQUIREMENT}\"\n"
    "or, in Slicer's Python console:\n"
    f"  slicer.util.pip_install(['torch', 'sam2==1.1.0', '{BACKEND_REQUIREMENT}'])\n"
    "or choose a Python that has it (the 'Python' setting), or connect to a remote server.")


class LocalServerError(Exception):
    """The local server could not be started; the message says why (with its log's last lines)."""


# Windows: no console window for the server (Slicer is a GUI app); subprocess has the constant only on Windows.
CREATE_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)


def server_environment() -> dict:
    """The environment to start the server in.

    Inside the Slicer app, `os.environ` carries the launcher's PYTHONHOME, PYTHONPATH, PYTHONNOUSERSITE and
    library paths (Slicer's SuperBuild/External_python.cmake), on which any Python but Slicer's own dies at start.
    Slicer's own code starts external programs with `slicer.util.startupEnvironment()` (Base/Python/slicer/util.py),
    the environment from before the launcher; Slicer's PythonSlicer launcher then sets its own again. Assumes: the
    app is there exactly when `slicer` has an `app` attribute (slicer-core and plain Python have none).
    """
    try:
        import slicer
        import slicer.util
    except ImportError:
        slicer = None
    in_app = slicer is not None and getattr(slicer, "app", None) is not None
    env = slicer.util.startupEnvironment() if in_app else dict(os.environ)
    return dict(env, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")


def popen_options(log) -> dict:
    """How the server process is started so that `stop()` ends it and everything it started.

    In Slicer, `sys.executable` is the PythonSlicer launcher, which runs `python-real` as a child and forwards no
    termination: terminating the launcher alone orphans the server. So the server gets its own process group
    (POSIX) to kill as a whole, and `--exit-with-stdin` with a pipe: the launcher forwards stdin, so the server
    also exits when Slicer goes away without calling `stop()` (a crash, a console script that failed).
    """
    options = {"stdout": log, "stderr": subprocess.STDOUT, "stdin": subprocess.PIPE, "env": server_environment()}
    if sys.platform == "win32":
        options["creationflags"] = CREATE_NO_WINDOW
    else:
        options["start_new_session"] = True
    return options


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(python: str | None = None) -> list[str]:
    """How to run the server: `python -m ...` if a Python is given, else `medsam2-server` on PATH, else ours."""
    if python:
        return [python, "-m", "medsam2_backend.server.cli"]
    found = shutil.which("medsam2-server")
    if found:
        return [found]
    if importlib.util.find_spec("medsam2_backend") is None:
        raise LocalServerError(INSTALL_HINT.format(python=sys.executable))
    return [sys.executable, "-m", "medsam2_backend.server.cli"]


class LocalServer:
    """One server process. `checkpoint` is a file path or a known name (e.g. MedSAM2_latest)."""

    def __init__(self, checkpoint: str | None = None, *, random_weights: bool = False, test_engine: bool = False,
                 device: str | None = None, precision: str | None = None, python: str | None = None,
                 ready_timeout: float = 300.0):
        if sum((checkpoint is not None, random_weights, test_engine)) != 1:
            raise LocalServerError("Choose one model for the local server: a checkpoint, or random weights.")
        self.model_args = (["--checkpoint", str(checkpoint)] if checkpoint is not None else
                           ["--random-weights"] if random_weights else ["--test-engine"])
        self.device, self.precision, self.python = device, precision, python
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen | None = None
        self.url: str | None = None
        self.token: str | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None

    @property
    def log_path(self) -> pathlib.Path | None:
        return None if self._workdir is None else pathlib.Path(self._workdir.name) / "server.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, waiting: Callable[[], None] | None = None) -> str:
        """Start the server and wait until it answers; returns its URL (`self.token` is the token to send).

        `waiting()` is called while it loads (the panel passes its event loop's processEvents to stay responsive).
        """
        from medsam2_client import MedSAM2Client, errors

        if self.running:
            return self.url
        command = server_command(self.python)
        self._workdir = tempfile.TemporaryDirectory(prefix="medsam2-server-", ignore_cleanup_errors=True)
        token_file = pathlib.Path(self._workdir.name) / "token"
        self.token = secrets.token_urlsafe(32)
        token_file.touch(mode=0o600)
        token_file.write_text(self.token)
        port = free_port()
        args = [*command, "--host", "127.0.0.1", "--port", str(port), "--token-file", str(token_file),
                "--log-level", "warning", "--exit-with-stdin", *self.model_args]
        if self.device:
            args += ["--device", self.device]
        if self.precision:
            args += ["--precision", self.precision]
        with open(self.log_path, "wb") as log:
            try:
                self.process = subprocess.Popen(args, **popen_options(log))
            except OSError as error:  # e.g. a mistyped 'Python' setting: FileNotFoundError
                self.stop()
                raise LocalServerError(f"The local MedSAM2 server could not be started with {args[0]!r}: "
                                       f"{error.strerror or error}. Check the 'Python' setting.") from error
        self.url = f"http://127.0.0.1:{port}"
        client = MedSAM2Client(self.url, self.token, connect_timeout=1.0)
        deadline = time.monotonic() + self.ready_timeout
        while True:
            try:
                client.health()
                return self.url
            except errors.BackendUnavailable:
                pass
            if self.process.poll() is not None:
                self._fail(f"it exited with code {self.process.returncode}")
            if time.monotonic() > deadline:
                self._fail(f"it did not answer within {self.ready_timeout:g} s")
            if waiting is not None:
                waiting()
            time.sleep(0.2)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log (what to show when something went wrong)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server and whatever it started (terminate, then kill after `timeout_s`); delete token and log."""
        if self.process is not None:
            if self.process.stdin is not None:
                self.process.stdin.close()  # --exit-with-stdin: the server's own clean exit
            _end_process_tree(self.process, timeout_s)
        self.process = None
        if self._workdir is not None:
            # Windows cannot delete a file a process still holds open: a log kept open by a process that outlived
            # the tree kill stays behind in the temporary folder (ignore_cleanup_errors) rather than raising here.
            self._workdir.cleanup()
            self._workdir = None

    def _fail(self, what: str):
        tail = self.log_tail()
        self.stop()
        if "No module named" in tail and "medsam2_backend" in tail:
            raise LocalServerError(INSTALL_HINT.format(python=self.python or sys.executable))
        raise LocalServerError(f"The local MedSAM2 server did not start: {what}. Last lines of its log:\n{tail}")


def _end_process_tree(process: subprocess.Popen, timeout_s: float) -> None:
    """Terminate the server's whole process tree, then kill it if it is still there after `timeout_s`."""
    if sys.platform == "win32":
        if process.poll() is None:
            # taskkill /T ends the launcher's children too (Windows has no process groups to signal).
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True,
                           creationflags=CREATE_NO_WINDOW)
        process.wait()
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)  # the group popen_options gave it: launcher and python-real together
        except ProcessLookupError:
            break  # nothing of the group is left
        try:
            process.wait(timeout_s)
            if sig == signal.SIGTERM:
                _wait_group_gone(process.pid, timeout_s)
            break
        except subprocess.TimeoutExpired:
            continue
    process.wait()


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Wait until no process of the group is left (the launcher may exit before its child does)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired("process group", timeout_s)
        time.sleep(0.05)
