"""Prompts you can see (list, removal, markers) and the effect's options and shortcuts.

Removal and markers run on real MRML (slicer-core) with the deterministic DiskEngine, so the voxels are known. The
effect runs against the strict stand-ins (`slicer_standins`), whose scripted effect stores parameters as Slicer's
C++ does (`qSlicerSegmentEditorAbstractEffect::setParameter`: "<effect name>.<name>" attributes on the real Segment
Editor node), and the scene is saved and loaded again; keys, clicks and drags arrive on real interactors in the
real scene of `test_effect_in_editor`'s editor.
"""

import re

import numpy as np
import pytest
import slicer
import slicer_standins as standins
import vtk
from slicer_standins import fire, gui_stubs  # noqa: F401  (a fixture)
from test_effect_in_editor import editor, effect, interactor, prompts  # noqa: F401  (fixtures and helpers)

from MedSAM2SlicerLib import effect_options, geometry, prompt_list, scenarios
from MedSAM2SlicerLib.controller import MedSAM2ActionError
from MedSAM2SlicerLib.logic import MedSAM2SlicerLogic

AXIAL_IJK_TO_RAS = np.diag([1.0, 1.0, 2.0, 1.0])  # I=R, J=A, K=S: 1 x 1 x 2 mm


@pytest.fixture
def segmenting(mrml):
    """A volume, a segmentation, a logic on the DiskEngine (boxes = their pixels, shrinking 1 px per slice)."""
    from medsam2_backend.engine import DiskEngine

    volume = scenarios.add_volume(shape_kji=(12, 40, 40), ijk_to_ras=AXIAL_IJK_TO_RAS)
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = MedSAM2SlicerLogic()
    logic.connect(engine=DiskEngine(radius=4, shrink=1))
    yield logic, volume, segmentation
    logic.close()


def _box_ras(k, lo, hi):
    return geometry.ijk_to_ras(np.array([[lo, lo, k], [hi, hi, k]], float), AXIAL_IJK_TO_RAS)


def _mask(segmentation, segment_id, volume):
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume) > 0


def test_describe_lists_slice_and_kind():
    prompt = prompt_list.RasPrompt(7, 0, np.zeros((3, 3)), np.array([1, 0, 1]), np.zeros((2, 3)))
    assert prompt_list.describe(prompt) == "slice 7: box, 2 positive, 1 negative"
    assert prompt_list.describe(prompt_list.RasPrompt(3, 0, box_corners_ras=np.zeros((2, 3)))) == "slice 3: box"


def test_removing_the_latest_prompt_replays_the_rest_and_repropagates_in_one_undo_step(segmenting):
    logic, volume, segmentation = segmenting
    segment_id = logic.segment(volume, segmentation, box_ras=_box_ras(6, 10, 25), view="axial", propagate=False)
    logic.propagate(volume, segmentation, segment_id, direction="forward", stop=9)
    with_box_only = _mask(segmentation, segment_id, volume)
    # A negative point on slice 8 then removed: the segment is exactly as before the point.
    point = geometry.ijk_to_ras(np.array([[17.0, 17.0, 8.0]]), AXIAL_IJK_TO_RAS)
    logic.segment(volume, segmentation, segment_id, points_ras=point, labels=[0], view="axial", propagate=False)
    logic.propagate(volume, segmentation, segment_id, direction="forward", stop=9)
    assert not np.array_equal(_mask(segmentation, segment_id, volume), with_box_only)
    target = logic.target_for(segmentation, volume)
    before = _mask(segmentation, segment_id, volume)
    saved = []
    original_save = target.save_state_for_undo
    target.save_state_for_undo = lambda: (saved.append(1), original_save())
    outcome = prompt_list.remove_prompt(logic.controller, volume, target, segment_id)
    assert saved == [1]  # clear + replay + re-propagation: one undo step
    assert outcome.removed.slice_index == 8 and outcome.remaining == 1 and not outcome.reset
    assert outcome.propagated_slices == 4  # the last propagation (forward from 6 to 9) again: slices 6..9
    np.testing.assert_array_equal(_mask(segmentation, segment_id, volume), with_box_only)
    assert [p.slice_index for p in logic.controller.prompts(volume, segment_id)] == [6]
    target.undo()
    np.testing.assert_array_equal(_mask(segmentation, segment_id, volume), before)


