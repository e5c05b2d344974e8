"""What to segment in one case: prompts from a JSON file, or boxes derived from a ground-truth label map.

Index order, stated once for the whole command line (options, prompts files, report):
- Voxel indices are I,J,K (ITK's and Slicer's order: I runs fastest in the file). Arrays in memory are K,J,I.
- An axis is named "i", "j" or "k" (or 0, 1, 2 for I, J, K). The default axis is the one closest to
  superior-inferior, i.e. the slices an axial view shows.
- A slice is the index along that axis. Slice pixels are (x, y): x is the lower remaining index, y the higher one
  (axis k: x = i, y = j; axis j: x = i, y = k; axis i: x = j, y = k). A box is x0, y0, x1, y1 in those pixels.

Prompts file (JSON):
    {"coordinates": "RAS",                      # "RAS" (default), "LPS", or "voxel" (I,J,K indices)
     "objects": [
       {"name": "lesion 1",                     # required, unique
        "label": 1,                             # optional value in the label map output (default: 1, 2, ...)
        "color": [1.0, 0.5, 0.0],               # optional, 0..1
        "axis": "k",                            # optional: i, j, k or axial, sagittal, coronal
        "box": [[x, y, z], [x, y, z]],          # optional: two opposite corners (or all 8); on different
                                                #   slices = a 3D box
        "points": [[x, y, z]], "labels": [1]}   # optional: 1 positive, 0 negative; each on its nearest slice
     ]}
A 3D box (corners on different slices, e.g. a RECIST lesion box) gives the key slice (its centre), the 2D box on it,
and limits propagation to the box's slices plus a margin in mm. Two corners bound the box on the image's voxel grid
(the voxels between their indices, whichever coordinates name them); for a box aligned otherwise, e.g. with the
world's axes on an oblique image, give its eight corners: their bounding box on the voxel grid is used. A box partly
outside the image is clipped to it. Every check here runs before a model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
from scipy import ndimage

from medsam2_client import geometry

from .errors import CaseInputError

AXIS_NAMES = ("i", "j", "k")
DEFAULT_BOX_MARGIN_MM = geometry.DEFAULT_BOX_MARGIN_MM
COORDINATES = ("RAS", "LPS", "voxel")
PIXEL_DECIMALS = 6  # slice pixels as used and reported: voxel indices survive the trip through world coordinates


def parse_axis(value, ijk_to_ras: np.ndarray) -> int:
    """An axis as the user names it (i/j/k, 0/1/2 as I,J,K, a view name, or None for S-I) -> K,J,I array axis."""
    if value is None:
        return geometry.superior_axis(ijk_to_ras)
    text = str(value).strip().lower()
    if text in AXIS_NAMES:
        return 2 - AXIS_NAMES.index(text)
    if text in ("0", "1", "2"):
        return 2 - int(text)
    if text in geometry.VIEW_ORIENTATIONS:
        return geometry.choose_propagation_axis(ijk_to_ras, geometry.view_slice_to_ras(text)).axis
    raise CaseInputError(f"Unknown axis {value!r}; use i, j, k (or 0, 1, 2) or axial, sagittal, coronal.")


def axis_name(array_axis: int) -> str:
    return AXIS_NAMES[2 - array_axis]


@dataclasses.dataclass
class SliceStep:
    """One prompt on one slice, in slice pixels (x, y)."""

    slice_index: int
    box: list[float] | None = None
    points: list[list[float]] | None = None
    labels: list[int] | None = None


@dataclasses.dataclass
class ObjectPrompt:
    """One object to segment: its output label, name, axis (K,J,I array axis), prompts and propagation limits."""

    label: int
    name: str
    axis: int
    steps: list[SliceStep]
    first: int
    last: int
    color: list[float] | None = None
    truth: np.ndarray | None = dataclasses.field(default=None, repr=False)  # bool K,J,I, for --from-labels

    def describe(self) -> dict:
        """The prompt as used, for the report (axis as i/j/k, slices along it, boxes and points in slice pixels)."""
        return {"label": self.label, "name": self.name, "axis": axis_name(self.axis),
                "propagation": [self.first, self.last],
                "steps": [{k: v for k, v in dataclasses.asdict(s).items() if v is not None} for s in self.steps]}


# ---- prompts files -------------------------------------------------------------------------------------------------
def load_prompts(path: str | pathlib.Path, ijk_to_ras: np.ndarray, shape_kji: tuple[int, int, int], *,
                 axis=None, margin_mm: float = DEFAULT_BOX_MARGIN_MM) -> list[ObjectPrompt]:
    """Read and check a prompts file against the image's grid; `axis` is the default for objects without one."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CaseInputError(f"The prompts file {path} could not be read ({e.strerror}).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CaseInputError(f"The prompts file {path} is not valid JSON ({e}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("objects"), list) or not data["objects"]:
        raise CaseInputError(f"The prompts file {path} needs an \"objects\" list with at least one object.")
    objects, names, labels = [], set(), set()
    for n, obj in enumerate(data["objects"], 1):
        where = f"{path}, object {n}"
        if not isinstance(obj, dict):
            raise CaseInputError(f"{where} is not a JSON object.")
        coordinates = obj.get("coordinates", data.get("coordinates", "RAS"))
        if coordinates not in COORDINATES:
            raise CaseInputError(f"{where}: coordinates must be one of {', '.join(COORDINATES)}, not "
                                 f"{coordinates!r}.")
        name = obj.get("name")
        if not isinstance(name, str) or not name.strip() or name in names:
            raise CaseInputError(f"{where} needs a unique, non-empty \"name\".")
        label = obj.get("label", n)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 < label < 65536 or label in labels:
            raise CaseInputError(f"{where}: \"label\" must be a unique whole number from 1 to 65535.")
        names.add(name)
        labels.add(label)
        try:
            objects.append(_object_prompt(obj, coordinates, label, name, ijk_to_ras, shape_kji,
                                          parse_axis(obj.get("axis", axis), ijk_to_ras), margin_mm))
        except (geometry.GeometryError, CaseInputError) as e:
            raise CaseInputError(f"{where} ({name}): {e}") from None
    return objects


