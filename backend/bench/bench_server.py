"""Server/client costs on loopback, one JSON object per line.

upload_first    open a session on a 512x512x300 int16 volume: fingerprint, upload, decode (target <= 1 s)
upload_repeat   the same volume again: fingerprint hit, no upload (target ~0)
prompt_overhead a point prompt through client + server / the same prompt on an in-process engine session
                (SAM-2 with random weights; target ratio <= 1.1 or <= 20 ms extra)
axes            peak server RSS (VmHWM) of a fresh SAM-2 server (random weights) opening sessions on all three
                axes of one 512x512x<slices> int16 volume: one upload, and no volume-sized copy per axis
amplifier_*     peak server RSS (VmHWM) of a fresh `--test-engine` server before and after one small hostile
                request: a 57 MiB JSON body without the token, a 2 MiB zlib body declaring 1024^3 uint16 (at the
                default limits, and with --memory-budget 1 below its size), a 43 KB mask prompt declaring 16384^2

Run: .venv/bin/python backend/bench/bench_server.py [--slices 300] [--repeats 5] [--threads 1]
     [--cases upload,prompt,axes,amplifiers]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from server_helpers import (bomb, exchange, json_points_body, peak_rss_mib, request_head,  # noqa: E402
                            start_server_process, stop_process)

from medsam2_client import MedSAM2Client, protocol, wire  # noqa: E402


def ct_like(shape, seed=0) -> np.ndarray:
    """A volume that compresses and hashes like CT: smooth anatomy, air outside, noise."""
    rng = np.random.default_rng(seed)
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((j - shape[1] / 2) / (shape[1] * 0.4)) ** 2 + ((i - shape[2] / 2) / (shape[2] * 0.45)) ** 2 <= 1
    vol = np.where(body, 40, -1000) + rng.normal(0, 20, shape)
    return vol.astype(np.int16)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def bench_upload(slices: int) -> None:
    proc, url = start_server_process("--test-engine")
    try:
        client = MedSAM2Client(url)
        client.health()
        vol = ct_like((slices, 512, 512))
        t0 = time.perf_counter()
        s = client.open_session(vol)
        first = time.perf_counter() - t0
        assert s.uploads == 1
        emit(case="upload_first", shape=list(vol.shape), mb=round(vol.nbytes / 2**20, 1), codec=client.codec,
             ours_s=round(first, 3), peak_rss_mb=round(rss_mb()),
             server_peak_rss_mb=round(peak_rss_mib(proc.pid)))
        t0 = time.perf_counter()
        again = client.open_session(vol, axis=1)
        repeat = time.perf_counter() - t0
        assert again.uploads == 0
        emit(case="upload_repeat", ours_s=round(repeat, 3), note="fingerprint (blake2b of the voxels) + one request")
        t0 = time.perf_counter()
        known = client.open_session(vol, axis=2, fingerprint=again.fingerprint)
        assert known.uploads == 0
        emit(case="upload_repeat_known_fingerprint", ours_s=round(time.perf_counter() - t0, 4),
             note="as Slicer opens it: the fingerprint kept since the voxels last changed, one request")
    finally:
        stop_process(proc)


def bench_axes(slices: int) -> None:
    proc, url = start_server_process("--random-weights", "--device", "cpu", ready_timeout=180)
    try:
        client = MedSAM2Client(url, timeout=120)
        vol = ct_like((slices, 512, 512))
        volume_mib = vol.nbytes / 2**20
        before = peak_rss_mib(proc.pid)
        sessions = [client.open_session(vol, axis=0)]
        first = peak_rss_mib(proc.pid)
        sessions += [client.open_session(vol, axis=axis, fingerprint=sessions[0].fingerprint) for axis in (1, 2)]
        every = peak_rss_mib(proc.pid)
        assert [s.uploads for s in sessions] == [1, 0, 0]
        emit(case="axes", volume_mib=round(volume_mib), rss_before_mib=round(before),
             first_axis_peak_volumes=round((first - before) / volume_mib, 2),
             three_axes_peak_volumes=round((every - before) / volume_mib, 2),
             note="VmHWM above the idle server, in volumes: 1 is the upload itself")
    finally:
        stop_process(proc)


def timed_prompts(session, repeats: int) -> float:
    session.add_prompt(1, 3, points=[[250, 250]], labels=[1])  # encodes the slice: not what is measured
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        session.add_prompt(1, 3, points=[[200 + 10 * i, 260]], labels=[1], replace=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_prompt(repeats: int, threads: int) -> None:
    """Both sides get the same number of torch threads: on a busy machine more threads than free cores make
    SAM-2's many small decoder ops wait at OpenMP barriers, up to 40x slower, which would swamp the comparison."""
    import torch

    from medsam2_backend.engine import load_engine

    os.environ["OMP_NUM_THREADS"] = str(threads)  # the server process inherits it
    torch.set_num_threads(threads)
    vol = ct_like((8, 512, 512), seed=1)
    proc, url = start_server_process("--random-weights", "--device", "cpu", ready_timeout=180)
    try:
        remote = MedSAM2Client(url, timeout=120).open_session(vol)
        ours = timed_prompts(remote, repeats)
        server_mb = peak_rss_mib(proc.pid)
    finally:
        stop_process(proc)
    local = load_engine(random_weights=True, device="cpu").open_session(vol)
    ref = timed_prompts(local, repeats)
    emit(case="prompt_overhead", threads=threads, ours_s=round(ours, 4), ref_s=round(ref, 4), ratio=round(ours / ref, 3),
         extra_ms=round((ours - ref) * 1000, 1), peak_rss_mb=round(rss_mb()), server_peak_rss_mb=round(server_mb))


