"""The effect in a real (slicer-core) scene: real segment editor node, segmentation, slice node and interactor.

Only the Qt layer is a stand-in (strict: `slicer_standins`); writes go through vtkSlicerSegmentEditorLogic, which
Slicer >= 5.10's effect write calls. The backend is read on a worker thread; `standins.run_timers` is the event
loop, delivering the user's events between slices.
"""

import threading

import numpy as np
import pytest
import slicer
import slicer_standins as standins
import vtk
from slicer_standins import fire, gui_stubs  # noqa: F401  (a fixture)

from medsam2_backend.engine import DiskEngine
from MedSAM2SlicerLib import mrml_io
from MedSAM2SlicerLib.logic import InProcessBackend

SHAPE_KJI = (12, 32, 32)


class Editor:
    """One volume, a segmentation with segments 'a' and 'b', an editor node selecting 'a', an axial view at k=5."""

    def __init__(self):
        self.volume = slicer.util.addVolumeFromArray(np.zeros(SHAPE_KJI, np.int16), name="CT")
        self.segmentation = self.new_segmentation("Segmentation")
        self.logic = mrml_io.new_editor_logic(self.segmentation, self.volume)
        self.node = self.logic.GetSegmentEditorNode()
        self.node.SetSelectedSegmentID("a")
        slice_node = slicer.vtkMRMLSliceNode()
        slice_node.SetName("Red")
        slice_node.SetLayoutName("Red")
        slicer.mrmlScene.AddNode(slice_node)
        slice_node.SetDimensions(32, 32, 1)
        slice_node.SetFieldOfView(32, 32, 1)
        self.slice_node = slice_node
        self.set_view(np.eye(3), (16.0, 16.0, 5.0))
        slice_logic = slicer.vtkMRMLSliceLogic()
        slice_logic.SetMRMLScene(slicer.mrmlScene)
        slice_logic.SetSliceNode(slice_node)
        self.view = standins.SliceWidget(slice_logic)

    def set_view(self, rotation, center_ras):
        matrix = np.eye(4)
        matrix[:3, :3], matrix[:3, 3] = rotation, center_ras
        self.slice_node.GetSliceToRAS().DeepCopy(matrix.ravel())
        self.slice_node.UpdateMatrices()

    @staticmethod
    def new_segmentation(name):
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        for segment_id in ("a", "b"):
            segmentation.GetSegmentation().AddEmptySegment(segment_id, segment_id)
        return segmentation

    def voxels(self, segment_id, segmentation=None):
        segmentation = segmentation or self.segmentation
        return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, self.volume)


@pytest.fixture
def editor(mrml, gui_stubs):
    from MedSAM2SlicerLib.logic import shared_logic

    editor = Editor()
    shared_logic().connect(engine=DiskEngine(radius=4, shrink=1))
    yield editor


@pytest.fixture
def effect(editor):
    from SegmentEditorMedSAM2Lib import SegmentEditorEffect

    scripted = standins.ScriptedEffect(editor.logic)
    effect = SegmentEditorEffect(scripted)
    effect.setupOptionsFrame()
    yield effect
    effect.cleanup()


def interactor(xy, control=False, shift=False, alt=False):
    """A real vtkRenderWindowInteractor carrying one event's position and modifier keys."""
    rwi = vtk.vtkRenderWindowInteractor()
    rwi.SetEventPosition(*xy)
    rwi.SetControlKey(int(control))
    rwi.SetShiftKey(int(shift))
    rwi.SetAltKey(int(alt))
    return rwi


def click(effect, view, xy, release_xy=None, control=False, event=vtk.vtkCommand.LeftButtonPressEvent, between=None):
    """Press and release; then the event loop runs until the prompt is placed (the first uploads the volume)."""
    pressed = effect.processInteractionEvents(interactor(xy, control), event, view)
    released = effect.processInteractionEvents(interactor(release_xy or xy, control),
                                               vtk.vtkCommand.LeftButtonReleaseEvent, view)
    standins.run_timers(between)
    return pressed, released


def prompts(editor, segment_id="a"):
    from MedSAM2SlicerLib.logic import shared_logic

    return shared_logic().controller.prompts(editor.volume, segment_id)


