"""Writing engine slice masks into a segment with the Segment Editor's semantics, batched and undoable.

Every write goes through a *target*: an object with `segmentation_node`, `save_state_for_undo()`,
`reference_geometry()` (the segmentation's reference lattice, a `vtkOrientedImageData` in the segmentation node's
own coordinates) and `modify(segment_id, labelmap, mode, extent_ijk)` where mode is "add" or "remove" and the
extent is the labelmap's own. In the app the effect is the target (its `modifySegmentByLabelmap` applies masking,
editable area and overwrite); from the console and in tests `EditorLogicTarget` calls the same C++
(`vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap`) directly.

Writes are made on the reference lattice, as every Segment Editor effect's are: the editor applies the editable
area, the intensity range and overwrite only to a modifier labelmap on that lattice (`vtkSlicerSegmentEditorLogic::
ModifySegmentByLabelmap` refuses another geometry for the intensity range and resamples the shared layer for it).
Engine masks live on the source volume's lattice, so a block is resampled (nearest neighbour) onto the reference
lattice when the two differ.

The editor's own "set" mode replaces the *whole* segment (it erases outside the modification extent too), so a
region-limited replace is written as "remove the block's background, then add its foreground", both limited to
the block's extent and both subject to the editor's masking and overwrite settings.
"""

from __future__ import annotations

import pathlib
import tempfile
import time
import types
from typing import Callable

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from . import geometry

# Flush a batch of streamed slices after this many slices or this many seconds, whichever comes first.
BATCH_MAX_SLICES = 32
BATCH_MAX_DELAY_S = 0.5


def headless_scene():
    """A scene plus the Colors/Volumes/Segmentations logics, for use without the Slicer app (console scripts,
    `make demo`, tests). Returns (scene, modules), where `modules.<name>.logic()` mirrors `slicer.modules`;
    `slicer.util`'s array helpers need both set on `slicer`, which the caller does (or patches, in tests)."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    # slicer-core ships no default color files, and without a home the color logic logs an error for that; an
    # empty share folder says the same thing quietly (the built-in color tables are still created).
    home = pathlib.Path(tempfile.gettempdir()) / "medsam2-slicer-headless"
    (home / "share" / "ColorFiles").mkdir(parents=True, exist_ok=True)
    app_logic.SetHomeDirectory(str(home))
    app_logic.SetShareDirectory("share")
    modules = types.SimpleNamespace()
    for name, logic_class in (("Colors", slicer.vtkSlicerColorLogic), ("Volumes", slicer.vtkSlicerVolumesLogic),
                              ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic)):
        logic = logic_class()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(name, logic)
        setattr(modules, name.lower(), types.SimpleNamespace(logic=lambda logic=logic: logic))
    return scene, modules


def new_editor_logic(segmentation_node, source_volume_node, editor_node=None):
    """A Segment Editor logic bound to one segmentation.

    Assumes Slicer >= 5.10, where the Segment Editor's effects write through this same C++ class, so a write
    made here honours the same editor node settings (mask mode, editable intensity range, overwrite mode).
    """
    scene = segmentation_node.GetScene()
    if editor_node is None:
        editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "MedSAM2SegmentEditor")
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(editor_node)
    logic.SetSegmentationNode(segmentation_node)
    logic.SetSourceVolumeNode(source_volume_node)
    return logic


class EditorLogicTarget:
    """Writes into one segmentation through `vtkSlicerSegmentEditorLogic` (console use and tests).

    `history` is where undo states go: by default this logic's own segmentation history; in the app, an open
    Segment Editor for the same segmentation (anything with its `saveStateForUndo()`, `undo()` and `redo()`
    slots), so Ctrl+Z and the console undo the same steps. Writes always honour `editor_node`'s settings.
    """

    def __init__(self, segmentation_node, source_volume_node, editor_node=None, history=None):
        self.segmentation_node = segmentation_node
        self.logic = new_editor_logic(segmentation_node, source_volume_node, editor_node)
        self.history = history

    @property
    def editor_node(self):
        return self.logic.GetSegmentEditorNode()

    def save_state_for_undo(self) -> None:
        if self.history is not None:
            self.history.saveStateForUndo()
        else:
            self.logic.SaveStateForUndo()

    def undo(self) -> None:
        if self.history is not None:
            self.history.undo()
        else:
            self.logic.Undo()

    def redo(self) -> None:
        if self.history is not None:
            self.history.redo()
        else:
            self.logic.Redo()

    def reference_geometry(self):
        """The segmentation's reference lattice, as the editor's own effects get it (headless: from the logic)."""
        if not self.logic.UpdateReferenceGeometryImage():
            return None
        return self.logic.GetReferenceGeometryImage()

    def modify(self, segment_id: str, labelmap, mode: str, extent_ijk: list[int]) -> None:
        modes = {"add": self.logic.ModificationModeAdd, "remove": self.logic.ModificationModeRemove}
        self.logic.ModifySegmentByLabelmap(self.segmentation_node, segment_id, labelmap, modes[mode], extent_ijk,
                                           False, False)


def labelmap_from_array_kji(mask_kji: np.ndarray, extent_ijk: list[int], ijk_to_local: np.ndarray):
    """A vtkOrientedImageData holding a K,J,I uint8 block at `extent_ijk` of a volume with IJK->local `ijk_to_local`."""
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetImageToWorldMatrix(geometry.vtk_matrix(ijk_to_local))
    labelmap.SetExtent(*extent_ijk)
    labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    voxels = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
    voxels[:] = mask_kji.astype(np.uint8, copy=False).reshape(-1)
    return labelmap


def segment_mask_kji(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """A segment's voxels on the source volume's lattice (bool, K,J,I), whatever the segmentation's own geometry
    and both nodes' parent transforms (nearest neighbour, as the editor resamples labelmaps)."""
    shape_kji = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    labelmap = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentation_node, segment_id, labelmap, False) or _is_empty(labelmap.GetExtent()):
        return np.zeros(shape_kji, bool)
    lattice = _lattice(geometry.ijk_to_node_local(volume_node, segmentation_node),
                       geometry.slice_extent_ijk(0, 0, shape_kji[0] - 1, shape_kji))
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, lattice, resampled, False, False, None, 0)
    return _voxels_kji(resampled).reshape(shape_kji) > 0


