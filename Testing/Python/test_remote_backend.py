"""The Slicer side through the real network path: `LocalServer` starts `medsam2-server --test-engine`, the logic
talks to it with `MedSAM2Client`, and the masks land on exactly the voxels the deterministic engine gives."""

import socket
import sys
import threading
import venv

import numpy as np
import pytest
import slicer

from medsam2_backend.engine.test_engine import disk, shrink_mask
from MedSAM2SlicerLib import scenarios
from MedSAM2SlicerLib.controller import MedSAM2ActionError
from MedSAM2SlicerLib.local_backend import LocalServer, LocalServerError
from MedSAM2SlicerLib.logic import MedSAM2SlicerLogic, describe_capabilities


@pytest.fixture(scope="module")
def server():
    local = LocalServer(test_engine=True, ready_timeout=60)
    local.start()
    yield local
    local.stop()


class CuttingProxy:
    """A TCP proxy to the server that cuts a propagation's answer after `limit` bytes: a connection lost mid-way."""

    def __init__(self, target_port: int, limit: int):
        self.target_port, self.limit = target_port, limit
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        request = client.recv(65536)
        upstream.sendall(request)
        limit = self.limit if b"/propagate" in request else None
        threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
        self._pump(upstream, client, limit)

    @staticmethod
    def _pump(source, sink, limit):
        sent = 0
        try:
            while limit is None or sent < limit:
                data = source.recv(65536 if limit is None else min(65536, limit - sent))
                if not data:
                    break
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.listener.close()


def test_local_server_answers_with_capabilities_and_a_token(server):
    logic = MedSAM2SlicerLogic()
    logic.connect(url=server.url, token=server.token)
    text = describe_capabilities(logic.capabilities())
    assert "Model: deterministic test engine" in text and "Checkpoint: none" in text and "WARNING" not in text
    logic.connect(url=server.url, token="wrong")
    with pytest.raises(MedSAM2ActionError, match="did not answer"):
        logic.capabilities()


@pytest.mark.parametrize("view", ["axial", "coronal"])
def test_box_through_the_server_lands_on_exactly_its_voxels_in_an_oblique_flipped_volume(mrml, server, view):
    scenarios.box_round_trip({"url": server.url, "token": server.token}, view)


def test_propagation_through_the_server_and_its_least_certain_slices(mrml, server):
    volume = scenarios.add_volume(shape_kji=(12, 32, 32), ijk_to_ras=np.diag([1.0, 1.0, 2.0, 1.0]))
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = MedSAM2SlicerLogic()
    logic.connect(url=server.url, token=server.token)
    segment_id = logic.segment(volume, segmentation, points_ras=[[16.0, 15.0, 10.0]], labels=[1], propagate=False)
    outcome = logic.propagate(volume, segmentation, segment_id, direction="both")
    on_prompt = disk((32, 32), 16, 15, 10)  # the server's test engine: radius 10, shrink 1 px per slice
    expected = np.stack([shrink_mask(on_prompt, abs(k - 5)) for k in range(12)])
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume), expected)
    assert outcome.slices_written == 12 and not outcome.cancelled
    assert outcome.least_certain[0].slice_index == 11  # the farthest from the prompt
    np.testing.assert_allclose(outcome.least_certain[0].center_ras, [15.5, 15.5, 22.0])
    logic.close()


def test_a_connection_lost_mid_propagation_keeps_what_arrived_as_one_undo_step(mrml, server):
    port = int(server.url.rsplit(":", 1)[1])
    proxy = CuttingProxy(port, limit=700)  # of ~1550: the HTTP head, the start frame and a few slices
    volume = scenarios.add_volume(shape_kji=(12, 32, 32), ijk_to_ras=np.diag([1.0, 1.0, 2.0, 1.0]))
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = MedSAM2SlicerLogic()
    logic.connect(url=proxy.url, token=server.token)
    try:
        segment_id = logic.segment(volume, segmentation, points_ras=[[16.0, 15.0, 0.0]], labels=[1],
                                   propagate=False)
        after_prompt = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume).copy()
        with pytest.raises(MedSAM2ActionError) as info:
            logic.propagate(volume, segmentation, segment_id, direction="forward")
    finally:
        proxy.close()
    written = info.value.slices_written
    assert 0 < written < 12
    message = str(info.value)
    assert message.startswith("Propagation failed: ") and f"The {written} slice(s) written" in message
    assert "Undo removes them in one step" in message and f"server at {proxy.url}" in message
    got = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
    on_prompt = disk((32, 32), 16, 15, 10)
    for k in range(12):  # the slices that arrived are exact; nothing after them was written
        assert np.array_equal(got[k], shrink_mask(on_prompt, k) if k < written else 0 * got[k]), k
    logic.undo(segmentation)
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume), after_prompt)


def test_local_server_failure_shows_the_logs_reason_and_stop_kills_it(tmp_path):
    missing = tmp_path / "no_such_checkpoint.pt"
    with pytest.raises(LocalServerError, match="did not start: it exited with code 2") as info:
        LocalServer(str(missing), ready_timeout=60).start()
    assert str(missing) in str(info.value)  # the server's own sentence, from its log
    local = LocalServer(test_engine=True, ready_timeout=60)
    local.start()
    process, log = local.process, local.log_path
    local.stop()
    assert process.poll() is not None and not log.exists() and not local.running


def test_a_python_without_the_backend_gets_the_install_line(tmp_path):
    bare = tmp_path / "bare"
    venv.EnvBuilder(with_pip=False).create(bare)
    with pytest.raises(LocalServerError, match=r"pip install .*medsam2-slicer-backend") as info:
        LocalServer(test_engine=True, python=str(bare / "bin" / "python"), ready_timeout=30).start()
    assert "slicer.util.pip_install(" in str(info.value) and sys.executable not in str(info.value)
