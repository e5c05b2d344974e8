"""The module panel's thin install dialog (MedSAM2Slicer.py) against the strict stand-ins (`slicer_standins`) of
`slicer.util`'s dialogs: one confirmation with the plan, a progress dialog per step, one sentence per failure, the
device afterwards. The panel is the real one, set up as Slicer does (its Check installation button included)."""

import sys
import types

import pytest
import slicer
import slicer_standins as standins
import slicer_util_standins as util_standins
from slicer_standins import fire, gui_stubs  # noqa: F401  (gui_stubs: a fixture)
from slicer_util_standins import Dialogs
from test_install import BARE, READY, World

DEVICE = {"torch": "2.6.0", "cuda_build": "12.4", "cuda_available": True, "cuda_device": "RTX"}


@pytest.fixture
def panel(gui_stubs, monkeypatch):  # noqa: F811
    import MedSAM2Slicer
    from MedSAM2SlicerLib import install

    labels = []  # the progress dialog's label each time the panel lets the app process events
    monkeypatch.setattr(slicer.app, "processEvents",
                        lambda: labels.append(Dialogs.progress[-1].labelText) if Dialogs.progress else None)
    monkeypatch.setattr(install, "probe_torch", lambda python=None: dict(DEVICE))
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in Slicer before MedSAM2: torch never imported
    widget = MedSAM2Slicer.MedSAM2SlicerWidget()
    widget.setup()
    widget.status = []
    show_status = widget.showStatus
    widget.showStatus = lambda text, log=None: (widget.status.append(text), show_status(text, log))

    def use(world, pytorch=True):
        world_installer = install.BackendInstaller(world.pip_install, world.pytorch_utils() if pytorch else None,
                                                   backend_dir=install.shipped_backend_dir(
                                                       MedSAM2Slicer.__file__.rsplit("/", 1)[0]),
                                                   versions=world.versions)
        widget.backendInstaller = lambda: world_installer
        return world

    yield widget, labels, use
    widget.cleanup()


def test_ready_backend_starts_without_a_dialog(panel):
    widget, labels, use = panel
    use(World(READY))
    assert widget.ensureBackendInstalled() is True and Dialogs.confirmations == [] and Dialogs.progress == []


def test_one_dialog_then_each_step_with_progress_then_the_device(panel):
    widget, labels, use = panel
    world = use(World(BARE))
    assert widget.ensureBackendInstalled() is True
    confirm = Dialogs.confirmations
    assert len(confirm) == 1 and "Download: about" in confirm[0] and "PyTorch >=2.5.1" in confirm[0]
    (dialog,) = Dialogs.progress
    assert dialog.maximum == 4 and util_standins.is_closed(dialog)
    assert [label.split(":")[0] for label in labels] == [
        "Step 1 of 4", "Step 2 of 4", "Step 3 of 4", "Step 4 of 4", "Step 4 of 4"]
    assert [kind for kind, _ in world.requests] == ["installTorch", "pip", "pip", "pip"]
    assert Dialogs.infos == ["MedSAM2 is installed.\nDevice: CUDA GPU RTX. PyTorch 2.6.0, CUDA 12.4 build."]


def test_an_older_torch_already_imported_asks_for_a_restart(panel, monkeypatch):
    widget, labels, use = panel
    use(World(dict(READY, torch="2.4.0")))
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))  # the old one is loaded in this process
    assert widget.ensureBackendInstalled() is False
    assert Dialogs.infos == ["PyTorch was updated: restart Slicer, then press Start again."]
    assert widget.status == ["Restart Slicer to use the new PyTorch."]


def test_declined_installs_nothing_and_says_what_to_do(panel):
    widget, labels, use = panel
    Dialogs.answer = False  # the fixture's monkeypatch puts True back
    world = use(World(BARE))
    assert widget.ensureBackendInstalled() is False and world.requests == []
    assert widget.status == ["MedSAM2 is not installed. Start again to install it, or connect to a remote server."]
    assert widget.ui.statusLabel.text == widget.status[-1] and Dialogs.progress == []


def test_a_failure_is_one_sentence_in_a_dialog_and_the_status(panel):
    widget, labels, use = panel
    use(World(BARE, fail="sam2=="))
    assert widget.ensureBackendInstalled() is False
    errors = Dialogs.errors
    assert errors == widget.status and errors[0].startswith("Installing SAM-2 failed (pip exit code 1)")
    assert len(errors) == 1 and "\n" not in errors[0]
    assert util_standins.is_closed(Dialogs.progress[-1]) and Dialogs.infos == []


def test_cancel_stops_between_steps(panel):
    widget, labels, use = panel
    world = use(World(BARE))
    original = world.pip_install

    def pip_then_cancel(requirements):
        original(requirements)
        util_standins.cancel_progress(Dialogs.progress[-1])  # the user clicked Cancel while this step ran

    world.pip_install = pip_then_cancel
    widget.backendInstaller().pip_install = pip_then_cancel
    assert widget.ensureBackendInstalled() is False
    assert [kind for kind, _ in world.requests] == ["installTorch", "pip"]
    assert widget.status == ["Install cancelled; what was installed stays. Start again to continue."]


def test_another_python_is_left_to_its_owner(panel):
    widget, labels, use = panel
    world = use(World(BARE))
    widget.ui.pythonLineEdit.text = "/opt/py/bin/python"
    assert widget.ensureBackendInstalled() is True and Dialogs.confirmations == [] and world.requests == []


def test_check_prints_and_shows_the_report(panel, monkeypatch, capsys):
    import qt
    from MedSAM2SlicerLib import install

    widget, labels, use = panel
    cursors = []  # the override cursors while the probe runs (a subprocess: it can take seconds)
    monkeypatch.setattr(install, "probe_torch", lambda python=None: cursors.append(list(qt.QApplication.cursors))
                        or dict(DEVICE))
    logs = []
    show_status = widget.showStatus
    widget.showStatus = lambda text, log=None: (logs.append((text, log)), show_status(text, log))
    widget.logic.local_server = types.SimpleNamespace(log_tail=lambda lines: "INFO ready")
    slicer.app.applicationVersion = "5.10.1"
    try:
        fire(widget.checkInstallButton, "clicked()")
    finally:
        widget.logic.local_server = None  # nothing to stop at cleanup
    printed = capsys.readouterr().out
    assert "Slicer: 5.10.1" in printed and "torch: 2.6.0" in printed and "  INFO ready" in printed
    assert cursors == [[qt.Qt.WaitCursor]] and qt.QApplication.cursors == []
    text, log = logs[-1]
    assert text.startswith("Device: CUDA GPU RTX.") and log == printed.rstrip("\n") == standins.clipboard_text()
    assert widget.ui.logPlainTextEdit.plainText == log and widget.ui.logPlainTextEdit.visible
