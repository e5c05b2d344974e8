"""MedSAM2Slicer module: the backend panel, and the registration of the MedSAM2 Segment Editor effect.

The work happens in `MedSAM2SlicerLib` (Qt-free); this file only wires widgets to `MedSAM2SlicerLogic`.
"""

import os

import qt
import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)

from MedSAM2SlicerLib import panel_settings
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
        self.layout.addStretch(1)
        self.onBackendChanged()
        self.onPreprocessingChanged()

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
        options = panel_settings.local_server_options(self.panelSettings())
        self.showStatus("Starting the local MedSAM2 server (loading the model)...")
        try:
            info = self.logic.start_local_server(waiting=slicer.app.processEvents, **options)
        except MedSAM2ActionError as error:
            self.showStatus("The local server did not start; its log is below.", log=str(error))
            return
        self.showStatus(f"Connected ({info.kind}): {info.description}")
        self.onTestConnection()

    def onStopLocalServer(self):
        self.logic.close()
        self.showStatus("Local server stopped. Not connected.")

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
        self.showChoices(panel_settings.choices_from_capabilities(capabilities))
        self.showStatus(f"Connected ({self.logic.connection.kind}).\n{describe_capabilities(capabilities)}")

    def showChoices(self, choices):
        """Refill the lists with what the backend reports, keeping each current choice where it still exists."""
        for combo, items in ((self.ui.ctPresetComboBox, choices["ct_presets"]),
                             (self.ui.precisionComboBox, choices["precisions"])):
            current = combo.currentText
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(list(items))
            combo.currentText = current if current in items else items[0]
            combo.blockSignals(False)

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
        """Copy the window/level of the volume in the red view (its voxels are untouched) into level/width."""
        slice_widget = slicer.app.layoutManager().sliceWidget("Red")  # None when the layout has no red view
        volume = slice_widget.sliceLogic().GetBackgroundLayer().GetVolumeNode() if slice_widget else None
        window = panel_settings.display_window(volume)
        if window is None:
            self.showStatus("Show a volume in the red slice view to use its display window.")
            return
        self.ui.windowLevelSpinBox.value, self.ui.windowWidthSpinBox.value = window
        self.ui.intensityModeComboBox.currentIndex = list(panel_settings.INTENSITY_MODES).index("ct_window")
        self.onPreprocessingChanged()

    def cleanup(self):
        self.logic.close()  # stops a local server this panel started


class MedSAM2SlicerTest(ScriptedLoadableModuleTest):
    """Runs the same end-to-end scenarios as the pytest suite, inside the app."""

    def runTest(self):
        from MedSAM2SlicerLib import scenarios

        try:
            from medsam2_backend.engine import DiskEngine
        except ImportError:
            self.delayDisplay("medsam2_backend is not installed in Slicer's Python: nothing to run")
            return
        for scenario in scenarios.ALL:
            slicer.mrmlScene.Clear(0)
            scenario(DiskEngine(radius=6, shrink=1))
            self.delayDisplay(f"{scenario.__name__} passed")
