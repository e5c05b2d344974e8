"""The default model on first start, from the Slicer side: the panel's Start, `make demo`'s fallback, the panel text.

No test touches the internet: the Hub is a closed port on 127.0.0.1 (`HF_ENDPOINT`), or offline mode.
"""

import dataclasses
import socket
import time

import pytest

from MedSAM2SlicerLib import demo
from MedSAM2SlicerLib.controller import MedSAM2ActionError
from MedSAM2SlicerLib.logic import MedSAM2SlicerLogic, describe_capabilities


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once the socket is closed
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("MEDSAM2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")  # no agent-registry request, here or in the server
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return url


def test_make_demo_falls_back_to_random_weights_loudly_within_seconds(unreachable_hub):
    told = []
    started = time.monotonic()
    assert demo.demo_checkpoint(log=told.append) is None
    assert time.monotonic() - started < 10
    assert len(told) == 1 and "Cannot reach the Hugging Face Hub" in told[0] and "RANDOM WEIGHTS" in told[0]
    assert told[0].startswith("!" * 100)


def test_make_demo_never_falls_back_on_a_checkpoint_that_fails_its_hash(unreachable_hub, tmp_path, capsys):
    import json

    from medsam2_backend.engine.checkpoints import record_path

    cached = tmp_path / "cache" / "MedSAM2_latest.pt"
    cached.parent.mkdir()
    cached.write_bytes(b"replaced weights")
    record_path(cached).write_text(json.dumps({"sha256": "0" * 64, "revision": "a" * 40}))
    assert demo.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"demo: {cached} does not match the SHA-256 recorded") and "RANDOM" not in err
    assert not (tmp_path / "out").exists()


def test_the_panels_start_with_a_known_name_fails_offline_with_the_network_sentence(unreachable_hub):
    logic = MedSAM2SlicerLogic()
    started = time.monotonic()
    with pytest.raises(MedSAM2ActionError) as caught:
        logic.start_local_server("MedSAM2_latest", device="cpu")
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert "exited with code 2" in message
    assert f"medsam2-server: Cannot reach the Hugging Face Hub at {unreachable_hub} to download MedSAM2_latest.pt" \
        in message and "check the internet connection" in message
    assert logic.controller is None and logic.local_server is None


def test_the_panel_shows_where_the_checkpoint_came_from_and_its_hash(sam2_model_described):
    text = describe_capabilities(sam2_model_described)
    line = next(x for x in text.splitlines() if x.startswith("Checkpoint:"))
    assert line == ("Checkpoint: MedSAM2_latest.pt from wanglab/MedSAM2 at commit 0123456789ab, SHA-256 " + "f" * 64)
    assert "WARNING" not in text


@pytest.fixture
def sam2_model_described():
    """`/capabilities` of a real server app around a SAM-2 engine whose model came from the Hub."""
    from fastapi.testclient import TestClient

    from medsam2_backend.engine.model import load_model
    from medsam2_backend.engine.sam2_engine import Sam2Engine
    from medsam2_backend.server.app import make_app
    from medsam2_client import protocol

    model = dataclasses.replace(load_model(random_weights=True, kernels="torch"), checkpoint_name="MedSAM2_latest.pt",
                                checkpoint_sha256="f" * 64, checkpoint_revision="0123456789abcdef" * 2 + "01234567",
                                checkpoint_source="wanglab/MedSAM2")
    with TestClient(make_app(Sam2Engine(model)), base_url="http://127.0.0.1") as http:  # a loopback Host
        capabilities = http.get(protocol.CAPABILITIES, headers={protocol.PROTOCOL_HEADER: str(protocol.PROTOCOL_VERSION)}).json()
    assert capabilities["engine"]["checkpoint_revision"].startswith("0123456789ab")
    return capabilities