def test_removing_a_prompt_keeps_the_painted_slices_the_model_was_given(segmenting):
    """An edited slice taken as a correction, and a slice given with "Use segment as prompt", are mask prompts:
    removing another prompt replays them as they were (they have no point or box to replay)."""
    logic, volume, segmentation = segmenting
    segment_id = logic.segment(volume, segmentation, box_ras=_box_ras(6, 10, 25), view="axial", propagate=False)
    logic.propagate(volume, segmentation, segment_id)
    painted = np.zeros((12, 40, 40), np.uint8)
    painted[8, 2:9, 30:38] = 1  # a blob painted by hand on slice 8, away from the box
    slicer.util.updateSegmentBinaryLabelmapFromArray(
        np.maximum(painted, _mask(segmentation, segment_id, volume)), segmentation, segment_id, volume)
    assert logic.propagate(volume, segmentation, segment_id).edits_taken == {segment_id: [8]}
    point = geometry.ijk_to_ras(np.array([[17.0, 17.0, 4.0]]), AXIAL_IJK_TO_RAS)
    logic.segment(volume, segmentation, segment_id, points_ras=point, labels=[0], propagate=False)
    outcome = prompt_list.remove_prompt(logic.controller, volume, logic.target_for(segmentation, volume), segment_id)
    assert outcome.remaining == 2 and [p.source for p in logic.controller.prompts(volume, segment_id)] == [
        "prompt", "edit"]
    mask = _mask(segmentation, segment_id, volume)
    assert mask[8, 2:9, 30:38].all() and mask[9, 4:7, 32:36].all()  # the edit is still the model's correction


def test_removing_a_prompt_that_was_never_propagated_clears_its_slice_only(segmenting):
    logic, volume, segmentation = segmenting
    segment_id = logic.segment(volume, segmentation, box_ras=_box_ras(3, 5, 15), view="axial", propagate=False)
    logic.segment(volume, segmentation, segment_id, box_ras=_box_ras(9, 20, 30), view="axial", propagate=False)
    outcome = prompt_list.remove_prompt(logic.controller, volume, logic.target_for(segmentation, volume),
                                        segment_id, index=0)
    assert outcome.removed.slice_index == 3 and outcome.propagated_slices == 0
    mask = _mask(segmentation, segment_id, volume)
    assert not mask[3].any() and mask[9, 20:31, 20:31].all() and mask.sum() == 11 * 11


def test_removing_the_last_prompt_resets_the_segment(segmenting):
    logic, volume, segmentation = segmenting
    segment_id = logic.segment(volume, segmentation, box_ras=_box_ras(4, 5, 15), view="axial", propagate=False)
    outcome = prompt_list.remove_prompt(logic.controller, volume, logic.target_for(segmentation, volume), segment_id)
    assert outcome.reset and outcome.remaining == 0 and not _mask(segmentation, segment_id, volume).any()
    assert logic.controller.prompts(volume, segment_id) == []
    with pytest.raises(MedSAM2ActionError, match="no MedSAM2 prompt to remove"):
        prompt_list.remove_prompt(logic.controller, volume, logic.target_for(segmentation, volume), segment_id)
    with pytest.raises(MedSAM2ActionError, match="Place a point or a box"):  # the object is gone: a Reset
        logic.propagate(volume, segmentation, segment_id)


def test_a_replayed_prompt_keeps_its_axis_on_an_oblique_volume(mrml):
    volume = scenarios.add_volume()  # oblique, flipped, anisotropic
    for axis in range(3):
        matrix = prompt_list.slice_to_ras_along(volume, axis)
        assert np.allclose(matrix[:3, :3].T @ matrix[:3, :3], np.eye(3))
        choice = geometry.choose_propagation_axis(geometry.ijk_to_world_ras(volume), matrix)
        assert choice.axis == axis and choice.warning is None