def _to_ras(values, coordinates: str, ijk_to_ras: np.ndarray, what: str) -> np.ndarray:
    try:
        pts = np.asarray(values, float)
    except (TypeError, ValueError):
        raise CaseInputError(f"the {what} must be lists of three numbers.") from None
    if pts.ndim != 2 or pts.shape[1] != 3 or not np.isfinite(pts).all():
        raise CaseInputError(f"the {what} must be lists of three finite numbers (x, y, z or i, j, k).")
    if coordinates == "voxel":
        return geometry.ijk_to_ras(pts, ijk_to_ras)
    return geometry.lps_points_to_ras(pts) if coordinates == "LPS" else pts


def _object_prompt(obj: dict, coordinates: str, label: int, name: str, ijk_to_ras, shape_kji, axis: int,
                   margin_mm: float) -> ObjectPrompt:
    if "box" not in obj and "points" not in obj:
        raise CaseInputError("it needs a \"box\", \"points\" or both.")
    steps, first, last = [], 0, shape_kji[axis] - 1
    if "box" in obj:
        corners = _to_ras(obj["box"], coordinates, ijk_to_ras, "box corners")
        if len(corners) not in (2, 8):
            raise CaseInputError("a box is two opposite corners, or all eight corners of a box.")
        plan = geometry.box_prompt_from_corners(corners, ijk_to_ras, axis, shape_kji, margin_mm)
        x0, y0, x1, y1 = (round(float(v), PIXEL_DECIMALS) for v in plan.box)
        if x1 <= x0 or y1 <= y0:
            raise CaseInputError("the box has no width or height on its key slice.")
        steps.append(SliceStep(plan.slice_index, box=[x0, y0, x1, y1]))
        first, last = plan.first, plan.last
    if "points" in obj:
        points = _to_ras(obj["points"], coordinates, ijk_to_ras, "points")
        point_labels = obj.get("labels")
        if not isinstance(point_labels, list) or len(point_labels) != len(points) or any(
                v not in (0, 1) or isinstance(v, bool) for v in point_labels):
            raise CaseInputError("give one label per point in \"labels\": 1 positive, 0 negative.")
        depth = np.floor(geometry.ras_to_ijk(points, ijk_to_ras)[:, 2 - axis] + 0.5).astype(int)
        for k in sorted(set(depth.tolist())):
            chosen = depth == k
            slice_index, xy = geometry.ras_to_slice_pixels(points[chosen], ijk_to_ras, axis, shape_kji)
            step = next((s for s in steps if s.slice_index == slice_index), None)
            if step is None:
                step = SliceStep(slice_index)
                steps.append(step)
            step.points = np.round(xy, PIXEL_DECIMALS).tolist()
            step.labels = [int(v) for v, c in zip(point_labels, chosen) if c]
        if not first <= min(s.slice_index for s in steps) <= max(s.slice_index for s in steps) <= last:
            raise CaseInputError("its points lie outside its 3D box's slices.")
    color = obj.get("color")
    if color is not None and (not isinstance(color, list) or len(color) != 3 or
                              not all(isinstance(c, (int, float)) and 0 <= c <= 1 for c in color)):
        raise CaseInputError("\"color\" is three numbers from 0 to 1.")
    return ObjectPrompt(label, name, axis, steps, first, last, color)


