"""Every numpy conversion between RAS, IJK and the engine's slice pixels, shared by the extension and the CLI.

Conventions (named in every signature that takes an array):
- Volume arrays are in K,J,I order, as `slicer.util.arrayFromVolume` gives them; array axis `a` is IJK index `2 - a`.
- Matrices are 4x4 numpy arrays mapping homogeneous column vectors (IJK->RAS includes any parent transform).
- The engine slices the K,J,I array with `np.take(array, k, axis)`; in that 2D slice the rows are the lower
  remaining array axis and the columns the higher one, and prompt coordinates are x = column, y = row.
- MRML and prompts are RAS; files, ITK and SimpleITK are LPS.

No vtk, MRML or torch here: the Slicer side adds node access in `MedSAM2SlicerLib.geometry`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# A view further than this from every volume axis segments slices that are not the ones the user looks at.
OBLIQUE_WARNING_DEGREES = 20.0
# A 3D box (an ROI, a RECIST lesion box) lets propagation go this far beyond its first and last slices.
DEFAULT_BOX_MARGIN_MM = 10.0

# Slice-to-RAS rotations of Slicer's standard views (columns: view x, view y, view normal).
VIEW_ORIENTATIONS = {
    "axial": np.array([[-1.0, 0, 0], [0, 1, 0], [0, 0, 1]]),
    "sagittal": np.array([[0, 0, 1.0], [-1, 0, 0], [0, 1, 0]]),
    "coronal": np.array([[-1.0, 0, 0], [0, 0, 1], [0, 1, 0]]),
}


class GeometryError(ValueError):
    """A prompt or volume geometry that cannot be mapped onto the volume's voxels."""