def test_click_writes_the_slice_and_propagate_the_volume_with_one_undo_step(editor, effect):
    assert effect.processInteractionEvents(interactor((16, 16)), vtk.vtkCommand.LeftButtonPressEvent,
                                           standins.ThreeDWidget()) is False  # slice views only
    assert click(effect, editor.view, (16, 16)) == (True, True)  # aborted: no window/level on the drag
    voxels = editor.voxels("a")
    assert voxels[5, 16, 16] and voxels[5].sum() == np.count_nonzero(
        (np.arange(32)[:, None] - 16) ** 2 + (np.arange(32)[None] - 16) ** 2 <= 16)
    assert not voxels[4].any() and prompts(editor)[0].slice_index == 5
    click(effect, editor.view, (16, 16), control=True)  # Ctrl+click: a negative point cuts the disk
    assert not editor.voxels("a")[5, 16, 16]
    click(effect, editor.view, (10, 10), release_xy=(20, 22))  # a drag: a box
    assert editor.voxels("a")[5, 10:23, 10:21].all()
    undo_states = effect.scriptedEffect._undo_states
    fire(effect.propagateButton, "clicked()")
    standins.run_timers()
    assert effect.scriptedEffect._undo_states == undo_states + 1  # one undo step for the whole propagation
    assert standins.QApplication.cursors == []
    voxels = editor.voxels("a")
    assert voxels[4].any() and voxels[6].any() and "slices" in effect.statusLabel.text
    assert effect.uncertainList.count > 0 and effect.propagateButton.enabled


def test_a_hidden_segment_declined_drops_the_click(editor, effect):
    object.__setattr__(effect.scriptedEffect, "_confirm", standins.ScriptedEffect.NotConfirmed)
    assert click(effect, editor.view, (16, 16)) == (True, False)
    assert not editor.voxels("a").any()
    assert effect.processInteractionEvents(interactor((16, 16), alt=True), vtk.vtkCommand.LeftButtonPressEvent,
                                           editor.view) is False  # Slicer's own Alt/Shift gestures stay


def test_two_quick_clicks_are_two_prompts(editor, effect):
    """Slicer's VTK: press, release, *double click* (instead of the second press), release."""
    double = vtk.vtkCommand.LeftButtonDoubleClickEvent
    click(effect, editor.view, (8, 8))
    assert click(effect, editor.view, (24, 24), event=double) == (True, True)  # aborted: the view stays as it is
    assert len(prompts(editor)) == 2 and editor.voxels("a")[5, 24, 24] and editor.voxels("a")[5, 8, 8]
    assert click(effect, editor.view, (24, 24), control=True, event=double) == (True, True)  # no W/L reset
    assert prompts(editor)[-1].labels.tolist() == [0] and not editor.voxels("a")[5, 24, 24]


class GatedBackend(InProcessBackend):
    """The DiskEngine, but each propagated slice (and an upload) waits for the test to let it through, so the
    user's events land between slices deterministically."""

    def __init__(self):
        super().__init__(DiskEngine(radius=4, shrink=1))
        self.gate = threading.Semaphore(0)

    def open_session(self, *args, upload_progress=None, **kwargs):
        if upload_progress is not None:
            upload_progress(0.45)
            assert self.gate.acquire(timeout=10)
        session = super().open_session(*args, **kwargs)
        propagate, gate = session.propagate, self.gate

        def gated_propagate(*args, **kwargs):
            run = propagate(*args, **kwargs)

            class GatedRun:
                planned, cancel = run.planned, run.cancel
                done = property(lambda self: run.done)
                summary = property(lambda self: run.summary)

                def __iter__(self):
                    for result in run:
                        gate.acquire(timeout=5)  # a timeout, so code that reads on this thread is slow, not stuck
                        yield result
            return GatedRun()

        session.propagate = gated_propagate
        return session


@pytest.fixture
def gated(editor):
    from MedSAM2SlicerLib.logic import shared_logic

    backend = GatedBackend()
    shared_logic().controller.backend = backend
    return backend


