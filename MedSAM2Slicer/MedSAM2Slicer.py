"""MedSAM2Slicer module: the backend panel, and the registration of the MedSAM2 Segment Editor effect.

The work happens in `MedSAM2SlicerLib` (Qt-free); this file only wires widgets to `MedSAM2SlicerLogic`.
"""

import os
import sys

import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)

from MedSAM2SlicerLib import install, panel_settings, volume_settings
from MedSAM2SlicerLib.controller import MedSAM2ActionError
from MedSAM2SlicerLib.logic import MedSAM2SlicerLogic, describe_capabilities, shared_logic

__all__ = ["MedSAM2Slicer", "MedSAM2SlicerLogic", "MedSAM2SlicerTest", "MedSAM2SlicerWidget"]

BACKENDS = {"local": "Local (a server on this computer)", "remote": "Remote server"}


class MedSAM2Slicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "MedSAM2"
        parent.categories = ["Segmentation"]
        parent.dependencies = ["Segmentations"]
        parent.contributors = ["MedSAM2Slicer contributors"]
        parent.helpText = ("Interactive 3D segmentation with MedSAM2 (SAM-2). Connect here, then use the "
                           "'MedSAM2' effect in the Segment Editor: click or drag a box on a slice, then propagate.")
        parent.acknowledgementText = "Uses SAM-2 (Meta, Apache-2.0) and MedSAM2 checkpoints (CC-BY-SA-4.0)."
        slicer.app.connect("startupCompleted()", register_effect)
        slicer.app.connect("startupCompleted()", watch_scene)


def watch_scene():
    """Close Scene and node removal drop the sessions and prompts of the nodes gone (MRML reuses node ids)."""
    shared_logic().watch_scene(slicer.mrmlScene)


