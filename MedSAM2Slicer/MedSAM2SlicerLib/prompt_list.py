"""A segment's prompts as the user sees them: the list in the effect, removing one, and markers in the views.

Removing a prompt replays the remaining ones and, when the segment had been propagated, propagates again with the
options of its last propagation; the removed prompt's slice is cleared first, so what it alone drew disappears.
With none left, the segment is reset (its other voxels stay: they are the user's, and Undo restores them all).
The whole removal is one undo step.

Markers are markups nodes (Slicer's own means: every slice view draws them, only on the slice they lie on, and they
need no rendering code of ours): per segment, a point list of positive points (green), one of negative points
(red), and a flat ROI per box (yellow). They are locked, hidden from the Data module and never saved with the
scene; a rubber-band ROI follows the drag of a box. Nothing here imports Qt.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import geometry
from .controller import MedSAM2ActionError, RasPrompt
from .mrml_io import SliceBatchWriter

MARKER_ATTRIBUTE = "MedSAM2.PromptMarker"  # "<segmentation node id>/<segment id>"; "rubber band" for the drag
SIGNATURE_ATTRIBUTE = "MedSAM2.PromptSignature"  # the prompts a segment's markers show
POSITIVE_RGB, NEGATIVE_RGB, BOX_RGB = (0.2, 0.9, 0.2), (0.95, 0.2, 0.2), (1.0, 0.85, 0.1)
AXIS_NAMES = {0: "K", 1: "J", 2: "I"}  # engine axis (K,J,I array order) -> volume index


def tr(text: str) -> str:
    """Translation hook (the effect rebinds it to `slicer.i18n.tr`)."""
    return text


def describe(prompt: RasPrompt) -> str:
    """One line of the effect's prompt list: its slice and kind."""
    parts = []
    if prompt.box_corners_ras is not None:
        parts.append(tr("box"))
    if prompt.labels is not None:
        positive = int(np.count_nonzero(prompt.labels))
        negative = len(prompt.labels) - positive
        if positive:
            parts.append(tr("{n} positive").format(n=positive))
        if negative:
            parts.append(tr("{n} negative").format(n=negative))
    return tr("slice {k}: {kinds}").format(k=prompt.slice_index, kinds=", ".join(parts))


@dataclasses.dataclass
class RemovalOutcome:
    removed: RasPrompt
    remaining: int
    propagated_slices: int  # slices written by the re-propagation (0 when none was needed, or not run yet)
    reset: bool  # no prompt was left: the segment was reset
    repropagate: dict | None = None  # with propagate=False: the options to propagate again with, into `step`
    step: "OneUndoStep | None" = None  # the removal's undo step, for that propagation to write into


class OneUndoStep:
    """A write target whose undo state is saved once, so a removal (clear + replays + propagation) is one step.
    Anything else is the wrapped target's (e.g. the effect's selection pinning)."""

    def __init__(self, target):
        self._target, self._saved = target, False
        self.segmentation_node = target.segmentation_node

    def __getattr__(self, name):
        return getattr(self._target, name)

    def save_state_for_undo(self):
        if not self._saved:
            self._target.save_state_for_undo()
            self._saved = True

    def reference_geometry(self):
        return self._target.reference_geometry()

    def modify(self, segment_id, labelmap, mode, extent_ijk):
        self._target.modify(segment_id, labelmap, mode, extent_ijk)


def slice_to_ras_along(volume_node, axis: int) -> np.ndarray:
    """A view matrix whose normal is the volume's `axis` (K,J,I order), so a replayed prompt keeps its axis."""
    ijk_to_ras = geometry.ijk_to_world_ras(volume_node)
    normal = ijk_to_ras[:3, 2 - axis] / np.linalg.norm(ijk_to_ras[:3, 2 - axis])
    _rows, cols = geometry.slice_plane_axes(axis)  # in-plane "right" along the slice's columns, as the engine's x
    right = ijk_to_ras[:3, 2 - cols] - normal * (ijk_to_ras[:3, 2 - cols] @ normal)
    right /= np.linalg.norm(right)
    matrix = np.eye(4)
    matrix[:3, 0], matrix[:3, 1], matrix[:3, 2] = right, np.cross(normal, right), normal
    return matrix


def remove_prompt(controller, volume_node, target, segment_id: str, index: int = -1,
                  propagate: bool = True) -> RemovalOutcome:
    """Remove the segment's prompt `index` (default: the latest); see the module docstring for what follows.
    With `propagate=False` the re-propagation is left to the caller (a GUI runs it off its main thread): the
    outcome names its options and the undo step to write it into."""
    prompts = controller.prompts(volume_node, segment_id, target)
    if not prompts:
        raise MedSAM2ActionError(tr("This segment has no MedSAM2 prompt to remove."))
    removed = prompts.pop(index)
    last = controller.last_propagation.get((volume_node.GetID(), segment_id))
    step = OneUndoStep(target)
    controller.reset_segment(volume_node, step, segment_id)
    shape = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    writer = SliceBatchWriter(step, segment_id, geometry.ijk_to_node_local(volume_node, target.segmentation_node),
                              shape, removed.axis, reference=step.reference_geometry())
    writer.add(removed.slice_index, np.zeros([n for a, n in enumerate(shape) if a != removed.axis], bool))
    writer.flush()
    for prompt in prompts:
        if prompt.mask is not None:  # the user's voxels given as they were ("Use segment as prompt", an edit)
            controller.add_mask_prompt(volume_node, step, segment_id, prompt.axis, prompt.slice_index, prompt.mask,
                                       prompt.source)
            continue
        controller.add_prompt(volume_node, step, segment_id, points_ras=prompt.points_ras, labels=prompt.labels,
                              box_corners_ras=prompt.box_corners_ras,
                              slice_to_ras=slice_to_ras_along(volume_node, prompt.axis),
                              box_margin_mm=prompt.box_margin_mm or geometry.DEFAULT_BOX_MARGIN_MM)
    again = dict(last) if prompts and last is not None else None
    if again is None or not propagate:
        return RemovalOutcome(removed, len(prompts), 0, reset=not prompts, repropagate=again, step=step)
    propagated = controller.propagate(volume_node, step, segment_id, **again).slices_written
    return RemovalOutcome(removed, len(prompts), propagated, reset=not prompts)