def propagate_with_events(editor, effect, gated, *events):
    """Prompt, then propagate while the user's `events` are delivered once, after two slices were written."""
    click(effect, editor.view, (16, 16), between=gated.gate.release)
    while gated.gate.acquire(blocking=False):  # no permit left over from the upload
        pass
    fire(effect.propagateButton, "clicked()")
    assert effect.progressBar.value == 0 and effect.progressBar.maximum == 12  # returned at once: nothing read yet
    delivered = []

    def between():
        if effect.progressBar.value >= 2 and not delivered:
            delivered.append(True)
            slicer.app.pending_events.extend(events)
            slicer.app.processEvents()
        gated.gate.release()

    standins.run_timers(between)
    assert delivered
    return effect.statusLabel.text


def test_selecting_another_segment_during_propagation_stops_it_and_writes_nothing_there(editor, effect, gated):
    status = propagate_with_events(editor, effect, gated, lambda: editor.node.SetSelectedSegmentID("b"))
    assert "changed while MedSAM2 was working" in status
    assert not editor.voxels("b").any()
    assert editor.voxels("a")[5].any()


def test_selecting_another_segmentation_with_the_same_segment_id_writes_nothing_there(editor, effect, gated):
    other = editor.new_segmentation("Other")  # its segments are "a" and "b" too
    status = propagate_with_events(editor, effect, gated, lambda: editor.node.SetAndObserveSegmentationNode(other))
    assert "changed while MedSAM2 was working" in status
    assert not editor.voxels("a", other).any()


def test_a_click_during_propagation_is_swallowed_not_nested(editor, effect, gated):
    nested = []
    status = propagate_with_events(editor, effect, gated, lambda: nested.append(click(effect, editor.view, (8, 8))))
    assert nested == [(True, True)]  # swallowed: no prompt and no window/level either
    assert len(prompts(editor)) == 1 and "slices" in status
    assert not editor.voxels("a")[5, 8, 8]


def test_propagate_is_disabled_and_refused_while_running_and_deactivate_cancels(editor, effect, gated):
    states = []
    status = propagate_with_events(editor, effect, gated, lambda: states.append(effect.propagateButton.enabled),
                                   lambda: fire(effect.propagateButton, "clicked()"), effect.deactivate)
    assert states == [False] and status.startswith("Cancelled")
    assert effect.propagateButton.enabled


def rotate_in_plane(volume, degrees, center_ras):
    """Rotate a volume's grid about the view normal (z) around `center_ras`, its voxels as they are."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    directions = vtk.vtkMatrix4x4()
    for r in range(3):
        for col in range(3):
            directions.SetElement(r, col, rotation[r, col])
    volume.SetIJKToRASDirectionMatrix(directions)
    center = np.asarray(center_ras, float)
    volume.SetOrigin(*(center - rotation @ np.array([center[0], center[1], 0.0])))


def voxels_inside_ras_square(volume, k, low, high):
    """(J, I) of slice k whose voxel centres lie inside the RAS square [low, high]^2 (the user's box)."""
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    ijk_to_ras = slicer.util.arrayFromVTKMatrix(matrix)
    dims = volume.GetImageData().GetDimensions()
    j, i = np.mgrid[: dims[1], : dims[0]]
    ras = ijk_to_ras @ np.stack([i.ravel(), j.ravel(), np.full(i.size, k), np.ones(i.size)])
    inside = (ras[0] >= low) & (ras[0] <= high) & (ras[1] >= low) & (ras[1] <= high)
    return inside.reshape(j.shape)


def test_a_box_drawn_on_a_volume_rotated_in_plane_covers_the_drawn_square(editor, effect):
    rotate_in_plane(editor.volume, 25, (16.0, 16.0, 0.0))
    # As a segmentation created over the rotated volume: the editor writes on the segmentation's reference lattice.
    editor.segmentation.SetReferenceImageGeometryParameterFromVolumeNode(editor.volume)
    editor.logic.UpdateReferenceGeometryImage()  # as the Segment Editor does when the geometry changes
    click(effect, editor.view, (10, 10), release_xy=(22, 22))  # a 12 x 12 mm square on screen
    inside = voxels_inside_ras_square(editor.volume, 5, 10.0, 22.0)
    written = editor.voxels("a")[5].astype(bool)
    assert inside.sum() > 120 and not (inside & ~written).any(), f"{(inside & ~written).sum()} voxels missed"


def test_a_console_box_on_a_volume_rotated_in_plane_covers_the_drawn_square(mrml):
    from MedSAM2SlicerLib.logic import MedSAM2SlicerLogic

    volume = slicer.util.addVolumeFromArray(np.zeros((20, 40, 40), np.int16))
    rotate_in_plane(volume, 25, (20.0, 20.0, 0.0))
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = MedSAM2SlicerLogic()
    logic.connect(engine=DiskEngine())
    segment_id = logic.segment(volume, segmentation, box_ras=[[14.0, 14.0, 10.0], [26.0, 26.0, 10.0]],
                               view="axial", propagate=False)
    inside = voxels_inside_ras_square(volume, 10, 14.0, 26.0)
    written = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)[10].astype(bool)
    assert inside.sum() > 120 and not (inside & ~written).any(), f"{(inside & ~written).sum()} voxels missed"


