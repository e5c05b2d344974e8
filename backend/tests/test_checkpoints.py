"""Checkpoint loading (strict, named errors) and the SHA-256-verified download, against a local HTTP server."""

import hashlib
import http.server
import threading

import pytest
import torch

from medsam2_backend.engine import EngineInputError
from medsam2_backend.engine.checkpoints import KNOWN_CHECKPOINTS, download, fetch_known, sha256_of
from medsam2_backend.engine.model import load_model

PAYLOAD = b"not really a checkpoint, but bytes with a known hash\n" * 1000


@pytest.fixture(scope="module")
def http_url():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/weights.pt":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_verifies_and_reuses(http_url, tmp_path):
    good = hashlib.sha256(PAYLOAD).hexdigest()
    path = download(http_url + "/weights.pt", tmp_path / "w.pt", good)
    assert path.read_bytes() == PAYLOAD
    mtime = path.stat().st_mtime_ns
    assert download(http_url + "/weights.pt", tmp_path / "w.pt", good).stat().st_mtime_ns == mtime


def test_download_with_wrong_hash_leaves_nothing(http_url, tmp_path):
    with pytest.raises(EngineInputError, match="corrupt or not the expected file"):
        download(http_url + "/weights.pt", tmp_path / "w.pt", "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_unverifiable_download_needs_explicit_trust_then_pins_the_hash(http_url, tmp_path):
    with pytest.raises(EngineInputError, match="cannot be verified"):
        download(http_url + "/weights.pt", tmp_path / "w.pt", None)
    path = download(http_url + "/weights.pt", tmp_path / "w.pt", None, trust_on_first_use=True)
    assert (tmp_path / "w.pt.sha256").read_text().strip() == hashlib.sha256(PAYLOAD).hexdigest()
    path.write_bytes(b"tampered")  # a later change to the file is caught by the pinned hash and replaced
    assert download(http_url + "/weights.pt", path, None).read_bytes() == PAYLOAD
    path.write_bytes(b"tampered")
    with pytest.raises(EngineInputError, match="Could not download"):
        download(http_url + "/missing.pt", path, None)
    assert not path.exists(), "a file that fails its pinned hash is never left for loading"


def test_unreachable_server_is_a_clear_error(tmp_path):
    with pytest.raises(EngineInputError, match="Could not download"):
        download("http://127.0.0.1:9/x.pt", tmp_path / "x.pt", "0" * 64, timeout=2)


def test_known_checkpoints_registry():
    assert "MedSAM2_latest" in KNOWN_CHECKPOINTS
    for c in KNOWN_CHECKPOINTS.values():
        assert c.url.startswith("https://") and c.url.endswith(c.filename)
    with pytest.raises(EngineInputError, match="Unknown checkpoint"):
        fetch_known("SAM3")


def test_a_medsam2_shaped_checkpoint_loads_strictly(tmp_path):
    src = load_model(random_weights=True, seed=3)
    path = tmp_path / "MedSAM2_test.pt"
    saved = src.predictor.state_dict()  # once: each call unpacks every oneDNN-packed weight
    torch.save({"model": saved}, path)
    m = load_model(path)
    assert not m.random_weights and m.checkpoint_name == "MedSAM2_test.pt" and m.checkpoint_sha256 == sha256_of(path)
    loaded = m.predictor.state_dict()
    assert sorted(loaded) == sorted(saved) and len(saved) == 471
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k


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