# ---- prompts from ground truth -------------------------------------------------------------------------------------
@dataclasses.dataclass
class LabelTruth:
    """One ground-truth structure on the image's grid: the value `--label-values` selects it by (and its label in
    the outputs), its name and colour, and its voxels (bool K,J,I). A label map has one per non-zero value; a Slicer
    segmentation one per segment, which may overlap others."""

    value: int
    name: str
    mask: np.ndarray = dataclasses.field(repr=False)
    color: list[float] | None = None


def label_truths(labels_kji: np.ndarray) -> list[LabelTruth]:
    """One truth per non-zero value of a label map (K,J,I), named "label V"."""
    return [LabelTruth(int(v), f"label {int(v)}", labels_kji == v) for v in np.unique(labels_kji) if v != 0]


def prompts_from_labels(truths: list[LabelTruth], axis: int, *, values: list[int] | None = None,
                        per_component: bool = False, jitter_px: float = 0.0, seed: int = 0,
                        source: str = "the label map") -> list[ObjectPrompt]:
    """MedSAM2's evaluation protocol: per truth (or per 26-connected component of it), its bounding box on the
    slice where its area is largest, propagated both ways over the whole volume.

    `values` selects truths by value (default: every truth with voxels on the image's grid); a value that is not
    there, or whose structure has no voxel on the image's grid, is an error.
    Jitter: each of x0, y0, x1, y1 moves by an independent uniform random integer in [-jitter_px, jitter_px]
    (numpy's default_rng(seed), drawn in object order), clipped to the slice. A box one pixel wide or high gets
    half a pixel on each side so it has an area.
    """
    by_value = {t.value: t for t in truths}
    present = [t.value for t in truths if t.mask.any()]
    listing = ", ".join(str(t.value) if t.name == f"label {t.value}" else f"{t.value} ({t.name})"
                        for t in truths if t.mask.any()) or "no labels"
    values = present if values is None else list(dict.fromkeys(values))
    missing = [v for v in values if v not in by_value]
    if missing:
        raise CaseInputError(f"Label value(s) {', '.join(map(str, missing))} are not in {source} (it has "
                             f"{listing}).")
    empty = [v for v in values if v not in present]
    if empty:
        raise CaseInputError(f"Label value(s) {', '.join(f'{v} ({by_value[v].name})' for v in empty)} of {source} "
                             "have no voxel on the image's grid.")
    if not values:
        raise CaseInputError(f"{source} has no labels (all voxels are 0) on the image's grid.")
    rng = np.random.default_rng(seed)
    objects, next_label = [], 1
    for value in values:
        truth = by_value[value]
        parts = [truth.mask]
        if per_component:
            components, count = ndimage.label(truth.mask, structure=np.ones((3, 3, 3)))
            parts = [components == c for c in range(1, count + 1)]
        for n, part in enumerate(parts, 1):
            name, label = truth.name, value
            if per_component:
                name, label = f"{name} {n}", next_label
            next_label += 1
            step = _largest_slice_box(part, axis, jitter_px, rng)
            objects.append(ObjectPrompt(label, name, axis, [step], 0, part.shape[axis] - 1, truth.color,
                                        truth=part))
    return objects


def _largest_slice_box(mask_kji: np.ndarray, axis: int, jitter_px: float, rng) -> SliceStep:
    areas = mask_kji.sum(axis=tuple(a for a in range(3) if a != axis))
    k = int(np.argmax(areas))
    rows, cols = np.nonzero(np.take(mask_kji, k, axis=axis))
    h, w = (n for a, n in enumerate(mask_kji.shape) if a != axis)
    box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], float)
    if jitter_px:
        box += rng.integers(-int(jitter_px), int(jitter_px) + 1, size=4)
        box = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1])
        box = np.r_[np.minimum(box[:2], box[2:]), np.maximum(box[:2], box[2:])]
    for lo, hi, upper in ((0, 2, w - 1), (1, 3, h - 1)):
        if box[hi] <= box[lo]:
            box[lo], box[hi] = max(0.0, box[lo] - 0.5), min(float(upper), box[hi] + 0.5)
    return SliceStep(k, box=[float(v) for v in box])