def test_each_volume_keeps_its_own_intensity_settings_from_its_own_display_window(editor, effect):
    from MedSAM2SlicerLib.logic import shared_logic

    logic = shared_logic()
    logic.set_preprocessing({"preset": "soft_tissue"})  # the panel's default
    opened = []
    open_session = logic.controller.backend.open_session
    logic.controller.backend.open_session = lambda *args, **kw: opened.append(args[3]) or open_session(*args, **kw)
    ct, mr = editor.volume, slicer.util.addVolumeFromArray(np.zeros(SHAPE_KJI, np.int16), name="MR")
    for volume, (window, level) in ((ct, (1500.0, -600.0)), (mr, (300.0, 150.0))):
        volume.CreateDefaultDisplayNodes()
        volume.GetDisplayNode().AutoWindowLevelOff()
        volume.GetDisplayNode().SetWindowLevel(window, level)
    effect.activate()
    assert effect.intensityLabel.text == "CT preset soft_tissue (the panel default)"
    fire(effect.displayWindowButton, "clicked()")  # the CT's own window, not whatever the red view shows
    assert effect.intensityLabel.text == "CT window -600 / 1500 (this volume)"
    click(effect, editor.view, (16, 16))
    editor.logic.SetSourceVolumeNode(mr)  # as the editor widget does
    effect.sourceVolumeNodeChanged()
    assert effect.intensityLabel.text == "CT preset soft_tissue (the panel default)"
    click(effect, editor.view, (16, 16))
    assert opened == [{"level": -600.0, "width": 1500.0}, {"preset": "soft_tissue"}]

    slicer.mrmlScene.SetSaveToXMLString(1)  # saved with the scene: read back from the scene's own file
    slicer.mrmlScene.Commit()
    reloaded = slicer.vtkMRMLScene()
    reloaded.SetLoadFromXMLString(1)
    reloaded.SetSceneXMLString(slicer.mrmlScene.GetSceneXMLString())
    reloaded.Import()
    from MedSAM2SlicerLib import volume_settings

    assert volume_settings.preprocessing_for(reloaded.GetFirstNodeByName("CT"), None) == {"level": -600.0,
                                                                                         "width": 1500.0}
    assert volume_settings.preprocessing_for(reloaded.GetFirstNodeByName("MR"), "default") == "default"
    editor.logic.SetSourceVolumeNode(ct)
    fire(effect.defaultIntensityButton, "clicked()")
    assert effect.intensityLabel.text == "CT preset soft_tissue (the panel default)"


def test_the_first_upload_runs_in_the_background_with_a_wait_cursor_and_its_progress(editor, effect, gated):
    import qt

    seen = []

    def between():
        seen.append((effect.statusLabel.text, list(standins.QApplication.cursors), effect.propagateButton.enabled))
        gated.gate.release()

    effect.processInteractionEvents(interactor((16, 16)), vtk.vtkCommand.LeftButtonPressEvent, editor.view)
    effect.processInteractionEvents(interactor((16, 16)), vtk.vtkCommand.LeftButtonReleaseEvent, editor.view)
    assert not editor.voxels("a").any()  # the click returned before the volume was sent
    standins.run_timers(between)
    assert ("Sending the volume… 45%", [qt.Qt.WaitCursor], False) in seen
    assert standins.QApplication.cursors == [] and effect.propagateButton.enabled
    assert editor.voxels("a")[5, 16, 16]
    click(effect, editor.view, (8, 8))  # the volume is there now: the next prompt is placed at once
    assert editor.voxels("a")[5, 8, 8]