def _is_empty(extent) -> bool:
    return extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]


def _lattice(ijk_to_local: np.ndarray, extent_ijk):
    """An image geometry without voxels (a resampling target)."""
    image = slicer.vtkOrientedImageData()
    image.SetImageToWorldMatrix(geometry.vtk_matrix(ijk_to_local))
    image.SetExtent(*[int(v) for v in extent_ijk])
    return image


def _voxels_kji(image) -> np.ndarray:
    scalars = image.GetPointData().GetScalars()
    return np.zeros(0, np.uint8) if scalars is None else numpy_support.vtk_to_numpy(scalars)


def _image_to_local(image) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def covering_extent(extent_ijk, ijk_to_local: np.ndarray, reference) -> list[int]:
    """The part of the reference lattice that a block of the source lattice covers (its 8 voxel-corner points
    mapped into reference IJK, rounded outward, clipped to the reference extent)."""
    lo = np.array(extent_ijk[0::2], float) - 0.5
    hi = np.array(extent_ijk[1::2], float) + 0.5
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    to_reference = np.linalg.inv(_image_to_local(reference)) @ ijk_to_local
    ref_ijk = geometry.ijk_to_ras(corners, to_reference)  # a plain affine map: IJK -> reference IJK here
    first = np.floor(ref_ijk.min(axis=0) + 0.5).astype(int)
    last = np.ceil(ref_ijk.max(axis=0) - 0.5).astype(int)
    whole = reference.GetExtent()
    first = np.maximum(first, whole[0::2])
    last = np.minimum(last, whole[1::2])
    return [int(v) for pair in zip(first, last) for v in pair]


