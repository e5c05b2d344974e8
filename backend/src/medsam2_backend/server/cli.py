"""`medsam2-server`: serve an engine over HTTP (loopback by default; any other address needs a token)."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys

from medsam2_client import protocol

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="medsam2-server", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=protocol.DEFAULT_PORT)
    p.add_argument("--checkpoint", help="MedSAM2 checkpoint: a file path or a known name such as MedSAM2_latest")
    p.add_argument("--update-checkpoint", action="store_true",
                   help="ask the Hub for the current file of a known checkpoint even when a verified one is cached "
                   "(default: a cached, verified checkpoint loads without asking the Hub)")
    p.add_argument("--random-weights", action="store_true",
                   help="serve a randomly initialised model (pipeline tests only: masks are meaningless)")
    p.add_argument("--test-engine", action="store_true", help=argparse.SUPPRESS)  # deterministic disks, no model
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--precision", choices=protocol.PRECISIONS, help="default: bf16 on CUDA, else fp32")
    p.add_argument("--threads", type=int, help="CPU threads for the model (default: PyTorch's, one per core); "
                   "fewer than the cores when the computer has other work avoids thread contention")
    p.add_argument("--token", help="access token clients must send (prefer --token-file: others can read argv)")
    p.add_argument("--token-file", type=pathlib.Path, help="file holding the access token")
    p.add_argument("--max-sessions", type=int, default=protocol.DEFAULT_MAX_SESSIONS)
    p.add_argument("--memory-budget", type=float, default=protocol.DEFAULT_MEMORY_BUDGET_BYTES / 2**30,
                   metavar="GIB", help="memory for volumes, masks and feature caches before sessions are evicted")
    p.add_argument("--idle-timeout", type=float, default=protocol.DEFAULT_IDLE_TIMEOUT_S, metavar="SECONDS")
    p.add_argument("--max-upload-mb", type=float, default=protocol.DEFAULT_MAX_UPLOAD_BYTES / 2**20)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--exit-with-stdin", action="store_true",
                   help="exit when standard input closes (for a parent that starts the server with a pipe, such as "
                        "the Slicer extension: the server then ends with it). Off by default: docker run without "
                        "-i, systemd and tests give no stdin")
    p.add_argument("--eviction-grace", type=float, default=protocol.DEFAULT_EVICTION_GRACE_S, metavar="SECONDS",
                   help="a session used within this time is never evicted for another user's; newcomers are "
                   "told the server is busy and when to retry")
    p.add_argument("--allowed-hosts", default="", metavar="NAMES",
                   help="comma-separated host names the server answers besides loopback names (the public name "
                   "behind a reverse proxy); '*' for any")
    p.add_argument("--max-connections", type=int, default=protocol.DEFAULT_MAX_CONNECTIONS,
                   help="open connections before new requests are answered 503")
    p.add_argument("--stall-timeout", type=float, default=protocol.DEFAULT_STALL_TIMEOUT_S, metavar="SECONDS",
                   help="cancel a propagation whose client has read nothing for this long")
    p.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json (behind the token)")
    return p.parse_args(argv)


def _fail(message: str) -> int:
    print(f"medsam2-server: {message}", file=sys.stderr)
    return 2


def exit_when_stdin_closes() -> None:
    """Stop the server (SIGTERM: uvicorn's clean shutdown, or the default exit while loading) once stdin is at EOF."""
    import signal
    import threading

    fd = sys.stdin.fileno()

    def wait_for_eof():
        # os.read on the descriptor, not sys.stdin's buffered reader: a daemon thread holding that reader's lock
        # makes the interpreter abort at exit ("could not acquire lock for <stdin> at interpreter shutdown").
        while os.read(fd, 65536):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait_for_eof, name="exit-with-stdin", daemon=True).start()


def main(argv=None) -> int:
    args = parse_args(argv)
    token = args.token.strip() if args.token is not None else None
    if args.token is not None and not token:
        return _fail("the token given with --token is empty or only whitespace.")
    if args.token_file is not None:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            return _fail(f"cannot read the token file {args.token_file}: {e.strerror}.")
        if not token:
            return _fail(f"the token file {args.token_file} is empty.")
    if not protocol.is_loopback(args.host) and not token:
        return _fail(f"refusing to listen on {args.host} without an access token: anyone on the network could "
                     f"use this server. Give --token-file (or --token), or listen on 127.0.0.1.")
    if args.threads is not None and args.threads < 1:
        return _fail("--threads must be at least 1.")
    chosen = sum(bool(x) for x in (args.checkpoint, args.random_weights, args.test_engine))
    if chosen != 1:
        return _fail("give exactly one of --checkpoint PATH_OR_NAME, --random-weights or --test-engine.")
    if args.update_checkpoint and not args.checkpoint:
        return _fail("--update-checkpoint goes with --checkpoint NAME (a known checkpoint such as MedSAM2_latest).")
    os.environ.setdefault("TQDM_DISABLE", "1")  # SAM-2 draws a progress bar per propagation
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.exit_with_stdin:
        exit_when_stdin_closes()
    import uvicorn

    from ..engine import DiskEngine, EngineInputError, load_engine
    from .app import make_app
    from .transport import uvicorn_config

    if args.test_engine:
        engine = DiskEngine()
    else:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        try:
            engine = load_engine(args.checkpoint, device=args.device, precision=args.precision,
                                 random_weights=args.random_weights, update_checkpoint=args.update_checkpoint)
        except EngineInputError as e:
            return _fail(str(e))
    app = make_app(engine, token=token, max_sessions=args.max_sessions,
                   memory_budget_bytes=int(args.memory_budget * 2**30), idle_timeout_s=args.idle_timeout,
                   max_upload_bytes=int(args.max_upload_mb * 2**20), eviction_grace_s=args.eviction_grace,
                   bound_to_loopback=protocol.is_loopback(args.host),
                   allowed_hosts=[h for h in args.allowed_hosts.split(",") if h.strip()], docs=args.docs,
                   stall_timeout_s=args.stall_timeout)
    uvicorn.Server(uvicorn_config(app, args.host, args.port, log_level=args.log_level,
                                  max_connections=args.max_connections)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
