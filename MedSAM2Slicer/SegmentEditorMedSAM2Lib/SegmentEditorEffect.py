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
from slicer.i18n import tr as _
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from MedSAM2SlicerLib import effect_options, geometry, prompt_list
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

    def modify(self, segment_id, labelmap, mode, extent_ijk):
        # The effect always edits the selected segment; the controller only ever passes that one.
        assert segment_id == self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()
        modes = {"add": slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeAdd,
                 "remove": slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeRemove}
        # The (labelmap, mode, QList<int> extent) overload; the extent is in the labelmap's own IJK index space.
        self.scriptedEffect.modifySelectedSegmentByLabelmap(labelmap, modes[mode], [int(v) for v in extent_ijk])


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "MedSAM2"  # not translated: modules find effects by name
        scriptedEffect.title = "MedSAM2"
        scriptedEffect.perSegment = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self._press_xy = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = os.path.join(os.path.dirname(__file__), os.pardir, "Resources", "Icons", "MedSAM2Effect.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self):
        return effect_options.help_text()  # mouse actions and shortcuts, in one place

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
        buttons = qt.QHBoxLayout()
        buttons.addWidget(self.propagateButton)
        buttons.addWidget(self.cancelButton)
        self.scriptedEffect.addOptionsWidget(buttons)
        self.progressBar = qt.QProgressBar()
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        self.uncertainList = qt.QListWidget()
        self.uncertainList.toolTip = "Least certain slices, worst first (click one to go there and correct it)"
        self.uncertainList.connect("itemClicked(QListWidgetItem*)", self.onJumpToSlice)
        self.scriptedEffect.addLabeledOptionsWidget("Check:", self.uncertainList)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.setupPromptList()
        self.connectOptionsToMRML()

    def cleanup(self):
        """Disconnect this object's Qt connections so the effect can be deleted (Slicer issue #7392)."""
        if not hasattr(self, "propagateButton"):  # setupOptionsFrame never ran (e.g. the factory's prototype)
            return
        self.propagateButton.disconnect("clicked()", self.onPropagate)
        self.cancelButton.disconnect("clicked()", self._onCancel)
        self.uncertainList.disconnect("itemClicked(QListWidgetItem*)", self.onJumpToSlice)
        self.disconnectOptionsFromMRML()
        self.removePromptButton.disconnect("clicked()", self.onRemoveSelectedPrompt)

    def deactivate(self):
        self._press_xy = None
        prompt_list.remove_rubber_band(slicer.mrmlScene)

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
        if eventId == vtk.vtkCommand.KeyPressEvent:
            return self.onShortcutKey(callerInteractor.GetKeySym())
        if eventId == vtk.vtkCommand.MouseMoveEvent:
            return self.onDragMove(callerInteractor, viewWidget)
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
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
        prompt_list.remove_rubber_band(slicer.mrmlScene)
        slice_to_ras = slicer.util.arrayFromVTKMatrix(viewWidget.sliceLogic().GetSliceNode().GetSliceToRAS())
        if np.hypot(release_xy[0] - press_xy[0], release_xy[1] - press_xy[1]) > DRAG_THRESHOLD_PX:
            prompt = {"box_corners_ras": [self.xyToRas(press_xy, viewWidget), self.xyToRas(release_xy, viewWidget)]}
        else:
            negative = bool(callerInteractor.GetControlKey()) != self.takeNextClickNegative()  # n flips one click
            prompt = {"points_ras": [self.xyToRas(release_xy, viewWidget)], "labels": [0 if negative else 1]}
        self._run(lambda controller, volume, segment_id: controller.add_prompt(
            volume, EffectTarget(self.scriptedEffect), segment_id, slice_to_ras=slice_to_ras, **prompt))
        self.refreshPrompts()
        return True

    def onPropagate(self):
        def progress(done, planned):
            self.progressBar.maximum, self.progressBar.value = planned, done
            slicer.app.processEvents()  # keeps Cancel responsive and shows slices as they arrive

        start, stop = (None if box.value < 0 else box.value for box in (self.rangeStartSpinBox, self.rangeStopSpinBox))
        outcome = self._run(lambda controller, volume, segment_id: controller.propagate(
            volume, EffectTarget(self.scriptedEffect), segment_id, direction=self.directionComboBox.currentText,
            start=start, stop=stop, stop_after_empty=self.stopAfterEmptySpinBox.value or None, progress=progress))
        if outcome is None:
            return
        self.uncertainList.clear()
        for slice_info in outcome.least_certain:
            item = qt.QListWidgetItem(f"slice {slice_info.slice_index}: IoU {slice_info.iou:.2f}")
            item.setData(qt.Qt.UserRole, [float(c) for c in slice_info.center_ras])
            self.uncertainList.addItem(item)
        self.statusLabel.text = ("Cancelled; " if outcome.cancelled else "") + f"{outcome.slices_written} slices."

    # ---- options in the Segment Editor's parameter node (saved with the scene) -----------------------------------
    def _optionWidgets(self):
        """Option name -> (widget, its change signal, how to read it, how to show a value)."""
        def spin(box):
            return (box, "valueChanged(int)", lambda: int(box.value), lambda value: setattr(box, "value", value))

        combo = self.directionComboBox
        return {"Direction": (combo, "currentIndexChanged(int)", lambda: combo.currentText,
                              lambda value: setattr(combo, "currentText", value)),
                "RangeStart": spin(self.rangeStartSpinBox), "RangeStop": spin(self.rangeStopSpinBox),
                "StopAfterEmpty": spin(self.stopAfterEmptySpinBox)}

    def setMRMLDefaults(self):
        for name, value in effect_options.DEFAULTS.items():
            self.scriptedEffect.setParameterDefault(name, value)

    def updateGUIFromMRML(self):
        self.refreshPrompts()  # e.g. another segment was selected
        for name, (widget, _signal, _read, show) in self._optionWidgets().items():
            blocked = widget.blockSignals(True)
            show(effect_options.typed(name, self.scriptedEffect.parameter(name)))
            widget.blockSignals(blocked)

    def updateMRMLFromGUI(self, *unused):
        for name, (_widget, _signal, read, _show) in self._optionWidgets().items():
            self.scriptedEffect.setParameter(name, read())

    def connectOptionsToMRML(self):
        effect_options.tr = _  # the Qt-free library's sentences through Slicer's translation
        for widget, signal, _read, _show in self._optionWidgets().values():
            widget.connect(signal, self.updateMRMLFromGUI)

    def disconnectOptionsFromMRML(self):
        for widget, signal, _read, _show in self._optionWidgets().values():
            widget.disconnect(signal, self.updateMRMLFromGUI)

    # ---- prompts you can see: the list, removing one, markers and the rubber band (MedSAM2SlicerLib.prompt_list) --
    def setupPromptList(self):
        prompt_list.tr = _
        self.promptList = qt.QListWidget()
        self.promptList.toolTip = _("The selected segment's prompts (slice, kind); the markers show them in the views")
        self.scriptedEffect.addLabeledOptionsWidget(_("Prompts:"), self.promptList)
        self.removePromptButton = qt.QPushButton(_("Remove prompt"))
        self.removePromptButton.toolTip = _("Remove the selected prompt (or the latest, x): the others are replayed "
                                            "and the last propagation is run again; one undo step")
        self.removePromptButton.connect("clicked()", self.onRemoveSelectedPrompt)
        self.scriptedEffect.addOptionsWidget(self.removePromptButton)

    def _selection(self):
        """(controller, source volume, segmentation node, segment id), any of them None when not chosen yet."""
        parameters = self.scriptedEffect.parameterSetNode()
        if parameters is None:
            return None, None, None, None
        return (shared_logic().controller, parameters.GetSourceVolumeNode(), parameters.GetSegmentationNode(),
                parameters.GetSelectedSegmentID() or None)

    def refreshPrompts(self):
        """The list and the markers of the selected segment, from the controller's prompts."""
        controller, volume, segmentation, segment_id = self._selection()
        if not hasattr(self, "promptList"):
            return
        prompts = controller.prompts(volume, segment_id) if None not in (controller, volume, segment_id) else []
        self.promptList.clear()
        for prompt in prompts:
            self.promptList.addItem(prompt_list.describe(prompt))
        if segmentation is not None and segment_id:
            prompt_list.show_markers(slicer.mrmlScene, segmentation, segment_id, prompts, volume)

    def onRemoveSelectedPrompt(self):
        self._removePrompt(self.promptList.currentRow if self.promptList.currentRow >= 0 else -1)

    def onRemoveLatestPrompt(self):
        self._removePrompt(-1)

    def _removePrompt(self, index):
        outcome = self._run(lambda controller, volume, segment_id: prompt_list.remove_prompt(
            controller, volume, EffectTarget(self.scriptedEffect), segment_id, index))
        if outcome is not None:
            removed = _("Removed the prompt on slice {k}.").format(k=outcome.removed.slice_index)
            self.statusLabel.text = removed + " " + (
                _("No prompt left: the segment was reset (Undo brings the prompt's result back).") if outcome.reset
                else _("{n} prompt(s) replayed, {m} slices propagated again.").format(
                    n=outcome.remaining, m=outcome.propagated_slices))
        self.refreshPrompts()

    def onDragMove(self, callerInteractor, viewWidget) -> bool:
        """While the left button is down and the mouse moved past the click threshold, show the box being drawn."""
        if self._press_xy is None or viewWidget.className() != "qMRMLSliceWidget":
            return False
        xy = callerInteractor.GetEventPosition()
        _controller, volume, _segmentation, _segment = self._selection()
        if volume is None or np.hypot(xy[0] - self._press_xy[0], xy[1] - self._press_xy[1]) <= DRAG_THRESHOLD_PX:
            return False
        slice_to_ras = slicer.util.arrayFromVTKMatrix(viewWidget.sliceLogic().GetSliceNode().GetSliceToRAS())
        axis = geometry.choose_propagation_axis(geometry.ijk_to_world_ras(volume), slice_to_ras).axis
        prompt_list.rubber_band(slicer.mrmlScene, self.xyToRas(self._press_xy, viewWidget),
                                self.xyToRas(xy, viewWidget), volume, axis)
        return False  # the views keep tracking the mouse

    # ---- keyboard shortcuts (effect_options.SHORTCUTS; none is a key the Segment Editor or the views bind) -------
    def onShortcutKey(self, key_sym) -> bool:
        """Run the action bound to the key; True (the key is consumed) only when one is bound."""
        action = effect_options.SHORTCUTS.get(key_sym)
        if action is None:
            return False
        {"propagate": self.onPropagate, "cancel": self._onCancel, "toggle_sign": self.onToggleNextClickSign,
         "remove_latest_prompt": self.onRemoveLatestPrompt,
         "next_least_certain": self.onJumpToNextLeastCertain}[action]()
        return True

    def onToggleNextClickSign(self):
        self._nextClickNegative = not getattr(self, "_nextClickNegative", False)
        self.statusLabel.text = _("Next click: negative point.") if self._nextClickNegative else ""

    def takeNextClickNegative(self) -> bool:
        """Whether the next click's sign is flipped (n); the flip applies to one click only."""
        negative, self._nextClickNegative = getattr(self, "_nextClickNegative", False), False
        return negative

    def onJumpToNextLeastCertain(self):
        """Go to the next slice of the least-certain list (worst first), wrapping around."""
        count = self.uncertainList.count
        if not count:
            self.statusLabel.text = _("No least certain slices yet: propagate first.")
            return
        row = (self.uncertainList.currentRow + 1) % count
        self.uncertainList.setCurrentRow(row)
        self.onJumpToSlice(self.uncertainList.item(row))

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