class SliceBatchWriter:
    """Collects streamed slice masks and writes each run of adjacent slices as one block (its bounding slab).

    One user action = one writer = one undo step: the state is saved once, before the first write. Streaming N
    slices costs about one write of those N slices, however they arrive. One writer serves several segments
    (`add(..., segment_id=...)`; a multi-segment propagation), each with its own runs, all in the same undo step.
    `reference` is the lattice writes are made on (the target's `reference_geometry()`); None writes on the
    source volume's lattice.
    """

    def __init__(self, target, segment_id: str | None, ijk_to_local: np.ndarray, shape_kji: tuple[int, int, int],
                 axis: int, max_slices: int = BATCH_MAX_SLICES, max_delay_s: float = BATCH_MAX_DELAY_S,
                 clock: Callable[[], float] = time.monotonic, reference=None, save_undo: bool = True):
        self.target, self.segment_id = target, segment_id
        self.ijk_to_local, self.shape_kji, self.axis = ijk_to_local, tuple(shape_kji), axis
        self.max_slices, self.max_delay_s, self.clock = max_slices, max_delay_s, clock
        self.reference = reference
        self._pending: dict[str, dict[int, np.ndarray]] = {}
        self._first_pending_at: dict[str, float] = {}
        self._undo_saved = not save_undo  # False when the caller saved the action's one undo state itself
        self.write_count = 0
        self.voxels_written = 0
        self.slices_written: set[int] = set()
        self.written_by_segment: dict[str, set[int]] = {}
        self.slabs: list[tuple[int, int, int]] = []  # (axis, first, last) of every block written, source lattice

    def add(self, slice_index: int, mask: np.ndarray, segment_id: str | None = None) -> None:
        """Queue one slice mask (engine slice pixels, rows x columns); writes when the batch is due."""
        segment_id = self.segment_id if segment_id is None else segment_id
        pending = self._pending.setdefault(segment_id, {})
        if pending and not min(pending) - 1 <= slice_index <= max(pending) + 1:
            self._flush_segment(segment_id)  # keep each slab one contiguous run, with no unrelated slices
        if not pending:
            self._first_pending_at[segment_id] = self.clock()
        pending[int(slice_index)] = np.asarray(mask, bool)
        if (len(pending) >= self.max_slices
                or self.clock() - self._first_pending_at[segment_id] >= self.max_delay_s):
            self._flush_segment(segment_id)

    def flush(self) -> None:
        """Write every queued slice now (one call per contiguous run and segment)."""
        for segment_id in list(self._pending):
            self._flush_segment(segment_id)

    def _flush_segment(self, segment_id: str) -> None:
        pending = self._pending.get(segment_id)
        if not pending:
            return
        first, last = min(pending), max(pending)
        block_shape = list(self.shape_kji)
        block_shape[self.axis] = last - first + 1
        block = np.zeros(block_shape, np.uint8)
        block_along_axis = np.moveaxis(block, self.axis, 0)  # a view: writing it fills `block`
        for k, mask in pending.items():
            block_along_axis[k - first] = mask
        extent = geometry.slice_extent_ijk(self.axis, first, last, self.shape_kji)
        if not self._undo_saved:
            self.target.save_state_for_undo()
            self._undo_saved = True
        for mode, labelmap in self._modifiers(block, extent):
            self.target.modify(segment_id, labelmap, mode, list(labelmap.GetExtent()))
        self.write_count += 1
        self.voxels_written += block.size
        self.slices_written.update(pending)
        self.written_by_segment.setdefault(segment_id, set()).update(pending)
        self.slabs.append((self.axis, first, last))
        pending.clear()

    def _modifiers(self, block: np.ndarray, extent: list[int]):
        """("remove", background) then ("add", foreground) labelmaps of a block, on the reference lattice."""
        source = labelmap_from_array_kji(np.where(block > 0, 2, 1), extent, self.ijk_to_local)  # 0: not in block
        if self.reference is not None and not slicer.vtkOrientedImageDataResample.DoGeometriesMatch(
                source, self.reference):
            target_extent = covering_extent(extent, self.ijk_to_local, self.reference)
            if _is_empty(target_extent):
                return []
            resampled = slicer.vtkOrientedImageData()
            slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                source, _lattice(_image_to_local(self.reference), target_extent), resampled, False, False, None, 0)
            source = resampled
        codes = _voxels_kji(source)
        modifiers = []
        for mode, code in (("remove", 1), ("add", 2)):
            if mode == "add" and not (codes == code).any():
                continue
            labelmap = slicer.vtkOrientedImageData()
            labelmap.DeepCopy(source)
            _voxels_kji(labelmap)[:] = codes == code
            modifiers.append((mode, labelmap))
        return modifiers
