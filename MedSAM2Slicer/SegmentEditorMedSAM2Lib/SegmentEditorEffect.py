"""The MedSAM2 Segment Editor effect: click (point) or drag (box) on a slice, then propagate through the volume.

Thin by design: it turns view events into RAS prompts and buttons into calls of the shared `MedSAM2SlicerLogic`
controller; geometry, sessions and writing live in the Qt-free `MedSAM2SlicerLib`.
"""

import os

import numpy as np
import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect
from slicer.i18n import tr as _

from MedSAM2SlicerLib import volume_settings  # first: it puts the extension's own client on the path
from MedSAM2SlicerLib import effect_options, geometry, panel_settings, prompt_list
from MedSAM2SlicerLib.background import BackgroundReader, call_in_background
from MedSAM2SlicerLib.controller import MedSAM2ActionError
from MedSAM2SlicerLib.logic import shared_logic
from medsam2_client.protocol import DIRECTIONS  # noqa: I001  (after MedSAM2SlicerLib, on purpose)

__all__ = ["SegmentEditorEffect"]

DRAG_THRESHOLD_PX = 5  # a press and release further apart than this is a box, else a point
SELECTION_CHANGED = ("The selected segmentation, segment or source volume changed while MedSAM2 was working, so "
                     "it stopped; what it wrote before stays (Undo removes it).")
IN_BACKGROUND = object()  # an action's result: it goes on on a worker thread and ends the action itself


class SelectionChangedError(MedSAM2ActionError):
    """The user selected another segmentation, segment or source volume while an action was writing."""