def bench_amplifiers(tmp: pathlib.Path) -> None:
    """Each amplifier on a fresh server: VmHWM is a lifetime peak."""
    import base64
    import struct
    import zlib

    token = "bench-token"
    (tmp / "token").write_text(token)

    def attack(case: str, send, *args: str) -> None:
        proc, url = start_server_process("--test-engine", "--token-file", str(tmp / "token"), *args)
        try:
            port = int(url.rsplit(":", 1)[1])
            before = peak_rss_mib(proc.pid)
            t0 = time.perf_counter()
            status = send(port, MedSAM2Client(url, token=token))
            emit(case=case, status=status, seconds=round(time.perf_counter() - t0, 2), server_args=list(args),
                 rss_before_mib=round(before), peak_rss_mib=round(peak_rss_mib(proc.pid)))
        finally:
            stop_process(proc)

    def json_body(port, client):
        head = request_head("POST", protocol.PROMPTS.format(session_id="any"), port, length=57 << 20)
        return exchange(port, head, json_points_body(57 << 20))[0]

    def zlib_bomb(port, client):
        body, fp = bomb((1024, 1024, 1024), nbytes=2 << 20)
        head = request_head("PUT", protocol.VOLUME.format(fingerprint=fp), port, token=token,
                            content_type=wire.VOLUME_MEDIA_TYPE, length=len(body))
        return exchange(port, head, [body], timeout=120)[0]

    def mask_prompt(port, client):
        s = client.open_session(ct_like((4, 64, 64)))
        side = 16384
        data = struct.pack("<6I", side, side, 0, 0, side, side) + zlib.compress(bytes(side * side // 8), 9)
        body = json.dumps({"obj_id": 1, "slice_index": 0, "mask": base64.b64encode(data).decode()}).encode()
        head = request_head("POST", protocol.PROMPTS.format(session_id=s.session_id), port, token=token,
                            length=len(body))
        return exchange(port, head, [body])[0]

    attack("amplifier_unauthenticated_json_57mib", json_body)
    attack("amplifier_zlib_bomb_1024cubed", zlib_bomb)
    attack("amplifier_zlib_bomb_1024cubed", zlib_bomb, "--memory-budget", "1")
    attack("amplifier_mask_prompt_16384sq", mask_prompt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides of prompt_overhead")
    p.add_argument("--cases", default="upload,prompt,axes,amplifiers")
    args = p.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    cases = args.cases.split(",")
    if "upload" in cases:
        bench_upload(args.slices)
    if "prompt" in cases:
        bench_prompt(args.repeats, args.threads)
    if "axes" in cases:
        bench_axes(args.slices)
    if "amplifiers" in cases:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            bench_amplifiers(pathlib.Path(tmp))


if __name__ == "__main__":
    main()
