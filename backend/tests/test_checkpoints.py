"""Checkpoints: strict loading with named errors, and the Hub download (verified, recorded, cached, offline).

The Hub is a stand-in on 127.0.0.1 (`HF_ENDPOINT`) answering the two calls huggingface_hub makes for a file: HEAD
`/{repo}/resolve/{revision}/{filename}` with the headers the real Hub sends for an LFS file (X-Repo-Commit, ETag and
X-Linked-Etag = the file's SHA-256, X-Linked-Size) and GET with Range support. No test touches the internet.
"""

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from medsam2_backend.engine import EngineInputError
from medsam2_backend.engine.checkpoints import (
    DEMO_FALLBACK, KNOWN_CHECKPOINTS, fetch_for_demo, fetch_known, record_path, resolve, sha256_of)
from medsam2_backend.engine.errors import CheckpointIntegrityError, CheckpointNetworkError
from medsam2_backend.engine.model import load_model

PAYLOAD = b"not really a checkpoint, but bytes with a known hash\n" * 4000
COMMIT = "a" * 40
NEW_COMMIT = "b" * 40
NAME, FILENAME = "MedSAM2_latest", "MedSAM2_latest.pt"


class StandInHub:
    """Serves files of `wanglab/MedSAM2` as the Hub does, with knobs for the faults a download meets."""

    def __init__(self):
        self.files = {FILENAME: PAYLOAD}
        self.commit = COMMIT
        self.published_sha256 = {}  # filename -> the hash to publish instead of the real one
        self.cut_first_get_at = None  # bytes after which the first GET's connection is dropped
        self.resume_status = None  # answer a resumed (Range) GET with this status instead of the rest
        self.requests = []  # (method, path, Range header)
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body):
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
                parts = self.path.split("/")  # "", org, repo, "resolve", revision, filename
                data = hub.files.get(parts[-1]) if len(parts) == 6 and parts[1:4] == ["wanglab", "MedSAM2",
                                                                                       "resolve"] else None
                if data is None or parts[4] not in ("main", hub.commit):
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                etag = hub.published_sha256.get(parts[-1], hashlib.sha256(data).hexdigest())
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                if start and hub.resume_status:
                    self.send_response(hub.resume_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                if hub.cut_first_get_at is not None and not start:
                    cut, hub.cut_first_get_at = hub.cut_first_get_at, None
                    self.wfile.write(data[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-file
                    return
                self.wfile.write(data[start:])

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gets(self):
        return [r for r in self.requests if r[0] == "GET"]


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once the socket is closed


@pytest.fixture(autouse=True)
def no_calls_beyond_the_stand_in(monkeypatch, tmp_path):
    """huggingface_hub's telemetry fetches an agent registry from the endpoint it read at import: switch it off."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")  # for the server processes
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


@pytest.fixture
def hub(monkeypatch):
    hub = StandInHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield hub
    hub.server.shutdown()
    hub.server.server_close()


def test_first_use_downloads_verifies_and_records_the_hash_and_revision(hub, tmp_path):
    verified = fetch_known(NAME, tmp_path)
    assert verified.path == tmp_path / FILENAME and verified.path.read_bytes() == PAYLOAD
    assert verified.sha256 == hashlib.sha256(PAYLOAD).hexdigest() and verified.revision == COMMIT
    record = json.loads(record_path(verified.path).read_text(encoding="utf-8"))
    assert record["sha256"] == verified.sha256 and record["revision"] == COMMIT
    assert record["repo_id"] == "wanglab/MedSAM2" and record["size"] == len(PAYLOAD)
    assert len(hub.gets()) == 1, "downloaded once"


def test_a_cached_verified_checkpoint_loads_without_asking_the_hub(hub, tmp_path, monkeypatch):
    fetch_known(NAME, tmp_path)
    asked = len(hub.requests)
    hub.files[FILENAME], hub.commit = b"a newer upload", NEW_COMMIT  # the Hub moves on; the user's model does not
    assert fetch_known(NAME, tmp_path).revision == COMMIT and (tmp_path / FILENAME).read_bytes() == PAYLOAD
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch_known(NAME, tmp_path).sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    assert fetch_known(NAME, tmp_path).path.read_bytes() == PAYLOAD
    assert len(hub.requests) == asked


def test_updating_is_explicit_and_takes_the_hubs_current_file(hub, tmp_path):
    fetch_known(NAME, tmp_path)
    new = b"a newer upload of the weights\n" * 100
    hub.files[FILENAME], hub.commit = new, NEW_COMMIT
    updated = fetch_known(NAME, tmp_path, update=True)
    assert updated.revision == NEW_COMMIT and updated.path.read_bytes() == new
    assert json.loads(record_path(updated.path).read_text(encoding="utf-8"))["revision"] == NEW_COMMIT
    gets = len(hub.gets())
    assert fetch_known(NAME, tmp_path, update=True).revision == NEW_COMMIT
    assert len(hub.gets()) == gets, "an update to the file already cached asks the Hub but downloads nothing"


def test_a_replaced_cached_file_is_never_loaded(hub, tmp_path):
    path = fetch_known(NAME, tmp_path).path
    path.write_bytes(b"replaced" + PAYLOAD[8:])  # same size, other bytes
    with pytest.raises(CheckpointIntegrityError, match="does not match the SHA-256 recorded .* delete it"):
        fetch_known(NAME, tmp_path)
    with pytest.raises(CheckpointIntegrityError):  # also when the cached file is given by its path
        resolve(path)
    with pytest.raises(CheckpointIntegrityError):  # and `make demo` does not fall back on it
        fetch_for_demo(pytest.fail, NAME, tmp_path)
    assert fetch_known(NAME, tmp_path, update=True).path.read_bytes() == PAYLOAD  # the way back: re-download


def test_a_download_with_the_wrong_hash_leaves_nothing(hub, tmp_path):
    hub.published_sha256[FILENAME] = "0" * 64
    with pytest.raises(CheckpointIntegrityError, match="does not match the SHA-256 the Hub publishes"):
        fetch_known(NAME, tmp_path)
    assert not (tmp_path / FILENAME).exists() and not record_path(tmp_path / FILENAME).exists()
    with pytest.raises(CheckpointIntegrityError):
        fetch_for_demo(pytest.fail, NAME, tmp_path)  # a hash mismatch is never a reason to fall back


def test_an_interrupted_download_resumes_where_it_stopped(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # written to disk in small chunks, as 10 MB are
    cut = len(PAYLOAD) // 3
    hub.cut_first_get_at = cut
    verified = fetch_known(NAME, tmp_path)
    assert verified.path.read_bytes() == PAYLOAD and verified.sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    first, resumed = [r[2] for r in hub.gets()]
    assert first is None and 0 < int(resumed.removeprefix("bytes=").rstrip("-")) <= cut, resumed


def test_an_interrupted_download_that_cannot_resume_is_one_sentence_and_leaves_nothing(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    hub.cut_first_get_at, hub.resume_status = len(PAYLOAD) // 3, 500
    with pytest.raises(CheckpointNetworkError, match=r"^The download of MedSAM2_latest\.pt .* was interrupted .*: "
                                                     r"try again later"):
        fetch_known(NAME, tmp_path)
    assert not (tmp_path / FILENAME).exists() and not record_path(tmp_path / FILENAME).exists()
    assert list(tmp_path.rglob("*.incomplete")) == [], "no partial file is left behind"


def test_offline_mode_without_a_cached_file_says_what_to_do(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNetworkError, match="not in the checkpoint cache .* HF_HUB_OFFLINE is set"):
        fetch_known(NAME, tmp_path)
    assert hub.requests == []
    told = []
    assert fetch_for_demo(told.append, NAME, tmp_path) is None and "RANDOM WEIGHTS" in told[0]


def test_an_unreachable_hub_fails_fast_with_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    started = time.monotonic()
    with pytest.raises(CheckpointNetworkError) as caught:
        fetch_known(NAME, tmp_path)
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert message.startswith("Cannot reach the Hugging Face Hub at http://127.0.0.1:")
    assert "check the internet connection" in message and "\n" not in message
    told = []
    assert fetch_for_demo(told.append, NAME, tmp_path) is None
    assert told == [f"{message} {DEMO_FALLBACK}"] and "RANDOM WEIGHTS" in DEMO_FALLBACK


def test_a_hub_that_never_answers_times_out(tmp_path, monkeypatch):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections, never answers
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    told = []
    started = time.monotonic()
    try:
        assert fetch_for_demo(told.append, NAME, tmp_path, timeout=1) is None
    finally:
        silent.close()
    assert told[0].startswith("Cannot reach the Hugging Face Hub") and time.monotonic() - started < 10


def test_what_the_hub_cannot_vouch_for_is_refused(hub, tmp_path):
    hub.published_sha256[FILENAME] = "c" * 40  # a git blob id: not an LFS file, no SHA-256 published
    with pytest.raises(EngineInputError, match="publishes no SHA-256"):
        fetch_known(NAME, tmp_path)
    del hub.files[FILENAME]
    with pytest.raises(EngineInputError, match=r"refused wanglab/MedSAM2/MedSAM2_latest\.pt \(HTTP 404\)"):
        fetch_known(NAME, tmp_path)
    assert not (tmp_path / FILENAME).exists()


def test_known_checkpoints_registry():
    assert "MedSAM2_latest" in KNOWN_CHECKPOINTS
    for c in KNOWN_CHECKPOINTS.values():
        assert c.repo_id == "wanglab/MedSAM2" and c.filename == c.name + ".pt"
    with pytest.raises(EngineInputError, match="Unknown checkpoint"):
        fetch_known("SAM3")
    with pytest.raises(EngineInputError, match="Updating applies to known checkpoint names"):
        resolve(__file__, update=True)


def test_a_known_name_loads_the_downloaded_checkpoint_and_says_where_from(hub, sam2_model, tmp_path, monkeypatch):
    path = tmp_path / "src.pt"
    torch.save({"model": sam2_model.predictor.state_dict()}, path)
    hub.files[FILENAME] = path.read_bytes()
    monkeypatch.setenv("MEDSAM2_CACHE", str(tmp_path / "cache"))
    m = load_model(NAME, kernels="torch")
    described = m.describe()
    assert described["checkpoint"] == FILENAME and described["checkpoint_revision"] == COMMIT
    assert described["checkpoint_sha256"] == sha256_of(path) and described["checkpoint_source"] == "wanglab/MedSAM2"
    assert not m.random_weights and (tmp_path / "cache" / FILENAME).is_file()
    first = next(iter(sam2_model.predictor.state_dict()))
    assert torch.equal(m.predictor.state_dict()[first], sam2_model.predictor.state_dict()[first])


def _server(env_updates, *args):
    env = dict(os.environ, **env_updates)
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "medsam2_backend.server.cli", "--checkpoint", NAME, "--port", "9",
                        *args], capture_output=True, encoding="utf-8", errors="replace", timeout=60, env=env)
    return r, time.monotonic() - started


def test_the_server_fails_offline_with_one_sentence_about_the_network(tmp_path):
    r, seconds = _server({"HF_ENDPOINT": closed_port_url(), "MEDSAM2_CACHE": str(tmp_path)})
    assert r.returncode == 2 and seconds < 15
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medsam2-server: Cannot reach the Hugging Face Hub"), r.stderr
    r, _ = _server({"HF_HUB_OFFLINE": "1", "MEDSAM2_CACHE": str(tmp_path)})
    assert r.returncode == 2 and "HF_HUB_OFFLINE is set" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_server_refuses_a_replaced_cached_checkpoint(hub, tmp_path):
    path = fetch_known(NAME, tmp_path).path
    path.write_bytes(b"tampered")
    r, _ = _server({"MEDSAM2_CACHE": str(tmp_path), "HF_ENDPOINT": closed_port_url()})
    assert r.returncode == 2 and "does not match the SHA-256 recorded" in r.stderr
    r, _ = _server({}, "--random-weights")
    assert r.returncode == 2 and "exactly one of" in r.stderr
    r = subprocess.run([sys.executable, "-m", "medsam2_backend.server.cli", "--random-weights", "--update-checkpoint"],
                       capture_output=True, encoding="utf-8", errors="replace", timeout=60)
    assert r.returncode == 2 and "--update-checkpoint goes with --checkpoint" in r.stderr


def test_a_medsam2_shaped_checkpoint_loads_strictly(sam2_model, tmp_path):
    path = tmp_path / "MedSAM2_test.pt"
    state = sam2_model.predictor.state_dict()  # once: each call unpacks every oneDNN-packed weight
    torch.save({"model": state}, path)
    m = load_model(path)
    assert not m.random_weights and m.checkpoint_name == "MedSAM2_test.pt" and m.checkpoint_sha256 == sha256_of(path)
    assert m.checkpoint_revision is None  # a file the user gave: its hash, no Hub revision
    loaded = m.predictor.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    assert sorted(loaded) == sorted(state) and len(state) == 471


def test_wrong_checkpoints_are_named(tmp_path):
    sd = load_model(random_weights=True).predictor.state_dict()
    wrong_shape = dict(sd)
    wrong_shape["image_encoder.trunk.pos_embed"] = torch.zeros(1, 96, 14, 14)
    missing = {k: v for k, v in sd.items() if not k.startswith("memory_attention.")}
    cases = {"shape.pt": {"model": wrong_shape}, "missing.pt": {"model": missing}, "list.pt": [1, 2]}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
    with pytest.raises(EngineInputError, match=r"shape\.pt does not fit .* 1 with a different shape"):
        load_model(tmp_path / "shape.pt")
    with pytest.raises(EngineInputError, match=r"missing\.pt does not fit .* missing"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(EngineInputError, match="holds no model weights"):
        load_model(tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(EngineInputError, match="not a readable PyTorch checkpoint"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(EngineInputError, match="not found"):
        load_model(tmp_path / "nope.pt")


def test_medsam2_segment_demo_uses_the_default_checkpoint_or_falls_back_loudly(hub, tmp_path, monkeypatch, capsys):
    from medsam2_backend import cli

    chosen = []

    def record_choice(args):  # stands in for the segmentation itself: only the model chosen is looked at
        chosen.append((args.checkpoint, args.random_weights))
        raise EngineInputError("stop here.")

    monkeypatch.setattr(cli, "_segment", record_choice)
    monkeypatch.setenv("MEDSAM2_CACHE", str(tmp_path / "cache"))
    assert cli.main(["demo", "--out", str(tmp_path / "out")]) == 2
    assert chosen[-1] == (str(tmp_path / "cache" / FILENAME), False)
    monkeypatch.setenv("MEDSAM2_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    assert cli.main(["demo", "--out", str(tmp_path / "out")]) == 2
    assert chosen[-1] == (None, True) and "RANDOM WEIGHTS" in capsys.readouterr().err
    assert cli.main(["segment", __file__, "--checkpoint", NAME]) == 2  # only the demo falls back
    assert chosen[-1] == (NAME, False)