# ---- markers -------------------------------------------------------------------------------------------------------
def _hidden_node(scene, class_name: str, name: str, key: str, rgb):
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetHideFromEditors(True)  # not in the Data module / subject hierarchy
    node.SetSaveWithScene(False)
    node.SetLocked(True)  # markers show prompts; they are not handles to drag
    node.SetAttribute(MARKER_ATTRIBUTE, key)
    display = node.GetDisplayNode()
    if display is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    display.SetSelectedColor(*rgb)
    display.SetColor(*rgb)
    display.SetPointLabelsVisibility(False)
    display.SetPropertiesLabelVisibility(False)
    display.SetHandlesInteractive(False)
    display.SetVisibility3D(False)  # prompts belong to slices; the 3D view shows the result
    return node


def marker_nodes(scene, key: str | None = None) -> list:
    """Every marker node (of one segment when `key` is "<segmentation id>/<segment id>")."""
    nodes = []
    for class_name in ("vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsROINode"):
        for n in range(scene.GetNumberOfNodesByClass(class_name)):
            node = scene.GetNthNodeByClass(n, class_name)
            value = node.GetAttribute(MARKER_ATTRIBUTE)
            if value is not None and (key is None or value == key):
                nodes.append(node)
    return nodes


def _signature(prompts: list[RasPrompt]) -> str:
    return repr([(p.slice_index, p.axis, *(None if a is None else np.round(a, 4).tolist()
                                          for a in (p.points_ras, p.labels, p.box_corners_ras))) for p in prompts])


def show_markers(scene, segmentation_node, segment_id: str, prompts: list[RasPrompt], volume_node) -> list:
    """Replace the segment's markers by markers of `prompts`; returns the segment's marker nodes. Unchanged
    prompts keep their nodes (the editor refreshes its GUI often; nodes are not re-created each time)."""
    key = f"{segmentation_node.GetID()}/{segment_id}"
    signature = _signature(prompts)
    existing = marker_nodes(scene, key)
    if existing and all(node.GetAttribute(SIGNATURE_ATTRIBUTE) == signature for node in existing):
        return existing
    for node in existing:
        scene.RemoveNode(node)
    if not prompts:
        return []
    made = []
    for sign, rgb in ((1, POSITIVE_RGB), (0, NEGATIVE_RGB)):
        points = [p for prompt in prompts if prompt.points_ras is not None
                  for p, label in zip(prompt.points_ras, prompt.labels) if int(label) == sign]
        if points:
            node = _hidden_node(scene, "vtkMRMLMarkupsFiducialNode",
                                f"MedSAM2 {'positive' if sign else 'negative'} points", key, rgb)
            for point in points:
                node.AddControlPoint(*[float(v) for v in point])
            made.append(node)
    for prompt in prompts:
        if prompt.box_corners_ras is not None:
            node = _hidden_node(scene, "vtkMRMLMarkupsROINode", "MedSAM2 box", key, BOX_RGB)
            set_flat_box(node, prompt.box_corners_ras, volume_node, prompt.axis)
            made.append(node)
    for node in made:
        node.SetAttribute(SIGNATURE_ATTRIBUTE, signature)
    return made


def set_flat_box(roi_node, corners_ras, volume_node, axis: int) -> None:
    """An ROI in the slice's plane (oriented like the volume's slices, so oblique volumes work) spanning the box's
    corners, half a slice thick: only the slice the box is on shows it."""
    corners = np.asarray(corners_ras, float)
    frame = slice_to_ras_along(volume_node, axis)  # columns: in-plane right, in-plane up, slice normal
    center = corners.mean(axis=0)
    frame[:3, 3] = center
    roi_node.SetAndObserveObjectToNodeMatrix(geometry.vtk_matrix(frame))
    along = (corners - center) @ frame[:3, :3]
    spacing = np.linalg.norm(geometry.ijk_to_world_ras(volume_node)[:3, 2 - axis])
    roi_node.SetSize(float(np.ptp(along[:, 0])), float(np.ptp(along[:, 1])), 0.5 * float(spacing))


def rubber_band(scene, corner_a_ras, corner_b_ras, volume_node, axis: int):
    """The ROI that follows a box being dragged (made on first use, reused after)."""
    nodes = [n for n in marker_nodes(scene) if n.GetAttribute(MARKER_ATTRIBUTE) == "rubber band"]
    node = nodes[0] if nodes else _hidden_node(scene, "vtkMRMLMarkupsROINode", "MedSAM2 box (dragging)",
                                               "rubber band", BOX_RGB)
    set_flat_box(node, [corner_a_ras, corner_b_ras], volume_node, axis)
    return node


def remove_rubber_band(scene) -> None:
    for node in marker_nodes(scene, "rubber band"):
        scene.RemoveNode(node)