class EffectTarget:
    """Writes through the effect, so the Segment Editor's masking, overwrite and undo apply as for any effect.

    Pinned to the segmentation, segment and source volume selected when the action started: the effect writes
    through `modifySelectedSegmentByLabelmap` (the editor's *current* selection), so once the user selects
    something else (clicks are delivered while an action runs) it refuses to write instead of writing elsewhere.
    """

    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect
        self.segmentation_node, self.segment_id, self.source_volume = self._selection()

    def _selection(self):
        parameters = self.scriptedEffect.parameterSetNode()
        return (parameters.GetSegmentationNode(), parameters.GetSelectedSegmentID(),
                parameters.GetSourceVolumeNode())

    def selection_changed(self) -> bool:
        return self._selection() != (self.segmentation_node, self.segment_id, self.source_volume)

    def save_state_for_undo(self):
        self.scriptedEffect.saveStateForUndo()

    def reference_geometry(self):
        """The lattice the editor's effects write on (Slicer: qSlicerSegmentEditorAbstractEffect)."""
        return self.scriptedEffect.referenceGeometryImage()

    def modify(self, segment_id, labelmap, mode, extent_ijk):
        if self.selection_changed():
            raise SelectionChangedError(SELECTION_CHANGED)
        # Any segment of the pinned segmentation (a multi-segment propagation writes several). The overload without
        # an extent (PythonQt cannot pass `const int[6]`): the labelmap's own extent, which is `extent_ijk`.
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
        self._running = None  # the EffectTarget of the action this effect runs, pinned to its selection
        self._reader = None  # the BackgroundReader of that action, while it reads on a worker thread
        self._waitCursor = False
        self._nextClickNegative = False  # n flips the sign of the next click (one click only)
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
        return effect_options.help_text()  # mouse actions and shortcuts, in one place

    def setupOptionsFrame(self):
        self.directionComboBox = qt.QComboBox()
        self.directionComboBox.addItems(list(DIRECTIONS))  # the backend's, once connected: `refreshChoices`
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
        self.roiSelector = slicer.qMRMLNodeComboBox()
        self.roiSelector.nodeTypes = ["vtkMRMLMarkupsROINode"]
        self.roiSelector.noneEnabled = True
        self.roiSelector.addEnabled = self.roiSelector.removeEnabled = False
        self.roiSelector.toolTip = "An ROI (Markups) around the structure: a 3D box prompt"
        self.roiSelector.setMRMLScene(slicer.mrmlScene)
        self.roiButton = qt.QPushButton("Use ROI as box")
        self.roiButton.toolTip = ("Prompt the ROI's centre slice with its outline; propagation then stays within "
                                  "the ROI's slices plus a margin (a range of your own overrides it)")
        self.roiButton.connect("clicked()", self.onUseRoi)
        self.roiMarginSpinBox = qt.QSpinBox()
        self.roiMarginSpinBox.setRange(0, 500)
        self.roiMarginSpinBox.suffix = " mm"
        self.roiMarginSpinBox.toolTip = "How far beyond the ROI's first and last slices propagation may go"
        roi_row = qt.QHBoxLayout()
        roi_row.addWidget(self.roiSelector)
        roi_row.addWidget(self.roiMarginSpinBox)
        roi_row.addWidget(self.roiButton)
        self.scriptedEffect.addLabeledOptionsWidget("ROI:", roi_row)
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
        self.intensityLabel = qt.QLabel()
        self.intensityLabel.toolTip = "How the source volume's intensities are scaled for the model (per volume)"
        self.scriptedEffect.addLabeledOptionsWidget("Intensity:", self.intensityLabel)
        self.displayWindowButton = qt.QPushButton("Use its display window")
        self.displayWindowButton.toolTip = ("Scale this volume as it is displayed now (its own window/level); "
                                            "saved with the scene")
        self.displayWindowButton.connect("clicked()", self.onUseDisplayWindow)
        self.defaultIntensityButton = qt.QPushButton("Use the panel's default")
        self.defaultIntensityButton.connect("clicked()", self.onUseDefaultIntensity)
        intensity_buttons = qt.QHBoxLayout()
        intensity_buttons.addWidget(self.displayWindowButton)
        intensity_buttons.addWidget(self.defaultIntensityButton)
        self.scriptedEffect.addOptionsWidget(intensity_buttons)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.setupPromptList()
        self.connectOptionsToMRML()
        shared_logic().guard.add_observer(self._onBusyChanged)
        self.updateIntensityLabel()
        self.refreshChoices()

    def cleanup(self):
        """Disconnect this object's Qt connections so the effect can be deleted (Slicer issue #7392)."""
        if not hasattr(self, "propagateButton"):  # setupOptionsFrame never ran (e.g. the factory's prototype)
            return
        self.propagateButton.disconnect("clicked()", self.onPropagate)
        self.cancelButton.disconnect("clicked()", self._onCancel)
        self.useSegmentButton.disconnect("clicked()", self.onUseSegment)
        self.roiButton.disconnect("clicked()", self.onUseRoi)
        self.resetButton.disconnect("clicked()", self.onReset)
        self.uncertainList.disconnect("itemClicked(QListWidgetItem*)", self.onJumpToSlice)
        self.disconnectOptionsFromMRML()
        self.removePromptButton.disconnect("clicked()", self.onRemoveSelectedPrompt)
        self.displayWindowButton.disconnect("clicked()", self.onUseDisplayWindow)
        self.defaultIntensityButton.disconnect("clicked()", self.onUseDefaultIntensity)
        shared_logic().guard.remove_observer(self._onBusyChanged)

    def activate(self):
        self.updateIntensityLabel()
        self.refreshChoices()

    def refreshChoices(self):
        """Show the connected backend's lists (asked once per connection), this extension's before connecting."""
        panel_settings.refill_choices(self.directionComboBox, shared_logic().choices()["directions"])

    def sourceVolumeNodeChanged(self):
        """Called by the Segment Editor when the user picks another source volume."""
        self.updateIntensityLabel()

    def _source_volume(self):
        parameters = self.scriptedEffect.parameterSetNode()  # None until the editor has given the effect one
        return parameters.GetSourceVolumeNode() if parameters is not None else None

    def updateIntensityLabel(self):
        volume = self._source_volume()
        if volume is None:
            self.intensityLabel.text = ""
            return
        own = volume_settings.has_own(volume)
        preprocessing = volume_settings.preprocessing_for(volume, shared_logic().preprocessing)
        self.intensityLabel.text = (f"{volume_settings.describe(preprocessing)} "
                                    f"({'this volume' if own else 'the panel default'})")

    def onUseDisplayWindow(self):
        volume = self._source_volume()
        if volume is None or volume_settings.use_display_window(volume) is None:
            self.statusLabel.text = "Select a source volume that is shown in a view to use its display window."
        self.updateIntensityLabel()

    def onUseDefaultIntensity(self):
        volume = self._source_volume()
        if volume is not None:
            volume_settings.use_default(volume)
        self.updateIntensityLabel()

    def deactivate(self):
        """Switching to another effect hides Cancel: so an action this effect started is cancelled here."""
        self._press_xy = None
        prompt_list.remove_rubber_band(slicer.mrmlScene)
        if self._running is not None:
            self._onCancel()

    def _onBusyChanged(self, busy):
        self.propagateButton.enabled = not busy

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
        presses = (vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.LeftButtonDoubleClickEvent)
        if shared_logic().guard.running is not None and eventId in (*presses, vtk.vtkCommand.LeftButtonReleaseEvent):
            # A click queued while an action runs would nest a prompt into it: swallow it (and the view's own use).
            self._press_xy = None
            self.statusLabel.text = f"MedSAM2 is busy ({shared_logic().guard.running}); that click was ignored."
            return True
        self._last_slice_view = viewWidget  # the view "Use segment as prompt" takes its slice from
        # Slicer's VTK sends LeftButtonDoubleClickEvent instead of the second press of a quick double click;
        # unhandled it maximizes the view (vtkMRMLSliceIntersectionWidget), with Ctrl it resets window/level. Two
        # quick clicks are two prompts, so it is a press here (the Draw effect also handles it, as "finish").
        if eventId in presses:
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
            # All four corners of the rectangle on screen: on a volume rotated in the view plane two are not enough.
            corners_xy = [press_xy, (release_xy[0], press_xy[1]), release_xy, (press_xy[0], release_xy[1])]
            prompt = {"box_corners_ras": [self.xyToRas(xy, viewWidget) for xy in corners_xy]}
        else:
            negative = bool(callerInteractor.GetControlKey()) != self.takeNextClickNegative()  # n flips one click
            prompt = {"points_ras": [self.xyToRas(release_xy, viewWidget)], "labels": [0 if negative else 1]}
        self._run("placing a prompt", lambda controller, volume, target: self._placePrompt(
            controller, target, slice_to_ras, prompt))
        return True

    def _placePrompt(self, controller, target, slice_to_ras, prompt):
        """Place a prompt; the first one on a volume sends it to the backend first, on a worker thread."""
        def place():
            outcome = controller.add_prompt(target.source_volume, target, target.segment_id,
                                            slice_to_ras=slice_to_ras, **prompt)
            limits = (f"Slice {outcome.slice_index} is the prompt; propagation stays within slices "
                      f"{outcome.slice_range[0]}..{outcome.slice_range[1]}." if outcome.slice_range else "")
            self.statusLabel.text = " ".join(t for t in (outcome.axis_warning, limits) if t)
            self.refreshPrompts()

        upload = {"fraction": None}  # written by the worker thread, shown by the main thread
        open_session = controller.session_opener(target.source_volume, slice_to_ras,
                                                 upload_progress=lambda fraction: upload.update(fraction=fraction))
        if open_session is None:
            return place()

        def show_upload():
            fraction = upload["fraction"]
            self.statusLabel.text = "Sending the volume…" + ("" if fraction is None else f" {fraction:.0%}")

        def uploaded(result, error):
            try:
                if error is not None:
                    raise error if isinstance(error, MedSAM2ActionError) else MedSAM2ActionError(
                        f"Sending the volume failed: {error}.")
                if target.selection_changed():
                    raise SelectionChangedError(SELECTION_CHANGED)
                place()
            except MedSAM2ActionError as action_error:
                self.statusLabel.text = str(action_error)
            finally:
                self._endAction()

        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)  # as Slicer's own long effects (Islands, Margin...)
        self._waitCursor = True
        show_upload()
        self._reader = call_in_background(open_session, uploaded, self._startTimer, on_tick=show_upload)
        return IN_BACKGROUND

    def onPropagate(self):
        start, stop = (None if box.value < 0 else box.value for box in (self.rangeStartSpinBox, self.rangeStopSpinBox))
        options = {"direction": self.directionComboBox.currentText, "start": start, "stop": stop,
                   "stop_after_empty": self.stopAfterEmptySpinBox.value or None}
        self._run("propagating", lambda controller, volume, target: self._propagate(controller, target, options))

    def _propagate(self, controller, target, options, segments=None, prefix=""):
        """Read the backend's slices on a worker thread and write them here, on the main thread, as they arrive:
        Slicer stays responsive (scroll, look, Cancel) between slices. The console API stays synchronous.
        `segments`: those to propagate (default: the selected one, or all with *All MedSAM2 segments*)."""
        if segments is None:
            segments = (controller.propagated_segments(target.source_volume, target)
                        if self.allSegmentsCheckBox.checked else [target.segment_id])
        job = controller.begin_propagation(target.source_volume, target, segments, **options)

        def apply(result):
            if target.selection_changed():
                controller.cancel()
                raise SelectionChangedError(SELECTION_CHANGED)
            job.apply(result)
            self.progressBar.value = job.run.done

        def finished(error):
            goes_on = False
            try:
                if error is not None:
                    raise job.failure(error)
                outcome = job.finish()
                goes_on = outcome is None  # segments on another axis: their run is read next, the action goes on
                if goes_on:
                    read()
                else:
                    self._showOutcome(outcome)
                    self.statusLabel.text = prefix + self.statusLabel.text
            except MedSAM2ActionError as action_error:
                self.statusLabel.text = str(action_error)
            finally:
                if not goes_on:
                    self._endAction()

        def read():
            self.progressBar.maximum, self.progressBar.value = job.run.planned, 0
            self._reader = BackgroundReader(lambda: job.run, apply, finished)
            self._reader.start(self._startTimer)

        read()
        return IN_BACKGROUND

    def _showOutcome(self, outcome):
        self.uncertainList.clear()
        for slice_info in outcome.least_certain:
            item = qt.QListWidgetItem(f"slice {slice_info.slice_index}: IoU {slice_info.iou:.2f}")
            item.setData(qt.Qt.UserRole, [float(c) for c in slice_info.center_ras])
            self.uncertainList.addItem(item)
        self.statusLabel.text = outcome.status()

    def onUseRoi(self):
        roi = self.roiSelector.currentNode()
        if roi is None:
            self.statusLabel.text = "Pick an ROI first (create one in the Markups toolbar, around the structure)."
            return
        # An ROI belongs to no view: it is cut across the volume axis closest to superior-inferior, as the CLI's
        # 3D boxes are (the axial view picks that axis on any volume orientation).
        slice_to_ras = geometry.view_slice_to_ras("axial")
        prompt = {"box_corners_ras": geometry.roi_corners_ras(roi), "box_margin_mm": self.roiMarginSpinBox.value}
        self._run("placing the ROI's box", lambda controller, volume, target: self._placePrompt(
            controller, target, slice_to_ras, prompt))

    def onUseSegment(self):
        view = self._last_slice_view or slicer.app.layoutManager().sliceWidget("Red")
        slice_to_ras = slicer.util.arrayFromVTKMatrix(view.sliceLogic().GetSliceNode().GetSliceToRAS())

        def use_segment(controller, volume, target):
            outcome = controller.prompt_from_segment(volume, target, target.segment_id, slice_to_ras)
            self.statusLabel.text = outcome.axis_warning or (
                f"Slice {outcome.slice_index} is the prompt; Propagate to follow it.")
            self.refreshPrompts()

        self._run("using the segment as the prompt", use_segment)

    def onReset(self):
        def reset(controller, volume, target):
            controller.reset_segment(volume, target, target.segment_id)
            self.statusLabel.text = "MedSAM2 forgot this segment's prompts; its voxels stay (Undo restores them)."

        self._run("resetting the segment", reset)
        self.refreshPrompts()

    # ---- options in the Segment Editor's parameter node (saved with the scene) -----------------------------------
    def _optionWidgets(self):
        """Option name -> (widget, its change signal, how to read it, how to show a value)."""
        def spin(box):
            return (box, "valueChanged(int)", lambda: int(box.value), lambda value: setattr(box, "value", value))

        combo = self.directionComboBox
        return {"Direction": (combo, "currentIndexChanged(int)", lambda: combo.currentText,
                              lambda value: setattr(combo, "currentText", value)),
                "RangeStart": spin(self.rangeStartSpinBox), "RangeStop": spin(self.rangeStopSpinBox),
                "StopAfterEmpty": spin(self.stopAfterEmptySpinBox), "RoiMarginMm": spin(self.roiMarginSpinBox),
                "AllSegments": (self.allSegmentsCheckBox, "toggled(bool)", lambda: int(self.allSegmentsCheckBox.checked),
                                lambda value: setattr(self.allSegmentsCheckBox, "checked", bool(value)))}

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
        def remove(controller, volume, target):
            outcome = prompt_list.remove_prompt(controller, volume, target, target.segment_id, index,
                                                propagate=False)
            removed = _("Removed the prompt on slice {k}.").format(k=outcome.removed.slice_index)
            if outcome.reset:
                self.statusLabel.text = removed + " " + _(
                    "No prompt left: the segment was reset (Undo brings the prompt's result back).")
                return None
            replayed = removed + " " + _("{n} prompt(s) replayed.").format(n=outcome.remaining)
            self.statusLabel.text = replayed
            self.refreshPrompts()
            if outcome.repropagate is None:
                return None
            # Propagated again as its last propagation was, off the main thread, into the removal's undo step.
            return self._propagate(controller, outcome.step, outcome.repropagate, [target.segment_id],
                                   prefix=replayed + " " + _("Propagated again:") + " ")

        self._run("removing a prompt", remove)
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
        self._nextClickNegative = not self._nextClickNegative
        self.statusLabel.text = _("Next click: negative point.") if self._nextClickNegative else ""

    def takeNextClickNegative(self) -> bool:
        """Whether the next click's sign is flipped (n); the flip applies to one click only."""
        negative, self._nextClickNegative = self._nextClickNegative, False
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

    @staticmethod
    def _startTimer(tick):
        """The app-only part of working in the background: a QTimer calls `tick` on the main thread (every 20 ms,
        with the event loop running in between). Assumes PythonQt's QTimer: `timeout()` signal, `start(msec)`."""
        timer = qt.QTimer()
        timer.connect("timeout()", tick)
        timer.start(20)
        return timer

    def onJumpToSlice(self, item):
        x, y, z = item.data(qt.Qt.UserRole)
        slicer.modules.markups.logic().JumpSlicesToLocation(x, y, z, True)

    def _run(self, what, action):
        """Run one controller action on the selected volume/segment, pinned to them and exclusive (the user keeps
        working meanwhile); show its error as one sentence. An action that returns IN_BACKGROUND goes on after
        this returns and calls `_endAction()` when done."""
        logic = shared_logic()
        try:
            if logic.controller is None:
                raise MedSAM2ActionError("Not connected: open the MedSAM2 module and connect first.")
            target = EffectTarget(self.scriptedEffect)
            if target.segmentation_node is None or target.source_volume is None or not target.segment_id:
                raise MedSAM2ActionError("Select a segmentation, a source volume and a segment first.")
            logic.guard.acquire(what)
            self._running = target
            try:
                replay = logic.controller.replayer(target.source_volume, target)
                result = (self._afterReplay(replay, action, target) if replay is not None
                          else action(logic.controller, target.source_volume, target))
            except BaseException:
                self._endAction()
                raise
            if result is not IN_BACKGROUND:
                self._endAction()
        except MedSAM2ActionError as error:
            self.statusLabel.text = str(error)

    def _afterReplay(self, replay, action, target):
        """After an Undo/Redo the model is rebuilt first, propagations included (on a worker thread: that can take
        as long as they did), then the action runs."""
        self.statusLabel.text = _("MedSAM2 is going back to the state Undo/Redo left…")

        def replayed(_result, error):
            try:
                if error is not None:
                    raise error
                if target.selection_changed():
                    raise SelectionChangedError(SELECTION_CHANGED)
                self.statusLabel.text = ""
                if action(shared_logic().controller, target.source_volume, target) is IN_BACKGROUND:
                    return  # the action ends itself
            except MedSAM2ActionError as action_error:
                self.statusLabel.text = str(action_error)
            except BaseException:
                self._endAction()
                raise  # a bug: its traceback goes to Slicer's log
            self._endAction()

        self._reader = call_in_background(replay, replayed, self._startTimer)
        return IN_BACKGROUND

    def _endAction(self):
        self._running = None
        self._reader = None
        if self._waitCursor:
            qt.QApplication.restoreOverrideCursor()
            self._waitCursor = False
        shared_logic().guard.release()
