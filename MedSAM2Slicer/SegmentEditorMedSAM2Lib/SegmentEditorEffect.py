"""The MedSAM2 Segment Editor effect: click (point) or drag (box) on a slice, then propagate through the volume.

Thin by design: it turns view events into RAS prompts and buttons into calls of the shared `MedSAM2SlicerLogic`
controller; geometry, sessions and writing live in the Qt-free `MedSAM2SlicerLib`.
"""

import os

import numpy as np
import qt
import slicer
import vtk
from medsam2_client.protocol import DIRECTIONS
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from MedSAM2SlicerLib.controller import MedSAM2ActionError
from MedSAM2SlicerLib.logic import shared_logic

__all__ = ["SegmentEditorEffect"]

DRAG_THRESHOLD_PX = 5  # a press and release further apart than this is a box, else a point


class EffectTarget:
    """Writes through the effect, so the Segment Editor's masking, overwrite and undo apply as for any effect."""

    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect
        self.segmentation_node = scriptedEffect.parameterSetNode().GetSegmentationNode()

    def save_state_for_undo(self):
        self.scriptedEffect.saveStateForUndo()

    def reference_geometry(self):
        """The lattice the editor's effects write on (Slicer: qSlicerSegmentEditorAbstractEffect)."""
        return self.scriptedEffect.referenceGeometryImage()

    def modify(self, segment_id, labelmap, mode, extent_ijk):
        # Any segment of this segmentation (a multi-segment propagation writes several). The overload without an
        # extent (PythonQt cannot pass `const int[6]`): the labelmap's own extent, which is `extent_ijk`.
        modes = {"add": slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeAdd,
                 "remove": slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeRemove}
        self.scriptedEffect.modifySegmentByLabelmap(self.segmentation_node, segment_id, labelmap, modes[mode])


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "MedSAM2"  # not translated: modules find effects by name
        scriptedEffect.title = "MedSAM2"
        scriptedEffect.perSegment = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self._press_xy = None
        self._last_slice_view = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = os.path.join(os.path.dirname(__file__), os.pardir, "Resources", "Icons", "MedSAM2Effect.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self):
        return ("<html>Segment with MedSAM2.<p>Click: positive point; Ctrl+click: negative point; drag: box. "
                "Then <b>Propagate</b> through the volume. Connect to a server or model in the MedSAM2 module.")

    def setupOptionsFrame(self):
        self.directionComboBox = qt.QComboBox()
        self.directionComboBox.addItems(list(DIRECTIONS))
        self.scriptedEffect.addLabeledOptionsWidget("Direction:", self.directionComboBox)
        self.rangeStartSpinBox, self.rangeStopSpinBox = (self._slice_spin_box(text) for text in ("first", "last"))
        slice_range = qt.QHBoxLayout()
        slice_range.addWidget(self.rangeStartSpinBox)
        slice_range.addWidget(self.rangeStopSpinBox)
        self.scriptedEffect.addLabeledOptionsWidget("Slices:", slice_range)
        self.stopAfterEmptySpinBox = qt.QSpinBox()
        self.stopAfterEmptySpinBox.setRange(0, 100)
        self.stopAfterEmptySpinBox.specialValueText = "never"
        self.stopAfterEmptySpinBox.toolTip = "Stop a direction after this many empty slices in a row"
        self.scriptedEffect.addLabeledOptionsWidget("Auto-stop after empty:", self.stopAfterEmptySpinBox)
        self.propagateButton = qt.QPushButton("Propagate")
        self.propagateButton.connect("clicked()", self.onPropagate)
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.connect("clicked()", self._onCancel)
        self.allSegmentsCheckBox = qt.QCheckBox("All MedSAM2 segments")
        self.allSegmentsCheckBox.toolTip = ("Propagate every segment prompted with MedSAM2 together (each slice is "
                                            "computed once for all; one undo step)")
        buttons = qt.QHBoxLayout()
        buttons.addWidget(self.propagateButton)
        buttons.addWidget(self.allSegmentsCheckBox)
        buttons.addWidget(self.cancelButton)
        self.scriptedEffect.addOptionsWidget(buttons)
        self.useSegmentButton = qt.QPushButton("Use segment as prompt")
        self.useSegmentButton.toolTip = ("Give MedSAM2 the selected segment's voxels on the slice shown in the "
                                         "last slice view you worked in (a start, or a correction)")
        self.useSegmentButton.connect("clicked()", self.onUseSegment)
        self.resetButton = qt.QPushButton("Reset")
        self.resetButton.toolTip = "Forget this segment's MedSAM2 prompts (its voxels stay; Undo brings them back)"
        self.resetButton.connect("clicked()", self.onReset)
        segment_buttons = qt.QHBoxLayout()
        segment_buttons.addWidget(self.useSegmentButton)
        segment_buttons.addWidget(self.resetButton)
        self.scriptedEffect.addOptionsWidget(segment_buttons)
        self.progressBar = qt.QProgressBar()
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        self.uncertainList = qt.QListWidget()
        self.uncertainList.toolTip = "Least certain slices, worst first (click one to go there and correct it)"
        self.uncertainList.connect("itemClicked(QListWidgetItem*)", self.onJumpToSlice)
        self.scriptedEffect.addLabeledOptionsWidget("Check:", self.uncertainList)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

    def cleanup(self):
        """Disconnect this object's Qt connections so the effect can be deleted (Slicer issue #7392)."""
        if not hasattr(self, "propagateButton"):  # setupOptionsFrame never ran (e.g. the factory's prototype)
            return
        self.propagateButton.disconnect("clicked()", self.onPropagate)
        self.cancelButton.disconnect("clicked()", self._onCancel)
        self.useSegmentButton.disconnect("clicked()", self.onUseSegment)
        self.resetButton.disconnect("clicked()", self.onReset)
        self.uncertainList.disconnect("itemClicked(QListWidgetItem*)", self.onJumpToSlice)

    def deactivate(self):
        self._press_xy = None

    @staticmethod
    def _onCancel():
        controller = shared_logic().controller
        if controller is not None:
            controller.cancel()

    @staticmethod
    def _slice_spin_box(end: str):
        """A slice index along the propagation axis; -1 shows as the volume's first/last slice."""
        box = qt.QSpinBox()
        box.setRange(-1, 10000)
        box.value = -1
        box.specialValueText = end
        box.toolTip = f"The {end} slice to propagate to (along the axis of the view you prompted in)"
        return box

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        """Returns True to abort the event (the views' own handling, e.g. window/level on left-drag, is skipped)."""
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        self._last_slice_view = viewWidget  # the view "Use segment as prompt" takes its slice from
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            if callerInteractor.GetShiftKey() or callerInteractor.GetAltKey():
                return False  # leave Slicer's own modified clicks/drags (e.g. Ctrl+Alt+drag rotates) alone
            confirmed = self.scriptedEffect.confirmCurrentSegmentVisible()
            if confirmed in (self.scriptedEffect.NotConfirmed, self.scriptedEffect.ConfirmedWithDialog):
                # As the Draw effect: after a dialog the release went to the popup, so drop this click entirely.
                self._press_xy = None
                return True
            self._press_xy = callerInteractor.GetEventPosition()
            return True
        if eventId != vtk.vtkCommand.LeftButtonReleaseEvent or self._press_xy is None:
            return False
        press_xy, release_xy, self._press_xy = self._press_xy, callerInteractor.GetEventPosition(), None
        slice_to_ras = slicer.util.arrayFromVTKMatrix(viewWidget.sliceLogic().GetSliceNode().GetSliceToRAS())
        if np.hypot(release_xy[0] - press_xy[0], release_xy[1] - press_xy[1]) > DRAG_THRESHOLD_PX:
            prompt = {"box_corners_ras": [self.xyToRas(press_xy, viewWidget), self.xyToRas(release_xy, viewWidget)]}
        else:
            prompt = {"points_ras": [self.xyToRas(release_xy, viewWidget)],
                      "labels": [0 if callerInteractor.GetControlKey() else 1]}
        self._run(lambda controller, volume, segment_id: controller.add_prompt(
            volume, EffectTarget(self.scriptedEffect), segment_id, slice_to_ras=slice_to_ras, **prompt))
        return True

    def onPropagate(self):
        def progress(done, planned):
            self.progressBar.maximum, self.progressBar.value = planned, done
            slicer.app.processEvents()  # keeps Cancel responsive and shows slices as they arrive

        start, stop = (None if box.value < 0 else box.value for box in (self.rangeStartSpinBox, self.rangeStopSpinBox))

        def propagate(controller, volume, segment_id):
            target = EffectTarget(self.scriptedEffect)
            segments = (controller.propagated_segments(volume, target) if self.allSegmentsCheckBox.checked
                        else [segment_id])
            return controller.propagate_segments(
                volume, target, segments, direction=self.directionComboBox.currentText, start=start, stop=stop,
                stop_after_empty=self.stopAfterEmptySpinBox.value or None, progress=progress)
        outcome = self._run(propagate)
        if outcome is None:
            return
        self.uncertainList.clear()
        for slice_info in outcome.least_certain:
            item = qt.QListWidgetItem(f"slice {slice_info.slice_index}: IoU {slice_info.iou:.2f}")
            item.setData(qt.Qt.UserRole, [float(c) for c in slice_info.center_ras])
            self.uncertainList.addItem(item)
        self.statusLabel.text = outcome.status()

    def onUseSegment(self):
        view = self._last_slice_view or slicer.app.layoutManager().sliceWidget("Red")
        slice_to_ras = slicer.util.arrayFromVTKMatrix(view.sliceLogic().GetSliceNode().GetSliceToRAS())
        outcome = self._run(lambda controller, volume, segment_id: controller.prompt_from_segment(
            volume, EffectTarget(self.scriptedEffect), segment_id, slice_to_ras))
        if outcome is not None and not outcome.axis_warning:
            self.statusLabel.text = f"Slice {outcome.slice_index} is the prompt; Propagate to follow it."

    def onReset(self):
        if self._run(lambda controller, volume, segment_id: controller.reset_segment(
                volume, EffectTarget(self.scriptedEffect), segment_id) or True):
            self.statusLabel.text = "MedSAM2 forgot this segment's prompts; its voxels stay (Undo restores them)."

    def onJumpToSlice(self, item):
        x, y, z = item.data(qt.Qt.UserRole)
        slicer.modules.markups.logic().JumpSlicesToLocation(x, y, z, True)

    def _run(self, action):
        """Run one controller action for the selected volume/segment; show its error as one sentence."""
        logic = shared_logic()
        parameters = self.scriptedEffect.parameterSetNode()
        volume, segment_id = parameters.GetSourceVolumeNode(), parameters.GetSelectedSegmentID()
        try:
            if logic.controller is None:
                raise MedSAM2ActionError("Not connected: open the MedSAM2 module and connect first.")
            if parameters.GetSegmentationNode() is None or volume is None or not segment_id:
                raise MedSAM2ActionError("Select a segmentation, a source volume and a segment first.")
            result = action(logic.controller, volume, segment_id)
        except MedSAM2ActionError as error:
            self.statusLabel.text = str(error)
            return None
        warning = getattr(result, "axis_warning", None)
        self.statusLabel.text = warning or ""
        return result
