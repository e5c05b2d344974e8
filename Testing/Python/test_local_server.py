"""The module panel and the local server as the Slicer app runs them: errors as sentences, no orphans, clean env.

The server is started for real (`--test-engine`) behind a stand-in of Slicer's PythonSlicer launcher, which (as
CTK's launcher) runs the real Python as a child, lets it inherit stdin and forwards no termination.
"""

import os
import pathlib
import subprocess
import sys
import time

import pytest
import slicer
import slicer_standins as standins
from slicer_standins import fire, gui_stubs  # noqa: F401  (a fixture)

from MedSAM2SlicerLib import local_backend
from MedSAM2SlicerLib.controller import MedSAM2ActionError
from MedSAM2SlicerLib.local_backend import LocalServer, LocalServerError, free_port

LAUNCHER = """
import pathlib, subprocess, sys
child = subprocess.Popen([sys.executable] + sys.argv[2:])  # inherits stdin; SIGTERM is not forwarded
pathlib.Path(sys.argv[1]).write_text(str(child.pid))
sys.exit(child.wait())
"""


@pytest.fixture
def panel(gui_stubs):
    import MedSAM2Slicer

    widget = MedSAM2Slicer.MedSAM2SlicerWidget()
    widget.setup()
    yield widget
    widget.cleanup()


def test_an_address_without_http_is_a_sentence(panel):
    panel.ui.backendComboBox.currentIndex = 1
    panel.ui.serverUrlLineEdit.text = "gpu-host:8765"
    fire(panel.ui.connectButton, "clicked()")
    assert "is not an http:// or https:// URL" in panel.ui.statusLabel.text
    assert panel.logic.controller is None


def test_a_mistyped_python_is_a_sentence(panel):
    panel.ui.pythonLineEdit.text = "/no/such/python3"
    panel.ui.randomWeightsCheckBox.checked = True
    fire(panel.ui.startServerButton, "clicked()")
    assert "did not start" in panel.ui.statusLabel.text
    assert "/no/such/python3" in panel.ui.logPlainTextEdit.plainText and "'Python' setting" in (
        panel.ui.logPlainTextEdit.plainText)
    assert panel.logic.local_server is None


def test_start_pressed_again_while_starting_is_refused(panel, monkeypatch):
    starts, enabled = [], []

    def slow_start(checkpoint=None, *, waiting=None, **options):
        starts.append(options)
        slicer.app.pending_events += [lambda: enabled.append(panel.ui.startServerButton.enabled),
                                      lambda: fire(panel.ui.startServerButton, "clicked()")]
        waiting()  # the panel's processEvents: delivers the second click
        raise MedSAM2ActionError("stopped by the test")

    monkeypatch.setattr(panel.logic, "start_local_server", slow_start)
    fire(panel.ui.startServerButton, "clicked()")
    assert len(starts) == 1 and enabled == [False]
    assert panel.ui.startServerButton.enabled  # usable again afterwards


class RefusingSession:
    """A session on a server that went away: close() fails (after recording the client's timeout then)."""

    def __init__(self, backend, closed):
        self.backend, self.closed = backend, closed

    def close(self):
        from medsam2_client import errors

        self.closed.append(self.backend.connect_timeout)
        raise errors.ConnectionRefused("No MedSAM2 server answers.")


def test_shutdown_at_exit_tries_every_session_with_a_short_timeout_and_never_raises(gui_stubs):
    import MedSAM2Slicer
    from MedSAM2SlicerLib.controller import _OpenSession

    panel = MedSAM2Slicer.MedSAM2SlicerWidget()  # not the fixture's: Slicer calls cleanup once (util.py avoids a
    panel.setup()  # double cleanup on reload), and this test is that call
    panel.logic.connect(url=f"http://127.0.0.1:{free_port()}")
    controller, closed = panel.logic.controller, []
    for axis in (0, 1):
        controller._sessions[("vtkMRMLScalarVolumeNode1", axis)] = _OpenSession(
            "f", axis, RefusingSession(controller.backend, closed), None)
    panel.cleanup()  # the module's cleanup at app exit: no exception
    assert closed == [1.0, 1.0] and panel.logic.controller is None


def _popen_call(monkeypatch, platform, app_environment=None):
    """The arguments LocalServer.start gives Popen on `platform` (Popen itself is replaced: nothing runs)."""
    calls = []

    def recording_popen(args, **kwargs):
        calls.append((args, kwargs))
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(local_backend.sys, "platform", platform)
    monkeypatch.setattr(local_backend.subprocess, "Popen", recording_popen)
    if app_environment is not None:
        monkeypatch.setattr(slicer, "app", standins.SlicerApp(app_environment), raising=False)
    with pytest.raises(LocalServerError, match="could not be started"):
        LocalServer(random_weights=True, python="python3").start()
    return calls[0]


