"""`make demo`: the Slicer-side path end to end, headless (slicer-core), on slicerio's CTChest4 CT.

    python -m MedSAM2SlicerLib.demo [--checkpoint PATH_OR_NAME | --random-weights] [--out out/demo]

Loads the CT into a scalar volume node with its file geometry, starts a local `medsam2-server` (with MedSAM2_latest,
downloaded once, unless a checkpoint is given; loudly with random weights when the Hub cannot be reached), draws a
box in RAS on the middle axial slice, propagates both ways into a new segment, and writes `<name>.seg.nrrd` plus a
PNG montage of 12 labelled slices, the mask outlined and the box drawn.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
import slicer

from . import geometry, mrml_io
from .controller import MedSAM2ActionError
from .logic import MedSAM2SlicerLogic, describe_checkpoint

MONTAGE_COLUMNS, MONTAGE_ROWS, MONTAGE_SCALE = 4, 3, 2
DISPLAY_WINDOW = (40.0, 400.0)  # level, width (soft tissue) for the montage only; the voxels are never changed


def load_volume(scene, path: str):
    """A scalar volume node read by its storage node, so it has the file's origin, spacing and directions."""
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", pathlib.Path(path).name.split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    volume.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(volume):
        raise MedSAM2ActionError(f"Could not read the volume {path}.")
    return volume


def middle_slice_box_ras(volume) -> tuple[int, np.ndarray]:
    """The middle axial slice and two RAS corners of a box over its central 40 % (I and J from 30 % to 70 %)."""
    dims = volume.GetImageData().GetDimensions()  # I, J, K
    k = dims[2] // 2
    corners_ijk = np.array([[round(dims[0] * 0.3), round(dims[1] * 0.3), k],
                            [round(dims[0] * 0.7), round(dims[1] * 0.7), k]], float)
    return k, geometry.ijk_to_ras(corners_ijk, geometry.ijk_to_world_ras(volume))


def save_segmentation(scene, segmentation, path: pathlib.Path) -> None:
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    segmentation.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.WriteData(segmentation):
        raise MedSAM2ActionError(f"Could not write {path}.")


MASK_OUTLINE_RGB = (255, 40, 40)
PROMPT_RGB = (40, 255, 40)
LABEL_RGB = (255, 230, 0)
RANDOM_WEIGHTS_NOTE = "RANDOM WEIGHTS: the pipeline is real, these masks are meaningless"


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels (4-connected): the mask minus its erosion, so the anatomy under it stays visible."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def grey_rgb(voxels: np.ndarray, window=DISPLAY_WINDOW) -> np.ndarray:
    """A slice in the display window as float RGB 0-255 (the voxels themselves are never changed)."""
    level, width = window
    grey = np.clip((np.asarray(voxels, float) - (level - width / 2)) / width, 0, 1) * 255
    return np.repeat(grey[..., None], 3, axis=2)


def label_tile(image, text: str, xy=(3, 2)) -> None:
    """Write `text` on a PIL image, on a black strip so it reads over any anatomy."""
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=(0, 0, 0))
    draw.text(xy, text, fill=LABEL_RGB, font=font)