def test_the_direction_list_is_the_connected_backends_asked_once(editor, effect):
    from medsam2_client.protocol import DIRECTIONS
    from MedSAM2SlicerLib.logic import shared_logic

    combo = effect.directionComboBox

    def shown():
        return [combo.itemText(i) for i in range(combo.count)]

    assert shown() == list(DIRECTIONS)  # this extension's list before the backend is asked
    combo.currentText = "forward"

    class ReportingBackend(InProcessBackend):
        asked = 0

        def capabilities(self):
            ReportingBackend.asked += 1
            return {"engine": self.engine.describe(), "propagation": {"directions": ["forward", "both"]}}

    logic = shared_logic()
    logic.connect(engine=DiskEngine(radius=4, shrink=1))  # a new connection: its lists are asked anew
    logic.controller.backend = ReportingBackend(DiskEngine(radius=4, shrink=1))
    effect.activate()
    assert shown() == ["forward", "both"] and combo.currentText == "forward"  # the choice stays where it exists
    effect.activate()
    assert ReportingBackend.asked == 1
    assert logic.choices()["directions"] == ("forward", "both")


def test_the_editors_undo_and_redo_take_the_effects_correction_out_of_the_model_and_back(editor, effect):
    """Ctrl+Z is the Segment Editor's: qMRMLSegmentEditorWidget::undo restores its logic's history, the one the
    effect's saveStateForUndo wrote; the next Propagate must then act as if the correction was never placed."""

    def propagate():
        fire(effect.propagateButton, "clicked()")
        standins.run_timers()
        return editor.voxels("a").copy()

    click(effect, editor.view, (16, 16))  # slice 5
    first = propagate()
    editor.set_view(np.eye(3), (16.0, 16.0, 8.0))
    click(effect, editor.view, (6, 6))  # a correction on slice 8, away from the disk
    corrected = propagate()
    assert corrected[8, 6, 6] and not first[8, 6, 6] and len(prompts(editor)) == 2
    editor.logic.Undo()  # the propagation
    editor.logic.Undo()  # the correction
    assert np.array_equal(editor.voxels("a"), first)
    editor.logic.Redo()  # the correction again: the model has it again
    fire(effect.propagateButton, "clicked()")
    assert "going back to the state Undo/Redo left" in effect.statusLabel.text  # rebuilt on the worker first
    assert not effect.propagateButton.enabled  # one action at a time meanwhile
    standins.run_timers()
    assert np.array_equal(editor.voxels("a"), corrected), "the redone correction is missing"
    editor.logic.Undo()  # that propagation
    editor.logic.Undo()  # the correction
    assert np.array_equal(propagate(), first), "the undone correction came back"
    assert len(prompts(editor)) == 1


def test_an_roi_picked_in_the_effect_is_a_3d_box_that_limits_propagation(editor, effect):
    from medsam2_backend.engine.test_engine import shrink_mask

    fire(effect.roiButton, "clicked()")
    assert "Pick an ROI first" in effect.statusLabel.text and not editor.voxels("a").any()
    effect.setMRMLDefaults()  # as the Segment Editor does when it activates the effect
    effect.updateGUIFromMRML()
    assert effect.roiMarginSpinBox.value == 10  # mm, as the CLI's 3D boxes
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(16.0, 16.0, 5.0)
    roi.SetSize(12.0, 10.0, 2.0)  # slices 4 .. 6 of 0 .. 11 (1 mm slices; RAS = IJK here)
    effect.roiSelector.setCurrentNode(roi)
    effect.roiMarginSpinBox.value = 1  # one slice each way: 3 .. 7
    assert effect.scriptedEffect.parameter("RoiMarginMm") == "1"  # saved with the scene, as the other options
    fire(effect.roiButton, "clicked()")
    standins.run_timers()
    box = np.zeros(SHAPE_KJI[1:], bool)
    box[11:22, 10:23] = True  # the ROI's outline on its centre slice
    assert np.array_equal(editor.voxels("a")[5] > 0, box) and prompts(editor)[0].slice_range == (3, 7)
    assert "propagation stays within slices 3..7" in effect.statusLabel.text
    fire(effect.propagateButton, "clicked()")
    standins.run_timers()
    expected = np.zeros(SHAPE_KJI, bool)
    for k in range(3, 8):
        expected[k] = shrink_mask(box, abs(k - 5))
    assert np.array_equal(editor.voxels("a") > 0, expected)