def test_windows_server_gets_no_console_window_and_a_stdin_pipe(monkeypatch):
    monkeypatch.delattr(slicer, "app", raising=False)
    args, kwargs = _popen_call(monkeypatch, "win32")
    assert kwargs["creationflags"] == 0x08000000 and "start_new_session" not in kwargs  # CREATE_NO_WINDOW
    assert kwargs["stdin"] == subprocess.PIPE and "--exit-with-stdin" in args


def test_stop_survives_a_log_that_cannot_be_deleted(monkeypatch):
    """Windows cannot delete a file another process holds open (a server that outlived the kill): stop() must
    not raise for it; the temporary folder is left behind instead."""
    unlink = os.unlink

    def refusing_unlink(path, *args, **kwargs):
        if str(path).endswith("server.log"):
            raise PermissionError(13, "The process cannot access the file", str(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.delattr(slicer, "app", raising=False)
    monkeypatch.setattr(os, "unlink", refusing_unlink)
    _popen_call(monkeypatch, "win32")  # start fails, stop() cleans up: a sentence, not a PermissionError


def test_posix_server_gets_its_own_process_group_and_a_stdin_pipe(monkeypatch):
    monkeypatch.delattr(slicer, "app", raising=False)
    monkeypatch.setenv("MEDSAM2_TEST_MARK", "1")
    args, kwargs = _popen_call(monkeypatch, "linux")
    assert kwargs["start_new_session"] is True and "creationflags" not in kwargs
    assert kwargs["stdin"] == subprocess.PIPE and "--exit-with-stdin" in args
    assert kwargs["env"]["MEDSAM2_TEST_MARK"] == "1"  # outside the app: this process's environment


def test_in_the_app_the_server_gets_slicers_startup_environment(monkeypatch):
    monkeypatch.setenv("PYTHONHOME", "/opt/Slicer/lib/Python")  # what Slicer's launcher adds
    monkeypatch.setenv("PYTHONNOUSERSITE", "1")
    args, kwargs = _popen_call(monkeypatch, "linux", {"PATH": "/usr/bin", "HOME": "/home/user"})
    assert kwargs["env"] == {"PATH": "/usr/bin", "HOME": "/home/user", "TQDM_DISABLE": "1",
                             "PYTHONUNBUFFERED": "1"}


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an orphan's zombie may wait for a reaper)."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_gone(pid: int, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


@pytest.fixture
def launched_server(tmp_path, monkeypatch):
    """A real test-engine server started through the stand-in launcher; yields (server, the real Python's pid)."""
    launcher, pid_file = tmp_path / "PythonSlicer.py", tmp_path / "child.pid"
    launcher.write_text(LAUNCHER)
    monkeypatch.setattr(local_backend, "server_command", lambda python=None: [
        sys.executable, str(launcher), str(pid_file), "-m", "medsam2_backend.server.cli"])
    server = LocalServer(test_engine=True, ready_timeout=120)
    server.start()
    child = int(pid_file.read_text(encoding="utf-8"))
    assert _alive(child) and child != server.process.pid
    yield server, child
    if _alive(child):
        os.kill(child, 9)
    server.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stop_ends_the_server_behind_the_launcher(launched_server):
    server, child = launched_server
    server.stop()
    assert _wait_gone(child, 5.0), "the real server outlived Stop (an orphan holding the model and the port)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_server_exits_when_slicer_goes_away_without_stop(launched_server):
    server, child = launched_server
    server.process.stdin.close()  # what the OS does to the pipe when Slicer exits or crashes
    assert _wait_gone(child), "the server kept running after its parent went away"
    assert server.process.wait(15) is not None


def test_panel_display_window_reads_the_editors_source_volume_and_sets_it_on_that_volume(mrml, panel):
    import numpy as np

    from MedSAM2SlicerLib import volume_settings

    ct = slicer.util.addVolumeFromArray(np.zeros((4, 8, 8), np.int16), name="CT")
    ct.CreateDefaultDisplayNodes()
    ct.GetDisplayNode().AutoWindowLevelOff()
    ct.GetDisplayNode().SetWindowLevel(1500.0, -600.0)
    other = slicer.util.addVolumeFromArray(np.zeros((4, 8, 8), np.int16), name="MR")
    editor_node = slicer.vtkMRMLSegmentEditorNode()
    editor_node.SetSingletonTag("SegmentEditor")  # the Segment Editor module's own parameter node
    mrml.AddNode(editor_node)
    editor_node.SetAndObserveSourceVolumeNode(ct)
    fire(panel.ui.displayWindowButton, "clicked()")
    assert volume_settings.preprocessing_for(ct, None) == {"level": -600.0, "width": 1500.0}
    assert not volume_settings.has_own(other) and panel.ui.statusLabel.text.startswith("CT: CT window -600 / 1500")
    assert panel.logic.preprocessing == {"preset": "soft_tissue"}  # the default for other volumes is unchanged