def register_effect():
    """Register the effect with the Segment Editor (see `SegmentEditorMedSAM2Lib` for how Slicer finds its class)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    # As SegmentEditorExtraEffects: the effect file's folder names the package Slicer imports it from.
    path = os.path.join(os.path.dirname(__file__), "SegmentEditorMedSAM2Lib", "SegmentEditorEffect.py")
    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    instance.setPythonSource(path.replace("\\", "/"))
    instance.self().register()


class MedSAM2SlicerWidget(ScriptedLoadableModuleWidget):
    """Backend (local server or remote) and intensity preprocessing; segmenting happens in the Segment Editor."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        panel = slicer.util.loadUI(self.resourcePath("UI/MedSAM2Slicer.ui"))
        self.layout.addWidget(panel)
        self.ui = slicer.util.childWidgetVariables(panel)
        self.logic = shared_logic()
        self.ui.backendComboBox.addItems(list(BACKENDS.values()))
        self.ui.deviceComboBox.addItems(list(panel_settings.DEVICES))
        self.ui.precisionComboBox.addItems(list(panel_settings.PRECISIONS))
        self.ui.intensityModeComboBox.addItems(list(panel_settings.INTENSITY_MODES.values()))
        self.ui.ctPresetComboBox.addItems(list(panel_settings.CT_PRESETS))
        self.loadSettings()
        self.ui.backendComboBox.connect("currentIndexChanged(int)", self.onBackendChanged)
        self.ui.checkpointBrowseButton.connect("clicked()", self.onBrowseCheckpoint)
        self.ui.startServerButton.connect("clicked()", self.onStartLocalServer)
        self.ui.stopServerButton.connect("clicked()", self.onStopLocalServer)
        self.ui.connectButton.connect("clicked()", self.onConnectRemote)
        self.ui.testConnectionButton.connect("clicked()", self.onTestConnection)
        self.ui.displayWindowButton.connect("clicked()", self.onUseDisplayWindow)
        for combo in (self.ui.intensityModeComboBox, self.ui.ctPresetComboBox):
            combo.connect("currentIndexChanged(int)", self.onPreprocessingChanged)
        for spin in (self.ui.windowLevelSpinBox, self.ui.windowWidthSpinBox, self.ui.percentileLowSpinBox,
                     self.ui.percentileHighSpinBox):
            spin.connect("valueChanged(double)", self.onPreprocessingChanged)
        self.setupInstallSection()
        self.layout.addStretch(1)
        self.onBackendChanged()
        self.onPreprocessingChanged()
        self.logic.guard.add_observer(self.onBusyChanged)

    def onBusyChanged(self, busy):
        """While an action runs, Start/Connect would start a second server or close the running session."""
        for button in (self.ui.startServerButton, self.ui.stopServerButton, self.ui.connectButton):
            button.enabled = not busy

    # ---- settings (keys and defaults: panel_settings.SETTINGS_DEFAULTS) ------------------------------------------
    def panelSettings(self) -> dict:
        ui = self.ui
        return {"backend": list(BACKENDS)[max(0, ui.backendComboBox.currentIndex)],
                "checkpoint": ui.checkpointLineEdit.text, "randomWeights": bool(ui.randomWeightsCheckBox.checked),
                "device": ui.deviceComboBox.currentText, "precision": ui.precisionComboBox.currentText,
                "python": ui.pythonLineEdit.text, "serverUrl": ui.serverUrlLineEdit.text.strip(),
                "token": ui.tokenLineEdit.text,
                "intensityMode": list(panel_settings.INTENSITY_MODES)[max(0, ui.intensityModeComboBox.currentIndex)],
                "ctPreset": ui.ctPresetComboBox.currentText, "windowLevel": ui.windowLevelSpinBox.value,
                "windowWidth": ui.windowWidthSpinBox.value, "percentileLow": ui.percentileLowSpinBox.value,
                "percentileHigh": ui.percentileHighSpinBox.value}

    def loadSettings(self):
        stored = qt.QSettings()
        s = {key: panel_settings.typed_setting(key, stored.value(f"{panel_settings.SETTINGS_GROUP}/{key}"))
             for key in panel_settings.SETTINGS_DEFAULTS}
        ui = self.ui
        ui.backendComboBox.currentIndex = list(BACKENDS).index(s["backend"]) if s["backend"] in BACKENDS else 0
        ui.checkpointLineEdit.text, ui.randomWeightsCheckBox.checked = s["checkpoint"], s["randomWeights"]
        ui.deviceComboBox.currentText, ui.precisionComboBox.currentText = s["device"], s["precision"]
        ui.pythonLineEdit.text, ui.serverUrlLineEdit.text = s["python"], s["serverUrl"]
        ui.tokenLineEdit.text = s["token"]
        modes = list(panel_settings.INTENSITY_MODES)
        ui.intensityModeComboBox.currentIndex = modes.index(s["intensityMode"]) if s["intensityMode"] in modes else 0
        ui.ctPresetComboBox.currentText = s["ctPreset"]
        ui.windowLevelSpinBox.value, ui.windowWidthSpinBox.value = s["windowLevel"], s["windowWidth"]
        ui.percentileLowSpinBox.value, ui.percentileHighSpinBox.value = s["percentileLow"], s["percentileHigh"]

    def saveSettings(self):
        stored = qt.QSettings()
        for key, value in self.panelSettings().items():
            stored.setValue(f"{panel_settings.SETTINGS_GROUP}/{key}", value)

    # ---- backend ------------------------------------------------------------------------------------------------
    def onBackendChanged(self, index=None):
        local = self.panelSettings()["backend"] == "local"
        self.ui.localGroupBox.visible, self.ui.remoteGroupBox.visible = local, not local

    def onBrowseCheckpoint(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, "MedSAM2 checkpoint", "", "PyTorch checkpoint (*.pt *.pth)")
        if path:
            self.ui.checkpointLineEdit.text = path

    def onStartLocalServer(self):
        self.saveSettings()
        if not self.ensureBackendInstalled():
            return
        options = panel_settings.local_server_options(self.panelSettings())
        self.showStatus("Starting the local MedSAM2 server (loading the model)...")
        try:
            self.logic.guard.acquire("starting the local server")
        except MedSAM2ActionError as error:  # processEvents below delivers a second click on Start
            self.showStatus(str(error))
            return
        try:
            info = self.logic.start_local_server(waiting=slicer.app.processEvents, **options)
        except MedSAM2ActionError as error:
            self.showStatus("The local server did not start; its log is below.", log=str(error))
            return
        finally:
            self.logic.guard.release()
        self.showStatus(f"Connected ({info.kind}): {info.description}")
        self.onTestConnection()

    def onStopLocalServer(self):
        problems = self.logic.shutdown()
        self.showStatus("Local server stopped. Not connected." + "".join(f"\n{p}" for p in problems))

    def onConnectRemote(self):
        self.saveSettings()
        settings = self.panelSettings()
        try:
            info = self.logic.connect(url=settings["serverUrl"], token=settings["token"] or None)
        except MedSAM2ActionError as error:
            self.showStatus(f"Not connected: {error}")
            return
        self.showStatus(f"Connected ({info.kind}): {info.description}")
        self.onTestConnection()

    def onTestConnection(self):
        if self.logic.connection is None and self.panelSettings()["backend"] == "remote":
            self.onConnectRemote()
            return
        try:
            capabilities = self.logic.capabilities()
        except MedSAM2ActionError as error:
            self.showStatus(str(error))
            return
        self.showChoices(self.logic.choices(capabilities))
        self.showStatus(f"Connected ({self.logic.connection.kind}).\n{describe_capabilities(capabilities)}")

    def showChoices(self, choices):
        """Refill the lists with what the backend reports, keeping each current choice where it still exists."""
        panel_settings.refill_choices(self.ui.ctPresetComboBox, choices["ct_presets"])
        panel_settings.refill_choices(self.ui.precisionComboBox, choices["precisions"])

    def showStatus(self, text, log=None):
        self.ui.statusLabel.text = text
        self.ui.logPlainTextEdit.plainText = log or ""
        self.ui.logPlainTextEdit.visible = bool(log)

    # ---- preprocessing ------------------------------------------------------------------------------------------
    def onPreprocessingChanged(self, *unused):
        settings = self.panelSettings()
        mode = settings["intensityMode"]
        self.ui.ctPresetComboBox.enabled = mode == "ct_preset"
        for widget in (self.ui.windowLevelSpinBox, self.ui.windowWidthSpinBox):
            widget.enabled = mode == "ct_window"
        for widget in (self.ui.percentileLowSpinBox, self.ui.percentileHighSpinBox):
            widget.enabled = mode == "percentiles"
        self.logic.set_preprocessing(panel_settings.preprocessing_options(settings))
        self.saveSettings()

    def onUseDisplayWindow(self):
        """Give the Segment Editor's source volume its own display window as its level/width (voxels untouched).

        Per volume (an attribute saved with the scene): other volumes keep the panel's default. Assumes the Segment
        Editor module's parameter node is the scene's singleton tagged "SegmentEditor" (Slicer's SegmentEditor.py).
        """
        editor = slicer.mrmlScene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
        volume = editor.GetSourceVolumeNode() if editor is not None else None
        preprocessing = volume_settings.use_display_window(volume) if volume is not None else None
        if preprocessing is None:
            self.showStatus("Select a source volume in the Segment Editor to use its display window.")
            return
        self.showStatus(f"{volume.GetName()}: {volume_settings.describe(preprocessing)}, from its display window "
                        "(this volume only, saved with the scene; the others use the settings below).")

    def cleanup(self):
        """At exit: close sessions and stop a local server this panel started, best effort and quickly."""
        self.logic.guard.remove_observer(self.onBusyChanged)
        for problem in self.logic.shutdown():
            print(f"MedSAM2: {problem}")
        if hasattr(self, "checkInstallButton"):
            self.checkInstallButton.disconnect("clicked()", self.onCheckInstallation)

    # ---- guided install (the plan and its sentences: MedSAM2SlicerLib/install.py) ----------------------------------
    def setupInstallSection(self):
        # The Qt-free Lib's sentences through Slicer's translation, under one context of their own.
        install.tr = lambda text: translate("MedSAM2SlicerLib.install", text)
        self.checkInstallButton = qt.QPushButton(_("Check installation"))
        self.checkInstallButton.toolTip = _("Print a report for bug reports (Slicer, Python, PyTorch, CUDA, SAM-2, "
                                            "backend and client versions, free disk, the server's log) and copy it")
        self.checkInstallButton.connect("clicked()", self.onCheckInstallation)
        self.layout.addWidget(self.checkInstallButton)

    @staticmethod
    def backendInstaller() -> install.BackendInstaller:
        try:
            import PyTorchUtils  # the PyTorch extension (an EXTENSION_DEPENDS; absent in a bare Slicer build)
        except ModuleNotFoundError:
            PyTorchUtils = None
        return install.BackendInstaller(slicer.util.pip_install, PyTorchUtils,
                                        install.shipped_backend_dir(os.path.dirname(__file__)))

    def ensureBackendInstalled(self) -> bool:
        """True when the local backend can start; else one dialog offers to install it, and it is installed."""
        if self.panelSettings()["python"]:
            return True  # another Python was chosen: it is its owner's to install
        installer = self.backendInstaller()
        steps = installer.plan()
        if not steps:
            return True
        if not slicer.util.confirmOkCancelDisplay(installer.describe(steps), windowTitle=_("Install MedSAM2")):
            self.showStatus(_("MedSAM2 is not installed. Start again to install it, or connect to a remote server."))
            return False
        dialog = slicer.util.createProgressDialog(maximum=len(steps), windowTitle=_("Installing MedSAM2"),
                                                  labelText=steps[0].title)

        def progress(done, total, title):
            dialog.value, dialog.labelText = done, _("Step {done} of {total}: {title}").format(
                done=min(done + 1, total), total=total, title=title)
            slicer.app.processEvents()  # shows the step and takes a click on Cancel (acted on between steps)

        try:
            outcome = installer.run(steps, progress=progress, cancelled=lambda: dialog.wasCanceled)
        except install.InstallError as error:
            self.showStatus(str(error))
            slicer.util.errorDisplay(str(error), windowTitle=_("MedSAM2 could not be installed"))
            return False
        finally:
            dialog.close()
        if outcome.cancelled:
            self.showStatus(_("Install cancelled; what was installed stays. Start again to continue."))
            return False
        if outcome.restart_required:
            slicer.util.infoDisplay(_("PyTorch was updated: restart Slicer, then press Start again."))
            self.showStatus(_("Restart Slicer to use the new PyTorch."))
            return False
        slicer.util.infoDisplay(_("MedSAM2 is installed.") + "\n" + install.describe_device(install.probe_torch()),
                                windowTitle=_("Install MedSAM2"))
        return True

    def onCheckInstallation(self):
        server = self.logic.local_server
        python = self.panelSettings()["python"] or None
        with slicer.util.WaitCursor():
            info = install.probe_torch(python)
        report = install.installation_report(slicer.app.applicationVersion, info,
                                             server.log_tail(40) if server is not None else "")
        print(report)  # the Python console: select and copy
        qt.QApplication.clipboard().setText(report)
        self.showStatus(install.describe_device(info) + " " + _("The full report is below, in the Python console "
                                                                "and on the clipboard."), log=report)


