"""One case end to end: check every input on the image's grid (before any model loads), segment, write, measure.

`plan_case` reads the image, the prompts or the label map and turns them into engine prompts, raising
`CaseInputError` for anything wrong; `run_case` needs an engine and writes the outputs and `report.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time

import numpy as np

from ..engine import DiskEngine, EngineInputError, Preprocessing
from . import images, labels, outputs, prompts
from .errors import CaseInputError
from .metrics import DEFAULT_NSD_TOLERANCE_MM, segmentation_metrics

LEAST_CERTAIN_SLICES = 5


@dataclasses.dataclass
class CaseOptions:
    """Everything besides the inputs that changes a case's result (part of its resume key)."""

    axis: str | None = None  # i/j/k, 0/1/2 (I,J,K) or a view name; None: the axis closest to S-I
    box_margin_mm: float = prompts.DEFAULT_BOX_MARGIN_MM
    label_values: list[int] | None = None
    per_component: bool = False
    box_jitter_px: float = 0.0
    seed: int = 0
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM
    series_uid: str | None = None
    preset: str | None = None
    postprocess: tuple[str, ...] = ()

    def __post_init__(self):
        """Values no case can use are refused here, before any file is read or a model loads."""
        for option, value in (("--box-margin-mm", self.box_margin_mm), ("--box-jitter", self.box_jitter_px),
                              ("--nsd-tolerance-mm", self.nsd_tolerance_mm)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise CaseInputError(f"{option} must be a number of 0 or more, not {value}.")
        if self.seed < 0:
            raise CaseInputError(f"--seed must be 0 or more, not {self.seed}.")

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class CasePlan:
    image: images.Image
    objects: list[prompts.ObjectPrompt]
    inputs: dict  # what the case was made from, as given
    notes: list[str]
    read_s: float = 0.0  # reading and checking the inputs


def plan_case(image_path, *, prompts_path=None, labels_path=None, slice_index: int | None = None,
              box: list[float] | None = None, options: CaseOptions | None = None) -> CasePlan:
    """Read and check one case. Exactly one of prompts_path, labels_path or (slice_index and/or box) is used;
    with none of them, a box over the middle 40 % of the middle slice is tried (a pipeline check, as `demo` does)."""
    options = options or CaseOptions()
    t0 = time.perf_counter()
    if sum(x is not None for x in (prompts_path, labels_path)) + (slice_index is not None or box is not None) > 1:
        raise CaseInputError("Give one kind of prompt: a prompts file, a label map, or --slice/--box.")
    image = images.read_image(image_path, options.series_uid)
    ijk_to_ras, shape = image.ijk_to_ras, image.shape_kji
    axis = prompts.parse_axis(options.axis, ijk_to_ras)
    inputs = {"image": str(image_path)}
    notes = list(image.notes)
    if prompts_path is not None:
        inputs["prompts"] = str(prompts_path)
        objects = prompts.load_prompts(prompts_path, ijk_to_ras, shape, axis=options.axis,
                                       margin_mm=options.box_margin_mm)
    elif labels_path is not None:
        inputs["labels"] = str(labels_path)
        objects = _objects_from_label_file(labels_path, image, axis, options, notes)
    else:
        h, w = (n for a, n in enumerate(shape) if a != axis)
        k = shape[axis] // 2 if slice_index is None else slice_index
        if not 0 <= k < shape[axis]:
            raise CaseInputError(f"--slice {k} is outside the image (0..{shape[axis] - 1} along axis "
                                 f"{prompts.axis_name(axis)}).")
        b = [w * 0.3, h * 0.3, w * 0.7, h * 0.7] if box is None else [float(v) for v in box]
        objects = [prompts.ObjectPrompt(1, "MedSAM2", axis, [prompts.SliceStep(k, box=b)], 0, shape[axis] - 1)]
    _dry_run(image, objects)
    return CasePlan(image, objects, inputs, notes, time.perf_counter() - t0)


def _objects_from_label_file(path, image: images.Image, axis: int, options: CaseOptions, notes: list[str]):
    truths = labels.read_label_truths(path, image)
    empty = [f"{t.value} ({t.name})" for t in truths if not t.mask.any()]
    if empty and options.label_values is None:
        notes.append(f"{path}: segment(s) {', '.join(empty)} have no voxel on the image's grid and are left out.")
    return prompts.prompts_from_labels(truths, axis, values=options.label_values, per_component=options.per_component,
                                       jitter_px=options.box_jitter_px, seed=options.seed, source=str(path))


def _dry_run(image: images.Image, objects: list[prompts.ObjectPrompt]) -> None:
    """The engine's own prompt checks on the model-free test engine, so a bad box costs no model load."""
    sessions = {}
    try:
        for obj in objects:
            if obj.axis not in sessions:
                sessions[obj.axis] = DiskEngine().open_session(image.array, image.spacing_kji, obj.axis)
            for step in obj.steps:
                sessions[obj.axis].add_prompt(obj.label, step.slice_index, box=step.box, points=step.points,
                                              labels=step.labels)
    except EngineInputError as e:
        raise CaseInputError(f"{obj.name}: {e}") from None


def run_case(engine, plan: CasePlan, out_dir: pathlib.Path, options: CaseOptions, *, on_slice=None,
             extra: dict | None = None) -> dict:
    """Segment every object of a checked case, write the outputs into `out_dir`, return the report.

    `on_slice(done, planned)` is called after each propagated slice (a progress bar); `extra` joins the report,
    which is written once, last (a cohort's resume key must never be missing from a written report)."""
    t_start = time.perf_counter()
    image = plan.image
    out_dir.mkdir(parents=True, exist_ok=True)
    preprocessing = Preprocessing(preset=options.preset)
    masks, per_object, sessions = [], [], {}
    for obj in plan.objects:
        t0 = time.perf_counter()
        session = sessions.get(obj.axis)
        if session is None:
            session = sessions[obj.axis] = engine.open_session(image.array, spacing=image.spacing_kji,
                                                               axis=obj.axis, preprocessing=preprocessing)
        ious = {}  # slice -> the model's predicted IoU of the mask it kept there
        for step in obj.steps:
            result = session.add_prompt(obj.label, step.slice_index, box=step.box, points=step.points,
                                        labels=step.labels)
            ious[result.slice_index] = result.iou
        run = session.propagate([obj.label], start=obj.first, stop=obj.last, postprocess=options.postprocess)
        for result in run:
            if result.stage == "propagate":
                ious[result.slice_index] = result.iou
            if on_slice:
                on_slice(run.done, run.planned)
        mask = session.object_mask(obj.label)
        masks.append(mask)
        entry = {**obj.describe(), "voxels": int(mask.sum()), "seconds": time.perf_counter() - t0,
                 "predicted_iou": {str(k): round(float(v), 4) for k, v in sorted(ious.items())},
                 "least_certain": [{"slice": k, "iou": round(v, 4)} for k, v in
                                   sorted(((int(k), float(v)) for k, v in ious.items()),
                                          key=lambda kv: kv[1])[:LEAST_CERTAIN_SLICES]]}
        if obj.truth is not None:
            entry["metrics"] = segmentation_metrics(mask, obj.truth, image.spacing_kji, options.nsd_tolerance_mm)
        per_object.append(entry)
        session.reset_object(obj.label)
    for session in sessions.values():
        session.close()
    t0 = time.perf_counter()
    files = _write_outputs(plan, out_dir, masks, engine)
    notes, overlap = list(plan.notes), outputs.overlap_voxels(masks)
    if overlap:
        notes.append(f"{overlap} voxels belong to several objects: the .seg.nrrd keeps every object whole (in "
                     "layers, as Slicer stores overlapping segments); the label map gives each such voxel to the "
                     "object listed later.")
    report = {"status": "ok", "inputs": plan.inputs, "notes": notes, "overlap_voxels": overlap,
              "options": options.as_dict(),
              "image": {"size_ijk": list(image.itk.GetSize()), "spacing_ijk": list(image.itk.GetSpacing()),
                        "origin_lps": list(image.itk.GetOrigin()), "direction": list(image.itk.GetDirection())},
              "index_order": "voxel indices I,J,K; axis i/j/k; slice pixels x = lower, y = higher remaining index",
              "model": engine.describe(), "objects": per_object, "outputs": files,
              "timings": {"read_s": plan.read_s, "segment_s": t0 - t_start, "write_s": time.perf_counter() - t0,
                          "case_s": plan.read_s + time.perf_counter() - t_start}, **(extra or {})}
    write_json_atomically(out_dir / "report.json", report)
    return report


def _write_outputs(plan: CasePlan, out_dir: pathlib.Path, masks, engine) -> dict:
    stem = case_stem(plan.image.source)
    objects = plan.objects
    if engine.describe().get("random_weights"):  # nobody opens these in Slicer and takes them for MedSAM2's
        objects = [dataclasses.replace(o, name=f"{o.name} (random weights)") for o in objects]
    files = {"seg_nrrd": out_dir / f"{stem}.seg.nrrd", "label_map": out_dir / f"{stem}_labels.nii.gz"}
    outputs.write_seg_nrrd(files["seg_nrrd"], plan.image, objects, masks)
    outputs.write_label_image(files["label_map"], plan.image, outputs.label_map(objects, masks))
    if plan.image.dicom_files:
        files["dicom_seg"] = out_dir / f"{stem}_seg.dcm"
        outputs.write_dicom_seg(files["dicom_seg"], plan.image, objects, masks,
                                str(engine.describe().get("checkpoint")))
    return {k: str(v) for k, v in files.items()}


def case_stem(source: str) -> str:
    name = pathlib.Path(source.rstrip("/\\")).name
    for suffix in (".seg.nrrd", ".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def write_json_atomically(path: pathlib.Path, data: dict) -> None:
    """A report is written last and whole (temp file + rename): a killed case leaves none, so it is redone."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
