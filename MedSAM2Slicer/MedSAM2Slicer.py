"""MedSAM2Slicer module: the connection panel, and the registration of the MedSAM2 Segment Editor effect.

The work happens in `MedSAM2SlicerLib` (Qt-free); this file only wires widgets to `MedSAM2SlicerLogic`.
"""

import os

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)

from MedSAM2SlicerLib.controller import MedSAM2ActionError
from MedSAM2SlicerLib.logic import MedSAM2SlicerLogic, shared_logic

__all__ = ["MedSAM2Slicer", "MedSAM2SlicerLogic", "MedSAM2SlicerTest", "MedSAM2SlicerWidget"]

EFFECT_SOURCE = os.path.join(os.path.dirname(__file__), "MedSAM2SlicerLib", "SegmentEditorEffect.py")
CT_PRESETS = ("", "soft_tissue", "lung", "bone", "brain", "abdomen")  # "" = MR/other (percentile scaling)


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
    """Register the effect with the Segment Editor (the file's base name must equal its class name)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    instance.setPythonSource(EFFECT_SOURCE.replace("\\", "/"))
    instance.self().register()


class MedSAM2SlicerWidget(ScriptedLoadableModuleWidget):
    """Connection and preprocessing settings; segmentation itself happens in the Segment Editor effect."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        panel = slicer.util.loadUI(self.resourcePath("UI/MedSAM2Slicer.ui"))
        self.layout.addWidget(panel)
        self.ui = slicer.util.childWidgetVariables(panel)
        self.logic = shared_logic()
        self.ui.ctPresetComboBox.addItems(list(CT_PRESETS))
        self.ui.connectButton.connect("clicked()", self.onConnect)
        self.ui.ctPresetComboBox.connect("currentIndexChanged(int)", self.onPreprocessingChanged)
        self.layout.addStretch(1)

    def onConnect(self):
        url = self.ui.serverUrlLineEdit.text.strip()
        checkpoint = self.ui.checkpointLineEdit.text.strip()
        try:
            if url:
                info = self.logic.connect(url=url, token=self.ui.tokenLineEdit.text or None)
            else:
                info = self.logic.connect(checkpoint=checkpoint or "MedSAM2_latest.pt")
        except (MedSAM2ActionError, OSError, ImportError, ValueError) as error:
            self.ui.statusLabel.text = f"Not connected: {error}"
            return
        self.ui.statusLabel.text = f"Connected ({info.kind}): {info.description}"

    def onPreprocessingChanged(self, index):
        preset = CT_PRESETS[index] if 0 <= index < len(CT_PRESETS) else ""
        self.logic.set_preprocessing({"preset": preset} if preset else None)


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
