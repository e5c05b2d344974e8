"""The Slicer side of the geometry: node matrices (with parent transforms), voxels and ROI corners.

The numpy conversions (RAS <-> IJK <-> slice pixels, the propagation axis) live in `medsam2_client.geometry`,
shared with the backend's CLI; they are re-exported here so the extension has one `geometry` to import.
"""

from __future__ import annotations

import numpy as np
import vtk
from medsam2_client.geometry import (DEFAULT_BOX_MARGIN_MM, OBLIQUE_WARNING_DEGREES,  # noqa: F401
                                     VIEW_ORIENTATIONS, AxisChoice, GeometryError, box_prompt_from_corners,
                                     choose_propagation_axis, ijk_to_ras, ras_to_ijk, ras_to_slice_pixels,
                                     slice_extent_ijk, slice_plane_axes, view_rectangle_corners, view_slice_to_ras)


def _array_from_vtk_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def node_to_world(node) -> np.ndarray:
    """The node's local->world RAS matrix; refuses non-linear transforms (they cannot be applied per voxel grid)."""
    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise GeometryError(f"'{node.GetName()}' is under a non-linear transform; harden it first "
                            "(Data module: right-click the transform > Harden transform).")
    matrix = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(matrix)
    return _array_from_vtk_matrix(matrix)


def ijk_to_world_ras(volume_node) -> np.ndarray:
    """Volume IJK -> world RAS, including every (linear) parent transform."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return node_to_world(volume_node) @ _array_from_vtk_matrix(matrix)


def ijk_to_node_local(volume_node, target_node) -> np.ndarray:
    """Volume IJK -> the target node's local RAS (e.g. a segmentation under its own transform)."""
    return np.linalg.inv(node_to_world(target_node)) @ ijk_to_world_ras(volume_node)


def volume_array_kji(volume_node) -> np.ndarray:
    """A copy of the voxels in K,J,I order: the backend keeps it, so it must not alias VTK-owned memory."""
    import slicer.util

    image = volume_node.GetImageData()
    if image is None or image.GetNumberOfScalarComponents() != 1:
        raise GeometryError(f"'{volume_node.GetName()}' is not a single-component scalar volume.")
    return np.array(slicer.util.arrayFromVolume(volume_node), copy=True)


def spacing_kji(volume_node) -> tuple[float, float, float]:
    """Voxel spacing in array (K,J,I) order."""
    return tuple(float(s) for s in reversed(volume_node.GetSpacing()))


def roi_corners_ras(roi_node) -> np.ndarray:
    """The 8 world-RAS corners of a markups ROI node (which may be rotated or under a transform)."""
    radius = [0.0, 0.0, 0.0]
    roi_node.GetRadiusXYZ(radius)
    object_to_world = _array_from_vtk_matrix(roi_node.GetObjectToWorldMatrix())
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
    return ijk_to_ras(signs * np.asarray(radius), object_to_world)


def view_slice_index(slice_to_ras: np.ndarray, ijk_to_ras: np.ndarray, axis: int, shape_kji) -> int:
    """The volume slice (along K,J,I axis `axis`) that a view shows: where the view plane meets the line through
    the volume's centre along that axis (so a panned view still names its slice). Refuses a plane off the volume."""
    slice_to_ras = np.asarray(slice_to_ras, float)
    origin, normal = slice_to_ras[:3, 3], slice_to_ras[:3, 2] / np.linalg.norm(slice_to_ras[:3, 2])
    center_kji = (np.asarray(shape_kji, float) - 1) / 2
    center = (ijk_to_ras @ np.r_[center_kji[::-1], 1.0])[:3]
    step_kji = np.zeros(3)
    step_kji[axis] = 1.0
    step = ijk_to_ras[:3, :3] @ step_kji[::-1]  # RAS per slice along the axis
    along = float(normal @ step)
    if abs(along) < 1e-9:
        raise GeometryError("The view is parallel to the propagation axis; use a view across the slices.")
    k = center_kji[axis] + float(normal @ (origin - center)) / along
    index = int(np.floor(k + 0.5))
    if not 0 <= index < shape_kji[axis]:
        raise GeometryError(f"The view shows no slice of the volume (slice {index} of 0..{shape_kji[axis] - 1}).")
    return index
