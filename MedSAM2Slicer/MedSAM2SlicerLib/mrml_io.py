"""Writing engine slice masks into a segment with the Segment Editor's semantics, batched and undoable.

Every write goes through a *target*: an object with `segmentation_node`, `save_state_for_undo()` and
`modify(segment_id, labelmap, mode, extent_ijk)` where mode is "add" or "remove". In the app the effect is the
target (its `modifySelectedSegmentByLabelmap` applies masking, editable area and overwrite); from the console and
in tests `EditorLogicTarget` calls the same C++ (`vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap`) directly.

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
    """Writes into one segmentation through `vtkSlicerSegmentEditorLogic` (console use and tests)."""

    def __init__(self, segmentation_node, source_volume_node, editor_node=None):
        self.segmentation_node = segmentation_node
        self.logic = new_editor_logic(segmentation_node, source_volume_node, editor_node)

    @property
    def editor_node(self):
        return self.logic.GetSegmentEditorNode()

    def save_state_for_undo(self) -> None:
        self.logic.SaveStateForUndo()

    def undo(self) -> None:
        self.logic.Undo()

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


class SliceBatchWriter:
    """Collects streamed slice masks and writes each run of adjacent slices as one block (its bounding slab).

    One user action = one writer = one undo step: the state is saved once, before the first write. Streaming N
    slices costs about one write of those N slices, however they arrive.
    """

    def __init__(self, target, segment_id: str, ijk_to_local: np.ndarray, shape_kji: tuple[int, int, int],
                 axis: int, max_slices: int = BATCH_MAX_SLICES, max_delay_s: float = BATCH_MAX_DELAY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.target, self.segment_id = target, segment_id
        self.ijk_to_local, self.shape_kji, self.axis = ijk_to_local, tuple(shape_kji), axis
        self.max_slices, self.max_delay_s, self.clock = max_slices, max_delay_s, clock
        self._pending: dict[int, np.ndarray] = {}
        self._first_pending_at = 0.0
        self._undo_saved = False
        self.write_count = 0
        self.voxels_written = 0
        self.slices_written: set[int] = set()

    def add(self, slice_index: int, mask: np.ndarray) -> None:
        """Queue one slice mask (engine slice pixels, rows x columns); writes when the batch is due."""
        if self._pending and not self._adjacent(slice_index):
            self.flush()
        if not self._pending:
            self._first_pending_at = self.clock()
        self._pending[int(slice_index)] = np.asarray(mask, bool)
        if len(self._pending) >= self.max_slices or self.clock() - self._first_pending_at >= self.max_delay_s:
            self.flush()

    def flush(self) -> None:
        """Write every queued slice now (one call per contiguous run)."""
        if not self._pending:
            return
        first, last = min(self._pending), max(self._pending)
        block_shape = list(self.shape_kji)
        block_shape[self.axis] = last - first + 1
        block = np.zeros(block_shape, np.uint8)
        block_along_axis = np.moveaxis(block, self.axis, 0)  # a view: writing it fills `block`
        for k, mask in self._pending.items():
            block_along_axis[k - first] = mask
        extent = geometry.slice_extent_ijk(self.axis, first, last, self.shape_kji)
        if not self._undo_saved:
            self.target.save_state_for_undo()
            self._undo_saved = True
        self.target.modify(self.segment_id, labelmap_from_array_kji(block == 0, extent, self.ijk_to_local),
                           "remove", extent)
        if block.any():
            self.target.modify(self.segment_id, labelmap_from_array_kji(block, extent, self.ijk_to_local),
                               "add", extent)
        self.write_count += 1
        self.voxels_written += block.size
        self.slices_written.update(self._pending)
        self._pending.clear()

    def _adjacent(self, slice_index: int) -> bool:
        """Whether adding the slice keeps the batch one contiguous run (so its slab holds no unrelated slices)."""
        return min(self._pending) - 1 <= slice_index <= max(self._pending) + 1
