"""A real `medsam2-server` process: the command line, auth, SAM-2 with random weights, and faults."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from medsam2_client import MedSAM2Client, errors
from server_helpers import box_mask, free_port, random_volume, start_server_process, stop_process


def test_refuses_a_network_address_without_a_token():
    r = subprocess.run([sys.executable, "-m", "medsam2_backend.server.cli", "--host", "0.0.0.0", "--test-engine"],
                       capture_output=True, encoding="utf-8", errors="replace", timeout=60)
    assert r.returncode == 2
    assert "refusing to listen on 0.0.0.0 without an access token" in r.stderr


def test_needs_exactly_one_model_choice():
    r = subprocess.run([sys.executable, "-m", "medsam2_backend.server.cli", "--test-engine", "--random-weights"],
                       capture_output=True, encoding="utf-8", errors="replace", timeout=60)
    assert r.returncode == 2 and "exactly one of" in r.stderr


def test_threads_must_be_positive():
    r = subprocess.run([sys.executable, "-m", "medsam2_backend.server.cli", "--test-engine", "--threads", "0"],
                       capture_output=True, encoding="utf-8", errors="replace", timeout=60)
    assert r.returncode == 2 and "--threads must be at least 1" in r.stderr


def test_a_whitespace_token_is_refused_at_start():
    r = subprocess.run([sys.executable, "-m", "medsam2_backend.server.cli", "--test-engine", "--token", "  \t "],
                       capture_output=True, encoding="utf-8", errors="replace", timeout=60)
    assert r.returncode == 2 and "empty or only whitespace" in r.stderr


def test_token_file_server_on_loopback(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    proc, url = start_server_process("--test-engine", "--token-file", str(token_file))
    try:
        with pytest.raises(errors.Unauthorized):
            MedSAM2Client(url).capabilities()
        with pytest.raises(errors.Unauthorized):
            MedSAM2Client(url, token="file-token-not").capabilities()
        c = MedSAM2Client(url, token="file-token")
        assert c.capabilities()["engine"]["engine"] == "disk-test-engine"
        vol = random_volume((5, 24, 30))
        s = c.open_session(vol, axis=2)
        r = s.add_prompt(1, 10, box=(2, 1, 20, 3))  # x = column (axis 1), y = row (axis 0)
        assert r.mask.shape == (5, 24) and np.array_equal(r.mask, box_mask((5, 24), (2, 1, 20, 3)))
        assert r.mask[1:4, 2:21].all() and r.mask.sum() == 3 * 19
    finally:
        stop_process(proc)


def test_random_weights_server_then_kill_and_restart(sam2_model):
    from medsam2_backend.engine.sam2_engine import Sam2Engine

    port = free_port()
    proc, url = start_server_process("--random-weights", "--device", "cpu", "--threads", "1", port=port,
                                      ready_timeout=120)
    try:
        c = MedSAM2Client(url, timeout=60)
        caps = c.capabilities()
        assert caps["engine"]["checkpoint"] == "random weights" and "RANDOM WEIGHTS" in caps["warning"]
        vol = random_volume((6, 48, 64))
        s = c.open_session(vol)
        r = s.add_prompt(1, 2, box=(10, 8, 40, 30))
        ref = Sam2Engine(sam2_model).open_session(vol).add_prompt(1, 2, box=(10, 8, 40, 30))
        assert r.mask.shape == (48, 64) and np.array_equal(r.mask, ref.mask)
        assert r.object_score == pytest.approx(ref.object_score, abs=1e-4)
        assert r.iou == pytest.approx(ref.iou, abs=1e-4)

        run = s.propagate()
        assert run.planned == 6
        frames = iter(run)
        assert next(frames).obj_id == 1
        os.kill(proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(errors.BackendUnavailable, match="lost|stopped sending"):
            list(frames)
        assert time.monotonic() - t0 < 5
        proc.wait(10)
        with pytest.raises(errors.ConnectionRefused):
            s.add_prompt(1, 3, points=[[20, 20]], labels=[1])
    finally:
        stop_process(proc)

    # The server comes back (here with the test engine): the same session carries on transparently.
    proc, _ = start_server_process("--test-engine", port=port)
    try:
        r = s.add_prompt(1, 4, box=(5, 5, 20, 20))
        assert s.reopened == 1 and s.uploads == 2
        assert np.array_equal(r.mask, box_mask((48, 64), (5, 5, 20, 20)))
        masks = {m.slice_index: m.mask for m in s.propagate(direction="forward")}
        assert np.array_equal(masks[5], box_mask((48, 64), (5, 5, 20, 20), 1))
    finally:
        stop_process(proc)