def test_markers_show_each_prompt_on_its_slice_hidden_and_not_saved(segmenting, mrml):
    logic, volume, segmentation = segmenting
    segment_id = logic.segment(volume, segmentation, box_ras=_box_ras(6, 10, 25), view="axial", propagate=False)
    points = geometry.ijk_to_ras(np.array([[12.0, 12.0, 6.0], [20.0, 20.0, 6.0]]), AXIAL_IJK_TO_RAS)
    logic.segment(volume, segmentation, segment_id, points_ras=points, labels=[1, 0], view="axial", propagate=False)
    made = prompt_list.show_markers(mrml, segmentation, segment_id, logic.controller.prompts(volume, segment_id),
                                    volume)
    kinds = sorted((n.GetClassName(), n.GetName()) for n in made)
    assert kinds == [("vtkMRMLMarkupsFiducialNode", "MedSAM2 negative points"),
                     ("vtkMRMLMarkupsFiducialNode", "MedSAM2 positive points"),
                     ("vtkMRMLMarkupsROINode", "MedSAM2 box")]
    for node in made:
        assert node.GetHideFromEditors() and not node.GetSaveWithScene() and node.GetLocked()
        display = node.GetDisplayNode()
        assert display.GetVisibility2D() and not display.GetVisibility3D() and not display.GetHandlesInteractive()
    positive = next(n for n in made if n.GetName().endswith("positive points"))
    np.testing.assert_allclose(positive.GetNthControlPointPosition(0), points[0])
    assert positive.GetDisplayNode().GetSelectedColor() == pytest.approx(prompt_list.POSITIVE_RGB)
    box = next(n for n in made if n.GetClassName() == "vtkMRMLMarkupsROINode")
    bounds = [0.0] * 6
    box.GetRASBounds(bounds)
    np.testing.assert_allclose(bounds, [10, 25, 10, 25, 11.5, 12.5])  # slice 6 at S = 12 mm, half a slice thick
    # Saved scenes do not contain them.
    mrml.SetSaveToXMLString(1)
    mrml.Commit()
    assert "MedSAM2 box" not in mrml.GetSceneXMLString() and segmentation.GetID() in mrml.GetSceneXMLString()
    # The same prompts again keep the same nodes; changed prompts replace them; no prompt left (a Reset): none.
    prompts = logic.controller.prompts(volume, segment_id)
    assert prompt_list.show_markers(mrml, segmentation, segment_id, prompts, volume) == made
    fewer = prompt_list.show_markers(mrml, segmentation, segment_id, prompts[:1], volume)
    assert [n.GetClassName() for n in fewer] == ["vtkMRMLMarkupsROINode"] and fewer[0] not in made
    assert prompt_list.marker_nodes(mrml) == fewer
    assert len(prompt_list.show_markers(mrml, segmentation, segment_id, [], volume)) == 0
    assert prompt_list.marker_nodes(mrml) == []


def test_the_rubber_band_follows_the_drag_and_goes_away(mrml):
    volume = scenarios.add_volume(shape_kji=(12, 40, 40), ijk_to_ras=AXIAL_IJK_TO_RAS)
    first = prompt_list.rubber_band(mrml, [0, 0, 12], [5, 8, 12], volume, axis=0)
    second = prompt_list.rubber_band(mrml, [0, 0, 12], [10, 20, 12], volume, axis=0)
    assert first is second and first.GetSize() == pytest.approx([10, 20, 1.0])
    prompt_list.remove_rubber_band(mrml)
    assert prompt_list.marker_nodes(mrml) == []


# ---- options and shortcuts -----------------------------------------------------------------------------------
def _effect_on(node):
    """The effect with its options frame, its scripted effect's parameter set node `node` (in any scene)."""
    from SegmentEditorMedSAM2Lib import SegmentEditorEffect

    editor_logic = slicer.vtkSlicerSegmentEditorLogic()
    editor_logic.SetMRMLScene(node.GetScene())
    editor_logic.SetSegmentEditorNode(node)
    effect = SegmentEditorEffect(standins.ScriptedEffect(editor_logic))
    effect.setupOptionsFrame()
    return effect


def test_options_live_in_the_parameter_node_and_survive_save_and_reload(gui_stubs, mrml):  # noqa: F811
    node = mrml.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    effect = _effect_on(node)
    effect.setMRMLDefaults()
    assert {key: node.GetAttribute(f"MedSAM2.{key}") for key in effect_options.DEFAULTS} == {
        "Direction": "both", "RangeStart": "-1", "RangeStop": "-1", "StopAfterEmpty": "0", "AllSegments": "0",
        "RoiMarginMm": "10"}
    assert all(standins.connected(w, s) == [effect.updateMRMLFromGUI]
               for w, s, _r, _w in effect._optionWidgets().values())
    # The user changes the widgets: their signals write the parameter node.
    effect.directionComboBox.currentText, effect.rangeStopSpinBox.value, effect.stopAfterEmptySpinBox.value = (
        "forward", 30, 3)
    effect.allSegmentsCheckBox.checked = True
    effect.roiMarginSpinBox.value = 25
    assert {key: node.GetAttribute(f"MedSAM2.{key}") for key in effect_options.DEFAULTS} == {
        "Direction": "forward", "RangeStart": "-1", "RangeStop": "30", "StopAfterEmpty": "3", "AllSegments": "1",
        "RoiMarginMm": "25"}
    effect.setMRMLDefaults()  # defaults never overwrite what the user chose
    mrml.SetSaveToXMLString(1)
    mrml.Commit()
    xml = mrml.GetSceneXMLString()

    from MedSAM2SlicerLib.mrml_io import headless_scene

    reloaded, _modules = headless_scene()  # its logics register the segmentation node classes
    reloaded.SetLoadFromXMLString(1)
    reloaded.SetSceneXMLString(xml)
    reloaded.Import()
    loaded_node = reloaded.GetFirstNodeByClass("vtkMRMLSegmentEditorNode")
    fresh = _effect_on(loaded_node)
    # Shown with signals blocked: the first widget set must not write the others' defaults over the stored values.
    fresh.updateGUIFromMRML()
    assert (fresh.directionComboBox.currentText, fresh.rangeStartSpinBox.value, fresh.rangeStopSpinBox.value,
            fresh.stopAfterEmptySpinBox.value, fresh.allSegmentsCheckBox.checked, fresh.roiMarginSpinBox.value) == (
        "forward", -1, 30, 3, True, 25)
    assert loaded_node.GetAttribute("MedSAM2.RangeStop") == "30"
    assert not any(standins.signals_blocked(w) for w, _s, _r, _w in fresh._optionWidgets().values())
    for each in (effect, fresh):
        each.cleanup()
        assert all(standins.connected(w, s) == [] for w, s, _r, _w in each._optionWidgets().values())