TEST_ENGINE_DIR = os.path.join(os.path.dirname(__file__), "MedSAM2SlicerTesting")


def self_test_engine_class():
    """The deterministic DiskEngine (numpy, scipy and Pillow: all in Slicer's own Python), so the self-test runs in a
    stock Slicer: from an installed or source-checkout backend, else from the copy the extension ships for this
    test only (CMakeLists.txt: MedSAM2SlicerTesting/), appended to sys.path so it never shadows a real backend."""
    try:
        from medsam2_backend.engine import DiskEngine
    except ImportError:
        if TEST_ENGINE_DIR not in sys.path:
            sys.path.append(TEST_ENGINE_DIR)
        from medsam2_backend.engine import DiskEngine
    return DiskEngine


class MedSAM2SlicerTest(ScriptedLoadableModuleTest):
    """The pytest suite's end-to-end scenarios, then the real effect in a real Segment Editor widget: a click and a
    drag on the red slice view's interactor, Propagate, Undo. Needs the app (Qt widgets, views); pytest runs the
    scenarios headless and the effect against strict stand-ins."""

    def runTest(self):
        engine_class = self_test_engine_class()
        self.test_scenarios(engine_class)
        self.test_effect_in_the_segment_editor(engine_class(radius=6, shrink=1))

    def test_scenarios(self, engine_class):
        from MedSAM2SlicerLib import scenarios

        for scenario in scenarios.ALL:
            slicer.mrmlScene.Clear(0)
            # The streaming check counts voxels per slice: its masks must not shrink from slice to slice.
            scenario(engine_class(radius=6, shrink=0 if scenario is scenarios.streaming_costs_one_write else 1))
            self.delayDisplay(f"{scenario.__name__} passed")

    def test_effect_in_the_segment_editor(self, engine):
        import numpy as np

        slicer.mrmlScene.Clear(0)
        logic = shared_logic()
        logic.connect(engine=engine)
        volume = slicer.util.addVolumeFromArray(np.zeros((16, 64, 64), np.int16), name="MedSAM2SelfTest")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segment_id = segmentation.GetSegmentation().AddEmptySegment("self-test")
        widget = slicer.qMRMLSegmentEditorWidget()
        widget.setMRMLScene(slicer.mrmlScene)
        widget.setMRMLSegmentEditorNode(slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode"))
        widget.setSegmentationNode(segmentation)
        widget.setSourceVolumeNode(volume)
        widget.mrmlSegmentEditorNode().SetSelectedSegmentID(segment_id)
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        widget.setupViewObservations()  # as the Segment Editor module does on enter: view events reach effects
        try:
            widget.setActiveEffectByName("MedSAM2")
            effect = widget.activeEffect()
            self.assertIsNotNone(effect, "the MedSAM2 effect is not registered")
            view = slicer.app.layoutManager().sliceWidget("Red").sliceView()
            width, height = view.width, view.height

            def voxels():
                return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)

            def wait():
                while logic.guard.running is not None:  # the effect reads its backend on a worker thread
                    slicer.app.processEvents()

            slicer.util.clickAndDrag(view, start=(width // 2, height // 2), end=(width // 2, height // 2), steps=1)
            wait()
            after_click = voxels()
            self.assertEqual(np.count_nonzero(after_click.any(axis=(1, 2))), 1, "a click writes one slice")
            slicer.util.clickAndDrag(view, start=(width // 3, height // 3), end=(width // 2, height // 2), steps=1)
            wait()
            self.assertGreater(np.count_nonzero(voxels()), np.count_nonzero(after_click), "a drag adds a box")
            before_propagation = voxels()
            effect.self().propagateButton.click()
            wait()
            self.assertGreater(np.count_nonzero(voxels().any(axis=(1, 2))), 1, "propagation fills more slices")
            widget.undo()
            self.assertTrue(np.array_equal(voxels(), before_propagation), "one Undo removes the propagation")
            self.delayDisplay("The MedSAM2 effect: click, box, Propagate and Undo passed")
        finally:
            widget.setActiveEffect(None)
            widget.removeViewObservations()
            logic.close()