def ras_to_ijk(points_ras: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    """(N,3) RAS points -> (N,3) continuous IJK (voxel centres at whole numbers)."""
    pts = np.atleast_2d(np.asarray(points_ras, float))
    homogeneous = np.c_[pts, np.ones(len(pts))]
    return (np.linalg.solve(ijk_to_ras, homogeneous.T).T)[:, :3]


def ijk_to_ras(points_ijk: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    """(N,3) IJK points -> (N,3) RAS points."""
    pts = np.atleast_2d(np.asarray(points_ijk, float))
    return (ijk_to_ras @ np.c_[pts, np.ones(len(pts))].T).T[:, :3]


@dataclasses.dataclass(frozen=True)
class AxisChoice:
    """The K,J,I array axis to propagate along, and how far the view normal is from it."""

    axis: int
    angle_degrees: float
    warning: str | None


def choose_propagation_axis(ijk_to_ras: np.ndarray, slice_to_ras: np.ndarray) -> AxisChoice:
    """The K,J,I array axis closest to the normal of the view the prompt was placed in.

    Works for oblique and flipped volumes (the sign of an axis does not matter); warns when the view is more than
    OBLIQUE_WARNING_DEGREES from every volume axis, because the engine then segments volume slices, not the view.
    """
    normal = np.asarray(slice_to_ras, float)[:3, 2]
    normal = normal / np.linalg.norm(normal)
    angles = []
    for axis in range(3):
        direction = ijk_to_ras[:3, 2 - axis]
        cosine = abs(float(direction @ normal)) / np.linalg.norm(direction)
        angles.append(float(np.degrees(np.arccos(min(1.0, cosine)))))
    axis = int(np.argmin(angles))
    warning = None
    if angles[axis] > OBLIQUE_WARNING_DEGREES:
        warning = (f"This view is {angles[axis]:.0f} degrees from the nearest volume axis; MedSAM2 segments the "
                   "volume's own slices, so results may not follow the view. Reformat the view to the volume "
                   "axes (slice view menu > Rotate to volume plane) for exact results.")
    return AxisChoice(axis, angles[axis], warning)


def view_slice_to_ras(view: str | np.ndarray) -> np.ndarray:
    """A 4x4 slice-to-RAS matrix from a standard view name ('axial', 'sagittal', 'coronal') or a matrix."""
    if isinstance(view, str):
        if view not in VIEW_ORIENTATIONS:
            raise GeometryError(f"Unknown view {view!r}; use one of {', '.join(VIEW_ORIENTATIONS)} or a matrix.")
        matrix = np.eye(4)
        matrix[:3, :3] = VIEW_ORIENTATIONS[view]
        return matrix
    matrix = np.asarray(view, float)
    if matrix.shape != (4, 4):
        raise GeometryError(f"A slice-to-RAS matrix is 4x4, got shape {matrix.shape}.")
    return matrix


def slice_plane_axes(axis: int) -> tuple[int, int]:
    """(row axis, column axis) of a slice taken along K,J,I array axis `axis`."""
    rows, cols = (a for a in range(3) if a != axis)
    return rows, cols


def _slice_and_xy(points_ras: np.ndarray, ijk_to_ras: np.ndarray, axis: int,
                  shape_kji: tuple[int, int, int]) -> tuple[int, np.ndarray]:
    """The slice nearest to the points' mean depth (points on a slightly oblique view share a slice) and the
    points' unclipped (x, y) in its pixels."""
    kji = ras_to_ijk(points_ras, ijk_to_ras)[:, ::-1]
    slice_index = int(np.floor(kji[:, axis].mean() + 0.5))
    if not 0 <= slice_index < shape_kji[axis]:
        raise GeometryError(f"The prompt lies outside the volume (slice {slice_index} of 0..{shape_kji[axis] - 1} "
                            "along the propagation axis).")
    rows, cols = slice_plane_axes(axis)
    return slice_index, np.c_[kji[:, cols], kji[:, rows]]


def _slice_upper(axis: int, shape_kji: tuple[int, int, int]) -> np.ndarray:
    rows, cols = slice_plane_axes(axis)
    return np.array([shape_kji[cols] - 1, shape_kji[rows] - 1], float)


def ras_to_slice_pixels(points_ras: np.ndarray, ijk_to_ras: np.ndarray, axis: int,
                        shape_kji: tuple[int, int, int]) -> tuple[int, np.ndarray]:
    """RAS points placed on one view -> (slice index along K,J,I axis `axis`, (N,2) slice pixels as x, y).

    A voxel covers its index +-0.5, so a click on the outer half of an edge voxel is inside the image: it is moved
    onto that voxel's centre. A point further out is refused.
    """
    slice_index, xy = _slice_and_xy(points_ras, ijk_to_ras, axis, shape_kji)
    upper = _slice_upper(axis, shape_kji)
    if ((xy < -0.5) | (xy > upper + 0.5)).any():
        raise GeometryError("A point lies outside the image on its slice; place it on the image.")
    return slice_index, np.clip(xy, 0.0, upper)


def view_rectangle_corners(corners_ras: np.ndarray, slice_to_ras: np.ndarray) -> np.ndarray:
    """Two opposite corners (RAS) of a box drawn in a view -> the box's four corners (RAS), at their mean depth.

    A box is a rectangle in the *view*. On a volume rotated within the view plane, the slice-pixel bounding
    rectangle of just two corners is another, distorted box (a 12 x 12 mm square at 25 degrees becomes 16 x 5.7);
    of all four it contains the drawn box, as SAM-2's axis-aligned boxes must. More than two corners (an ROI's 8)
    are returned as they are.
    """
    corners = np.asarray(corners_ras, float)
    if len(corners) != 2:
        return corners
    in_view = ijk_to_ras(corners, np.linalg.inv(slice_to_ras))  # (any 4x4 applied to points) RAS -> view x, y, z
    (x0, y0), (x1, y1), depth = in_view[0, :2], in_view[1, :2], in_view[:, 2].mean()
    rectangle = np.array([[x0, y0, depth], [x1, y0, depth], [x1, y1, depth], [x0, y1, depth]])
    return ijk_to_ras(rectangle, np.asarray(slice_to_ras, float))


def slice_extent_ijk(axis: int, first: int, last: int, shape_kji: tuple[int, int, int]) -> list[int]:
    """The IJK extent [i0, i1, j0, j1, k0, k1] of slices first..last along K,J,I array axis `axis`."""
    bounds_kji = [[0, n - 1] for n in shape_kji]
    bounds_kji[axis] = [first, last]
    k, j, i = bounds_kji
    return [*i, *j, *k]


# ---- files (LPS) and the command line ---------------------------------------------------------------------------
# Files, ITK and SimpleITK are LPS, Slicer and prompts files are RAS: the two differ by the sign of x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse


def lps_points_to_ras(points_lps: np.ndarray) -> np.ndarray:
    """(N,3) LPS points -> (N,3) RAS points (also RAS -> LPS: the map is its own inverse)."""
    return np.atleast_2d(np.asarray(points_lps, float)) * LPS_TO_RAS.diagonal()[:3]


def ijk_to_lps_from_image(direction, spacing, origin) -> np.ndarray:
    """A 4x4 IJK->LPS matrix from an ITK image's direction (3x3, row-major or flat 9), spacing (I,J,K) and origin."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(direction, float).reshape(3, 3) * np.asarray(spacing, float)
    matrix[:3, 3] = np.asarray(origin, float)
    return matrix


def ijk_to_ras_from_image(direction, spacing, origin) -> np.ndarray:
    """A 4x4 IJK->RAS matrix from an ITK (LPS) image's direction, spacing (I,J,K) and origin."""
    return LPS_TO_RAS @ ijk_to_lps_from_image(direction, spacing, origin)


def superior_axis(ijk_to_ras: np.ndarray) -> int:
    """The K,J,I array axis closest to superior-inferior (the axis an axial view pages through)."""
    return choose_propagation_axis(ijk_to_ras, view_slice_to_ras("axial")).axis


def axis_spacing(ijk_to_ras: np.ndarray, axis: int) -> float:
    """The distance in mm between two slices along K,J,I array axis `axis`."""
    return float(np.linalg.norm(np.asarray(ijk_to_ras, float)[:3, 2 - axis]))


@dataclasses.dataclass(frozen=True)
class BoxPrompt:
    """A box on one slice, and the slices propagation may reach (a 3D box limits them; a 2D box does not)."""

    slice_index: int
    box: np.ndarray  # x0, y0, x1, y1 in slice pixels
    first: int
    last: int


def box_prompt_from_corners(corners_ras: np.ndarray, ijk_to_ras: np.ndarray, axis: int,
                            shape_kji: tuple[int, int, int], margin_mm: float) -> BoxPrompt:
    """Box corners in RAS (two opposite ones, or all 8 of a Slicer ROI) -> a box prompt along K,J,I array axis `axis`.

    A box less than one slice deep along `axis` is a 2D box: propagation is unlimited. A deeper one is a 3D box (a
    RECIST lesion box, an ROI): the key slice is its centre, the 2D box its outline there, and propagation stops
    `margin_mm` beyond the box's first and last slices.
    """
    kji = ras_to_ijk(corners_ras, ijk_to_ras)[:, ::-1]
    depth = np.floor(kji[:, axis] + 0.5).astype(int)
    n = shape_kji[axis]
    if depth.max() < 0 or depth.min() > n - 1:
        raise GeometryError(f"The box lies outside the image (slices {depth.min()}..{depth.max()} of 0..{n - 1} "
                            "along the propagation axis).")
    centre = np.clip(kji[:, axis].mean(), 0, n - 1)
    key = int(np.floor(centre + 0.5))
    rows, cols = slice_plane_axes(axis)
    xy = np.c_[kji[:, cols], kji[:, rows]]
    upper = _slice_upper(axis, shape_kji)
    low, high = xy.min(axis=0), xy.max(axis=0)
    if (high < -0.5).any() or (low > upper + 0.5).any():
        raise GeometryError("The box lies outside the image on its slice; draw it on the image.")
    low, high = np.clip(low, 0.0, upper), np.clip(high, 0.0, upper)
    if np.ptp(kji[:, axis]) < 1.0:  # e.g. a 1 mm thick ROI on 10 mm slices that happens to straddle two
        first, last = 0, n - 1
    else:
        extra = int(np.ceil(max(0.0, margin_mm) / axis_spacing(ijk_to_ras, axis) - 1e-9))
        first, last = max(0, int(depth.min()) - extra), min(n - 1, int(depth.max()) + extra)
    return BoxPrompt(key, np.array([low[0], low[1], high[0], high[1]]), first, last)