@pytest.mark.parametrize("name, raw, expected", [
    ("Direction", "sideways", "both"), ("Direction", "backward", "backward"), ("RangeStop", "12", 12),
    ("RangeStop", "abc", -1), ("StopAfterEmpty", None, 0), ("RangeStart", "-7", -1), ("RangeStart", "4.0", 4)])
def test_a_stored_value_that_does_not_parse_falls_back_to_its_default(name, raw, expected):
    assert effect_options.typed(name, raw) == expected


def test_no_shortcut_takes_a_key_slicer_binds_and_the_help_lists_them_all():
    assert not set(effect_options.SHORTCUTS) & effect_options.TAKEN_BY_SLICER
    assert set(effect_options.SHORTCUTS.values()) == {"propagate", "cancel", "toggle_sign", "remove_latest_prompt",
                                                      "next_least_certain"}
    help_text = effect_options.help_text()
    for key in ("<b>p</b>", "<b>Enter</b>", "<b>c</b>", "<b>n</b>", "<b>x</b>", "<b>j</b>", "Ctrl+click", "⌘"):
        assert key in help_text, key


def press_key(effect, view, key_sym):
    """A KeyPressEvent on a real interactor (the Segment Editor observes it on every view's interactor)."""
    rwi = vtk.vtkRenderWindowInteractor()
    rwi.SetKeySym(key_sym)
    return effect.processInteractionEvents(rwi, vtk.vtkCommand.KeyPressEvent, view)


def test_shortcut_keys_run_their_actions_and_other_keys_pass_through(editor, effect):  # noqa: F811
    ran, actions = [], ("onPropagate", "_onCancel", "onRemoveLatestPrompt", "onJumpToNextLeastCertain")
    for name in actions:
        setattr(effect, name, lambda name=name: ran.append(name))
    try:
        for key in ("p", "Return", "c", "x", "j"):
            assert press_key(effect, editor.view, key) is True
        assert press_key(effect, standins.ThreeDWidget(), "p") is True  # over the 3D view too
    finally:
        for name in actions:  # the fixture's cleanup disconnects the real slots
            delattr(effect, name)
    assert ran == ["onPropagate", "onPropagate", "_onCancel", "onRemoveLatestPrompt", "onJumpToNextLeastCertain",
                   "onPropagate"]
    for key in ("z", "Escape", "space", "1", "r", "a"):  # the editor's and the views' own keys go on to them
        assert press_key(effect, editor.view, key) is False
    # n: the next click (and only that one) has the other sign.
    assert press_key(effect, editor.view, "n") is True
    assert effect.takeNextClickNegative() is True and effect.takeNextClickNegative() is False


def click_at(effect, view, xy, control=False):
    effect.processInteractionEvents(interactor(xy, control), vtk.vtkCommand.LeftButtonPressEvent, view)
    effect.processInteractionEvents(interactor(xy, control), vtk.vtkCommand.LeftButtonReleaseEvent, view)
    standins.run_timers()  # the first prompt sends the volume on a worker thread