def save_montage(voxels_kji: np.ndarray, mask_kji: np.ndarray, path: pathlib.Path, prompt_slice: int | None = None,
                 box_ij=None, note: str | None = None) -> list[int]:
    """12 evenly spaced axial slices (the prompted one among them), greyscale in the display window, each labelled
    with its slice index, the mask outlined in red (not tinted) and the box prompt drawn in green on its slice.

    `box_ij` is two opposite corners as (I, J) voxel indices; `note` is written across the bottom of the sheet
    (the demo says there when the masks come from random weights). Returns the slices shown, in tile order."""
    from PIL import Image, ImageDraw

    count = MONTAGE_COLUMNS * MONTAGE_ROWS
    slices = sorted({int(round(k)) for k in np.linspace(0, voxels_kji.shape[0] - 1, count)})
    if prompt_slice is not None and prompt_slice not in slices:  # swap it in for the nearest evenly spaced one
        slices[int(np.argmin([abs(k - prompt_slice) for k in slices]))] = prompt_slice
        slices.sort()
    rows, cols = voxels_kji.shape[1:]
    scale = MONTAGE_SCALE
    sheet = Image.new("RGB", (MONTAGE_COLUMNS * cols * scale, MONTAGE_ROWS * rows * scale))
    for n, k in enumerate(slices):
        # Upscale first, then outline, so the outline is one screen pixel wide and the inside shows the anatomy.
        rgb = np.kron(grey_rgb(voxels_kji[k]), np.ones((scale, scale, 1)))
        rgb[outline(np.kron(mask_kji[k] > 0, np.ones((scale, scale), bool)))] = MASK_OUTLINE_RGB
        tile = Image.fromarray(rgb[::-1].astype(np.uint8))  # row J up, as a view shows anterior up
        text = f"slice {k}"
        if k == prompt_slice and box_ij is not None:
            (i0, j0), (i1, j1) = np.sort(np.asarray(box_ij, float), axis=0).round().astype(int)
            # One pixel outside the boxed voxels' edges (so a mask filling the box keeps its outline visible);
            # rows count from the top after the J flip.
            ImageDraw.Draw(tile).rectangle((i0 * scale - 1, (rows - 1 - j1) * scale - 1,
                                            (i1 + 1) * scale, (rows - j0) * scale), outline=PROMPT_RGB)
            text += " (box prompt)"
        label_tile(tile, text)
        sheet.paste(tile, ((n % MONTAGE_COLUMNS) * cols * scale, (n // MONTAGE_COLUMNS) * rows * scale))
    if note:
        label_tile(sheet, note, xy=(3, sheet.height - 20))
    sheet.save(path)
    return slices


def demo_checkpoint(log=print) -> str | None:
    """A first look should be a real segmentation: MedSAM2_latest's verified file (downloaded once), else None.

    None (random weights, said loudly) only when the Hub cannot be reached; a hash mismatch raises as anywhere.
    """
    from medsam2_backend.engine.checkpoints import fetch_for_demo

    verified = fetch_for_demo(lambda text: log(f"{'!' * 100}\n!!! {text}\n{'!' * 100}"))
    return None if verified is None else str(verified.path)


def run_demo(out_dir, checkpoint: str | None = None, test_engine: bool = False, device: str | None = None,
             log=print) -> dict:
    """The whole demo; returns the output paths, the prompt, the timings and whether random weights were used."""
    import slicerio

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = {}
    started = time.perf_counter()
    scene, slicer.modules = mrml_io.headless_scene()
    slicer.mrmlScene = scene
    volume = load_volume(scene, slicerio.get_testdata_file("CTChest4.nrrd"))
    timings["load volume"] = time.perf_counter() - started

    logic = MedSAM2SlicerLogic()
    started = time.perf_counter()
    logic.start_local_server(checkpoint, random_weights=checkpoint is None and not test_engine,
                             test_engine=test_engine, device=device)
    try:
        capabilities = logic.capabilities()
        timings["start backend"] = time.perf_counter() - started
        random_weights = bool(capabilities["engine"].get("random_weights"))
        if random_weights:
            banner = "!" * 100
            log(f"{banner}\n!!! {capabilities.get('warning', 'RANDOM WEIGHTS')}\n{banner}")
        logic.set_preprocessing({"preset": "soft_tissue"})  # CT: MedSAM2's soft-tissue window

        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.GetName()} MedSAM2")
        slice_index, box_ras = middle_slice_box_ras(volume)
        started = time.perf_counter()
        segment_id = logic.segment(volume, segmentation, box_ras=box_ras, view="axial", propagate=False)
        timings["prompt (one slice)"] = time.perf_counter() - started
        started = time.perf_counter()
        outcome = logic.propagate(volume, segmentation, segment_id, direction="both")
        timings["propagate both ways"] = time.perf_counter() - started
    finally:
        logic.close()

    started = time.perf_counter()
    seg_path = out_dir / f"{volume.GetName()}.seg.nrrd"
    save_segmentation(scene, segmentation, seg_path)
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
    png_path = out_dir / f"{volume.GetName()}_montage.png"
    box_ijk = geometry.ras_to_ijk(box_ras, geometry.ijk_to_world_ras(volume))
    shown = save_montage(slicer.util.arrayFromVolume(volume), mask, png_path, prompt_slice=slice_index,
                         box_ij=box_ijk[:, :2], note=RANDOM_WEIGHTS_NOTE if random_weights else None)
    timings["save"] = time.perf_counter() - started
    return {"segmentation": seg_path, "montage": png_path, "montage_slices": shown, "prompt_slice": slice_index,
            "box_ras": box_ras, "segment_id": segment_id, "voxels": int(mask.sum()),
            "slices_written": outcome.slices_written, "least_certain": outcome.least_certain[:5],
            "timings": timings, "random_weights": random_weights, "model": capabilities["engine"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedSAM2SlicerLib.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="MedSAM2 checkpoint path or known name (default: MedSAM2_latest, "
                        "downloaded once; random weights when the Hub cannot be reached)")
    parser.add_argument("--random-weights", action="store_true", help="test the pipeline without a checkpoint")
    parser.add_argument("--device", help="cpu, cuda or mps (default: the best available)")
    parser.add_argument("--out", default="out/demo")
    args = parser.parse_args(argv)
    from medsam2_backend.engine import EngineInputError

    try:
        checkpoint = args.checkpoint or (None if args.random_weights else demo_checkpoint())
        result = run_demo(args.out, checkpoint, device=args.device)
    except (MedSAM2ActionError, EngineInputError) as error:
        print(f"demo: {error}", file=sys.stderr)
        return 2
    model = result["model"]
    print(f"model: {model.get('model')} on {model.get('device')}; {describe_checkpoint(model)}")
    print(f"box on axial slice {result['prompt_slice']}; {result['slices_written']} slices propagated, "
          f"{result['voxels']} voxels in the segment")
    print("least certain slices: " + ", ".join(f"{u.slice_index} (IoU {u.iou:.2f})" for u in result["least_certain"]))
    for step, seconds in result["timings"].items():
        print(f"  {step:<22} {seconds:7.2f} s")
    print(f"segmentation: {result['segmentation']}  (open it in Slicer over CTChest4.nrrd)")
    print(f"montage:      {result['montage']}  (axial slices {result['montage_slices']})")
    if result["random_weights"]:
        print("!!! RANDOM WEIGHTS WERE USED: the pipeline is real, the masks are meaningless. "
              "Run it again with internet access (or CHECKPOINT=/path/to/MedSAM2_latest.pt) for real masks. !!!")
    return 0


if __name__ == "__main__":
    sys.exit(main())
