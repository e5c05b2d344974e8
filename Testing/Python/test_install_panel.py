"""The module panel's thin install dialog (MedSAM2Slicer.py) against strict stand-ins for `slicer.util`'s dialogs:
one confirmation with the plan, a progress dialog per step, one sentence per failure, the device afterwards."""

import sys
import types

import pytest
import slicer

from test_gui_and_packaging import gui_stubs  # noqa: F401  (the qt/ctk/slicer.app stand-ins, a fixture)
from test_install import BARE, READY, World


class ProgressDialog:
    """The QProgressDialog properties the panel sets and reads (PythonQt exposes Q_PROPERTYs as attributes)."""
    __slots__ = ("value", "labelText", "wasCanceled", "closed", "labels")

    def __init__(self):
        self.value, self.labelText, self.wasCanceled, self.closed, self.labels = 0, "", False, False, []

    def close(self):
        self.closed = True


@pytest.fixture
def panel(gui_stubs, monkeypatch):  # noqa: F811
    import MedSAM2Slicer
    from MedSAM2SlicerLib import install

    shown = types.SimpleNamespace(confirm=[], errors=[], infos=[], answer=True, dialog=ProgressDialog())

    def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
        shown.confirm.append(text)
        return shown.answer

    def createProgressDialog(parent=None, value=0, maximum=100, labelText="", windowTitle="Processing...", **kw):
        shown.dialog.labelText, shown.maximum = labelText, maximum
        return shown.dialog

    for name, function in {"confirmOkCancelDisplay": confirmOkCancelDisplay,
                           "createProgressDialog": createProgressDialog,
                           "errorDisplay": lambda text, windowTitle=None, **kw: shown.errors.append(text),
                           "infoDisplay": lambda text, windowTitle=None, **kw: shown.infos.append(text)}.items():
        monkeypatch.setattr(slicer.util, name, function, raising=False)
    monkeypatch.setattr(slicer.app, "processEvents", lambda: shown.dialog.labels.append(shown.dialog.labelText),
                        raising=False)
    monkeypatch.setattr(install, "probe_torch", lambda python=None: {"torch": "2.6.0", "cuda_build": "12.4",
                                                                      "cuda_available": True, "cuda_device": "RTX"})
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in Slicer before MedSAM2: torch never imported
    widget = MedSAM2Slicer.MedSAM2SlicerWidget.__new__(MedSAM2Slicer.MedSAM2SlicerWidget)
    widget.status = []
    widget.panelSettings = lambda: {"python": ""}
    widget.showStatus = lambda text, log=None: widget.status.append(text)

    def use(world, pytorch=True):
        world_installer = install.BackendInstaller(world.pip_install, world.pytorch_utils() if pytorch else None,
                                                   backend_dir=install.shipped_backend_dir(
                                                       MedSAM2Slicer.__file__.rsplit("/", 1)[0]),
                                                   versions=world.versions)
        widget.backendInstaller = lambda: world_installer
        return world

    return widget, shown, use


def test_ready_backend_starts_without_a_dialog(panel):
    widget, shown, use = panel
    use(World(READY))
    assert widget.ensureBackendInstalled() is True and shown.confirm == []


def test_one_dialog_then_each_step_with_progress_then_the_device(panel):
    widget, shown, use = panel
    world = use(World(BARE))
    assert widget.ensureBackendInstalled() is True
    assert len(shown.confirm) == 1 and "Download: about" in shown.confirm[0] and "PyTorch >=2.5.1" in shown.confirm[0]
    assert shown.maximum == 4 and shown.dialog.closed
    assert [label.split(":")[0] for label in shown.dialog.labels] == [
        "Step 1 of 4", "Step 2 of 4", "Step 3 of 4", "Step 4 of 4", "Step 4 of 4"]
    assert [kind for kind, _ in world.requests] == ["installTorch", "pip", "pip", "pip"]
    assert shown.infos == ["MedSAM2 is installed.\nDevice: CUDA GPU RTX. PyTorch 2.6.0, CUDA 12.4 build."]


def test_an_older_torch_already_imported_asks_for_a_restart(panel, monkeypatch):
    widget, shown, use = panel
    use(World(dict(READY, torch="2.4.0")))
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))  # the old one is loaded in this process
    assert widget.ensureBackendInstalled() is False
    assert shown.infos == ["PyTorch was updated: restart Slicer, then press Start again."]
    assert widget.status == ["Restart Slicer to use the new PyTorch."]


def test_declined_installs_nothing_and_says_what_to_do(panel):
    widget, shown, use = panel
    shown.answer = False
    world = use(World(BARE))
    assert widget.ensureBackendInstalled() is False and world.requests == []
    assert widget.status == ["MedSAM2 is not installed. Start again to install it, or connect to a remote server."]


def test_a_failure_is_one_sentence_in_a_dialog_and_the_status(panel):
    widget, shown, use = panel
    use(World(BARE, fail="sam2=="))
    assert widget.ensureBackendInstalled() is False
    assert shown.errors == widget.status and shown.errors[0].startswith("Installing SAM-2 failed (pip exit code 1)")
    assert shown.dialog.closed and shown.infos == []


def test_cancel_stops_between_steps(panel):
    widget, shown, use = panel
    world = use(World(BARE))
    original = world.pip_install

    def pip_then_cancel(requirements):
        original(requirements)
        shown.dialog.wasCanceled = True  # the user clicked Cancel while this step ran

    world.pip_install = pip_then_cancel
    widget.backendInstaller().pip_install = pip_then_cancel
    assert widget.ensureBackendInstalled() is False
    assert [kind for kind, _ in world.requests] == ["installTorch", "pip"]
    assert widget.status == ["Install cancelled; what was installed stays. Start again to continue."]


def test_another_python_is_left_to_its_owner(panel):
    widget, shown, use = panel
    use(World(BARE))
    widget.panelSettings = lambda: {"python": "/opt/py/bin/python"}
    assert widget.ensureBackendInstalled() is True and shown.confirm == []


def test_check_prints_and_shows_the_report(panel, monkeypatch, capsys):
    import contextlib

    widget, shown, use = panel
    logs = []
    widget.logic = types.SimpleNamespace(local_server=types.SimpleNamespace(log_tail=lambda lines: "INFO ready"))
    widget.showStatus = lambda text, log=None: logs.append((text, log))
    monkeypatch.setattr(slicer.util, "WaitCursor", contextlib.nullcontext, raising=False)
    monkeypatch.setattr(slicer.app, "applicationVersion", "5.10.0", raising=False)
    clipboard = []
    board = types.SimpleNamespace(setText=clipboard.append)
    monkeypatch.setattr(sys.modules["qt"], "QApplication",
                        types.SimpleNamespace(clipboard=lambda: board), raising=False)
    widget.onCheckInstallation()
    printed = capsys.readouterr().out
    assert "Slicer: 5.10.0" in printed and "torch: 2.6.0" in printed and "  INFO ready" in printed
    text, log = logs[-1]
    assert text.startswith("Device: CUDA GPU RTX.") and log == printed.rstrip("\n") == clipboard[0]