def test_n_flips_one_click_and_x_and_the_button_remove_prompts_in_one_undo_step(editor, effect):  # noqa: F811
    click_at(effect, editor.view, (16, 16))
    press_key(effect, editor.view, "n")
    assert effect.statusLabel.text == "Next click: negative point."
    click_at(effect, editor.view, (16, 16))  # negative: cuts the disk's centre
    press_key(effect, editor.view, "n")
    click_at(effect, editor.view, (8, 8), control=True)  # n with Ctrl: positive
    click_at(effect, editor.view, (24, 24))  # n applied to one click only: positive
    assert [p.labels.tolist() for p in prompts(editor)] == [[1], [0], [1], [1]]
    assert not editor.voxels("a")[5, 16, 16] and editor.voxels("a")[5, 8, 8] and editor.voxels("a")[5, 24, 24]
    assert effect.promptList.count == 4 and effect.promptList.item(1).text() == "slice 5: 1 negative"
    undo_states = effect.scriptedEffect._undo_states
    assert press_key(effect, editor.view, "x") is True  # the latest prompt goes; the others are replayed
    assert len(prompts(editor)) == 3 and not editor.voxels("a")[5, 24, 24] and editor.voxels("a")[5, 8, 8]
    assert effect.scriptedEffect._undo_states == undo_states + 1
    assert effect.statusLabel.text == "Removed the prompt on slice 5. 3 prompt(s) replayed."  # nothing propagated
    effect.promptList.setCurrentRow(1)  # the negative point, selected in the list
    fire(effect.removePromptButton, "clicked()")
    assert [p.labels.tolist() for p in prompts(editor)] == [[1], [1]] and editor.voxels("a")[5, 16, 16]
    assert effect.promptList.count == 2 and effect.scriptedEffect._undo_states == undo_states + 2
    fire(effect.propagateButton, "clicked()")
    standins.run_timers()
    propagated = editor.voxels("a")
    assert propagated[4, 16, 16] and propagated[4, 8, 8]
    press_key(effect, editor.view, "x")  # after a propagation: it is run again, without the removed prompt,
    assert effect.progressBar.value == 0 and not effect.propagateButton.enabled  # on a worker thread
    standins.run_timers()
    replayed = re.fullmatch(r"Removed the prompt on slice 5\. 1 prompt\(s\) replayed\. Propagated again: "
                            r"(\d+) slices\.", effect.statusLabel.text)
    assert replayed and int(replayed.group(1)) > 1 and effect.scriptedEffect._undo_states == undo_states + 4
    assert effect.propagateButton.enabled
    assert editor.voxels("a")[4, 16, 16] and not editor.voxels("a")[4:7, 8, 8].any()


def test_next_least_certain_cycles_through_the_list(effect):  # noqa: F811
    effect.onJumpToNextLeastCertain()
    assert effect.statusLabel.text == "No least certain slices yet: propagate first."
    import qt

    for text in ("worst", "second"):
        effect.uncertainList.addItem(qt.QListWidgetItem(text))
    jumped = []
    effect.onJumpToSlice = lambda item: jumped.append(item.text())
    try:
        for _ in range(3):
            effect.onJumpToNextLeastCertain()
    finally:
        del effect.onJumpToSlice  # the fixture's cleanup disconnects the real slot
    assert jumped == ["worst", "second", "worst"] and effect.uncertainList.currentRow == 0


def test_dragging_shows_a_rubber_band_that_the_release_turns_into_the_box_prompt(editor, effect, mrml):  # noqa: F811
    view, move = editor.view, vtk.vtkCommand.MouseMoveEvent  # the red view: (x, y) px is (x, y, 5) mm in RAS
    assert effect.processInteractionEvents(interactor((12, 22)), move, view) is False  # no button: nothing
    assert prompt_list.marker_nodes(mrml) == []
    effect.processInteractionEvents(interactor((10, 20)), vtk.vtkCommand.LeftButtonPressEvent, view)
    assert effect.processInteractionEvents(interactor((12, 22)), move, view) is False  # within the click radius
    assert prompt_list.marker_nodes(mrml) == []
    assert effect.processInteractionEvents(interactor((25, 30)), move, view) is False  # the view keeps the move
    (band,) = prompt_list.marker_nodes(mrml, "rubber band")
    bounds = [0.0] * 6
    band.GetRASBounds(bounds)
    np.testing.assert_allclose(bounds[:4], [10, 25, 20, 30])
    assert effect.processInteractionEvents(interactor((25, 30)), vtk.vtkCommand.LeftButtonReleaseEvent, view) is True
    standins.run_timers()
    assert prompt_list.marker_nodes(mrml, "rubber band") == []
    (box,) = prompts(editor)
    assert box.box_corners_ras is not None and box.points_ras is None
    assert editor.voxels("a")[5, 20:31, 10:26].all()
    assert effect.promptList.count == 1 and effect.promptList.item(0).text() == "slice 5: box"
    assert [n.GetName() for n in prompt_list.marker_nodes(mrml)] == ["MedSAM2 box"]
