"""`medsam2-segment`: segment a NRRD volume from a box on one slice, propagate both ways, save a .seg.nrrd.

`demo` does the same on the CT sample that ships with slicerio, with MedSAM2_latest (downloaded once) unless a
checkpoint is given, and loudly with random weights when the Hugging Face Hub cannot be reached.
Errors are printed as one sentence (exit code 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

from .engine import CT_PRESETS, EngineInputError, Preprocessing, load_engine  # noqa: E402
from .engine.model import shout  # noqa: E402


def segment_file(volume_path: str, out_dir: pathlib.Path, *, slice_index: int | None, box: list[float] | None,
                 axis: int, preprocessing: Preprocessing, checkpoint: str | None, random_weights: bool,
                 device: str | None, precision: str | None, postprocess: tuple[str, ...]) -> dict:
    import nrrd
    import slicerio

    timings = {}
    t0 = time.perf_counter()
    volume, header = nrrd.read(volume_path)  # array in I, J, K order
    if header.get("space") not in (None, "left-posterior-superior"):
        raise EngineInputError(f"{volume_path} is in space {header['space']!r}; only LPS NRRD files are supported.")
    timings["read_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = load_engine(checkpoint, device=device, precision=precision, random_weights=random_weights)
    timings["load_model_s"] = time.perf_counter() - t0
    session = engine.open_session(volume, spacing=np.linalg.norm(header["space directions"], axis=1), axis=axis,
                                  preprocessing=preprocessing)
    k = session.num_slices // 2 if slice_index is None else slice_index
    if box is None:
        h, w = session.slice_shape
        box = [w * 0.3, h * 0.3, w * 0.7, h * 0.7]
    t0 = time.perf_counter()
    session.add_prompt(1, k, box=box)
    timings["prompt_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = session.propagate(postprocess=postprocess)
    for i, _ in enumerate(run, 1):
        print(f"\rpropagating: {i}/{run.planned} slices", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    timings["propagate_s"] = time.perf_counter() - t0
    timings["per_slice_s"] = timings["propagate_s"] / max(1, run.summary.slices_done)

    mask = session.object_mask(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.asarray(header["space directions"]).T
    ijk_to_lps[:3, 3] = header["space origin"]
    seg = slicerio.create_segmentation(mask.shape, ijk_to_lps)
    name = "MedSAM2 (random weights)" if engine.model.random_weights else "MedSAM2"
    slicerio.add_segment(seg, mask, {"id": "Segment_1", "name": name})
    seg_path = out_dir / (pathlib.Path(volume_path).name.split(".")[0] + ".seg.nrrd")
    slicerio.write_segmentation(str(seg_path), seg)
    report = {"segmentation": str(seg_path), "prompt": {"slice": k, "axis": axis, "box": [float(x) for x in box]},
              "voxels": int(mask.sum()), "slices_with_mask": int(mask.any(axis=tuple(i for i in range(3) if i != axis)
                                                                           ).sum()),
              "least_certain": run.summary.least_certain.get(1, []), "timings": timings,
              "model": engine.describe()}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medsam2-segment", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("segment", "demo"):
        p = sub.add_parser(name)
        if name == "segment":
            p.add_argument("volume", help="a .nrrd volume (LPS)")
        p.add_argument("--out", default="out", help="output folder")
        p.add_argument("--checkpoint", help="MedSAM2 checkpoint file or known name (e.g. MedSAM2_latest)")
        p.add_argument("--random-weights", action="store_true", help="test the pipeline without a checkpoint")
        p.add_argument("--slice", type=int, help="prompted slice (default: the middle one)")
        p.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), help="box in slice pixels")
        p.add_argument("--axis", type=int, default=2, help="array axis to propagate along (NRRD order I,J,K)")
        p.add_argument("--preset", choices=sorted(CT_PRESETS), help="CT window (default: MR percentiles)")
        p.add_argument("--device")
        p.add_argument("--precision", choices=["fp32", "bf16"])
        p.add_argument("--largest-component", action="store_true", help="keep the largest 3D component")
    args = parser.parse_args(argv)
    if args.command == "demo":
        import slicerio

        args.volume = slicerio.get_testdata_file("CTChest4.nrrd")
        args.preset = args.preset or "soft_tissue"
    try:
        if args.command == "demo" and not (args.checkpoint or args.random_weights):
            from .engine.checkpoints import fetch_for_demo

            verified = fetch_for_demo(shout)  # MedSAM2_latest; random weights, loudly, when the Hub is unreachable
            args.checkpoint, args.random_weights = (str(verified.path), False) if verified else (None, True)
        report = segment_file(
            args.volume, pathlib.Path(args.out), slice_index=args.slice, box=args.box, axis=args.axis,
            preprocessing=Preprocessing(preset=args.preset), checkpoint=args.checkpoint,
            random_weights=args.random_weights, device=args.device, precision=args.precision,
            postprocess=("largest_component",) if args.largest_component else ())
    except (EngineInputError, OSError) as e:
        print(f"medsam2-segment: {e}", file=sys.stderr)
        return 2
    t = report["timings"]
    print(f"Segmentation: {report['segmentation']} ({report['voxels']} voxels on {report['slices_with_mask']} slices)")
    print(f"Report:       {pathlib.Path(report['segmentation']).parent / 'report.json'}")
    print("Timings:      " + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in t.items()))
    if report["model"]["random_weights"]:
        shout("These masks come from RANDOM WEIGHTS, not MedSAM2. Give --checkpoint for real results.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
