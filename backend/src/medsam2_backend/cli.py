"""`medsam2-segment`: MedSAM2 without Slicer, for one image or a cohort.

  segment  one image (NIfTI, NRRD, MHA/MHD or a DICOM series folder) from a prompts file, from ground-truth labels
           (with metrics), or from --slice/--box; writes a .seg.nrrd, a NIfTI label map and report.json.
  batch    a manifest of cases, on Ray (local workers or a cluster), resumable, with summary tables.
  demo     the CT sample that ships with slicerio, with MedSAM2_latest (downloaded once) unless a checkpoint is
           given; loudly with random weights when the Hugging Face Hub cannot be reached.

Index order (voxel indices, --axis, --slice, --box, report): see `medsam2_backend.batch.prompts`; in short I,J,K
voxel indices, axis i/j/k, slice pixels x = lower and y = higher remaining index. Every bad input is one sentence
and exit code 2, found before the model loads.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.setdefault("TQDM_DISABLE", "1")

from .engine import CT_PRESETS, EngineInputError  # noqa: E402
from .engine.model import shout  # noqa: E402

EXIT_BAD_INPUT = 2
INDEX_ORDER = ("Index order: voxel indices are I,J,K (ITK/Slicer order); --axis is i, j or k (0, 1, 2 also mean "
               "I, J, K); --slice is the index along it; --box x0 y0 x1 y1 is in that slice's pixels, x the lower "
               "and y the higher remaining index (axis k: x=i, y=j). Default axis: the one closest to "
               "superior-inferior.")
SEGMENT_EXAMPLE = """examples:
  medsam2-segment segment ct.nii.gz --prompts prompts.json -o out --checkpoint MedSAM2_latest.pt
  medsam2-segment segment ct.nrrd --from-labels truth.seg.nrrd -o out --checkpoint MedSAM2_latest.pt
  medsam2-segment segment dicom_folder/ --slice 40 --box 100 120 180 200 -o out --checkpoint MedSAM2_latest.pt
"""
BATCH_EXAMPLE = """manifest (CSV, paths relative to its folder):
  id,image,labels
  case1,images/case1.nii.gz,labels/case1.nii.gz
example:
  medsam2-segment batch cohort.csv -o results --checkpoint MedSAM2_latest.pt --workers 2 --threads 1
"""
TOP_EXAMPLE = """examples (medsam2-segment COMMAND --help for each command's options and defaults):
  medsam2-segment segment ct.nii.gz --from-labels truth.nii.gz -o out --checkpoint MedSAM2_latest
  medsam2-segment batch cohort.csv -o results --checkpoint MedSAM2_latest --workers 2
  medsam2-segment demo -o out/demo
"""
DEMO_EXAMPLE = """example:
  medsam2-segment demo -o out/demo
"""


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", help="MedSAM2 checkpoint: a file or a known name such as MedSAM2_latest")
    g.add_argument("--random-weights", action="store_true",
                   help="a randomly initialised model: tests the pipeline only, masks are meaningless")
    g.add_argument("--test-engine", action="store_true", help=argparse.SUPPRESS)  # deterministic disks, no model
    g.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    g.add_argument("--precision", choices=["fp32", "bf16"], help="default: the device's fastest exact choice")


def _case_options(p: argparse.ArgumentParser) -> None:
    from .batch.metrics import DEFAULT_NSD_TOLERANCE_MM
    from .batch.prompts import DEFAULT_BOX_MARGIN_MM

    p.add_argument("-o", "--out", default="out", help="output folder (default: %(default)s)")
    p.add_argument("--axis", help="axis to propagate along: i, j, k (or 0, 1, 2), axial, sagittal, coronal "
                                  "(default: the image axis closest to superior-inferior)")
    p.add_argument("--box-margin-mm", type=float, default=DEFAULT_BOX_MARGIN_MM,
                   help="a 3D box limits propagation to its slices plus this margin (default: %(default)s mm)")
    p.add_argument("--label-values", type=int, nargs="+", metavar="V",
                   help="with labels: segment only these values; for a .seg.nrrd, segment numbers in file order, "
                        "1 for the first (default: every non-zero value or segment)")
    p.add_argument("--per-component", action="store_true",
                   help="with labels: one object per connected component of each value")
    p.add_argument("--box-jitter", type=float, default=0.0, metavar="PX",
                   help="with labels: move each box side by a random whole number of pixels in [-PX, PX] "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the box jitter (default: %(default)s)")
    p.add_argument("--nsd-tolerance-mm", type=float, default=DEFAULT_NSD_TOLERANCE_MM,
                   help="tolerance of the normalised surface Dice (default: %(default)s mm)")
    p.add_argument("--series", help="DICOM folder with several series: the SeriesInstanceUID to use "
                                    "(default: the series with the most files)")
    p.add_argument("--preset", choices=sorted(CT_PRESETS), help="CT window (default: MR-style percentiles)")
    p.add_argument("--largest-component", action="store_true", help="keep each object's largest 3D component")
    _model_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsam2-segment", description=__doc__, epilog=TOP_EXAMPLE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    seg = sub.add_parser("segment", help="segment one image", formatter_class=fmt,
                         description="Segment one image and write a .seg.nrrd, a NIfTI label map and report.json "
                                     "on its exact grid (and a DICOM SEG for a DICOM series). " + INDEX_ORDER,
                         epilog=SEGMENT_EXAMPLE)
    seg.add_argument("volume", help="image file (.nii/.nii.gz, .nrrd, .mha/.mhd) or a DICOM series folder")
    what = seg.add_mutually_exclusive_group()
    what.add_argument("--prompts", help="prompts file (JSON; schema in the README and `batch.prompts`)")
    what.add_argument("--from-labels", metavar="LABELS",
                      help="ground truth, a label map or a Slicer .seg.nrrd (overlapping segments too): a box per "
                           "label or segment on its largest slice, then metrics")
    seg.add_argument("--slice", type=int, help="with --box: the prompted slice (default: the middle one)")
    seg.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                     help="box in slice pixels (default: the middle 40%% of the slice, a pipeline check)")
    _case_options(seg)
    batch = sub.add_parser("batch", help="segment a cohort from a manifest, on Ray", formatter_class=fmt,
                           description="Segment every case of a manifest CSV (columns image, prompts or labels, "
                                       "optional id). Resumable: finished cases with the same inputs and model "
                                       "are skipped; failed cases are recorded and the run goes on. Writes "
                                       "OUT/<id>/..., OUT/summary.csv and OUT/cohort_summary.json.",
                           epilog=BATCH_EXAMPLE)
    batch.add_argument("manifest", help="CSV with columns image, prompts or labels, optional id")
    batch.add_argument("--workers", type=int, default=1, help="Ray workers, one model each (default: %(default)s)")
    batch.add_argument("--threads", type=int, default=1, help="CPU threads per worker (default: %(default)s)")
    batch.add_argument("--ray-address", help="an existing Ray cluster (e.g. 10.0.0.5:6379; default: local)")
    batch.add_argument("--no-ray", action="store_true", help="run the cases one after another in this process")
    _case_options(batch)
    demo = sub.add_parser("demo", help="the slicerio CT sample, with MedSAM2_latest unless --checkpoint (random weights when offline)",
                          formatter_class=fmt, epilog=DEMO_EXAMPLE,
                          description="Segment slicerio's CTChest4 sample from a box on its middle slice.")
    demo.add_argument("-o", "--out", default="out", help="output folder (default: %(default)s)")
    demo.add_argument("--slice", type=int, help="prompted slice (default: the middle one)")
    demo.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                      help="box in slice pixels (default: the middle 40%% of the slice)")
    demo.add_argument("--axis", help="i, j or k (default: the axis closest to superior-inferior)")
    demo.add_argument("--preset", choices=sorted(CT_PRESETS), help="CT window (default: soft_tissue)")
    demo.add_argument("--largest-component", action="store_true", help="keep the largest 3D component")
    _model_options(demo)
    return parser


def _fail(message: str) -> int:
    print(f"medsam2-segment: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _options(args):
    """Case options from the arguments; `demo` has fewer of them and takes the defaults for the rest."""
    from .batch.case import CaseOptions

    given = {"axis": "axis", "box_margin_mm": "box_margin_mm", "label_values": "label_values",
             "per_component": "per_component", "box_jitter_px": "box_jitter", "seed": "seed",
             "nsd_tolerance_mm": "nsd_tolerance_mm", "series_uid": "series", "preset": "preset"}
    return CaseOptions(**{field: getattr(args, name) for field, name in given.items() if hasattr(args, name)},
                       postprocess=("largest_component",) if args.largest_component else ())


def _model_spec(args):
    from .batch.cohort import ModelSpec

    chosen = sum(bool(x) for x in (args.checkpoint, args.random_weights, args.test_engine))
    if chosen != 1:
        raise EngineInputError("Give a model: --checkpoint PATH_OR_NAME (a MedSAM2 checkpoint), or "
                               "--random-weights to test the pipeline without one - exactly one of them.")
    if args.checkpoint:
        from .engine.checkpoints import KNOWN_CHECKPOINTS

        if not pathlib.Path(args.checkpoint).is_file() and args.checkpoint not in KNOWN_CHECKPOINTS:
            raise EngineInputError(f"The checkpoint {args.checkpoint} is neither a file nor a known name "
                                   f"({', '.join(KNOWN_CHECKPOINTS)}).")
    return ModelSpec(checkpoint=args.checkpoint, random_weights=args.random_weights, test_engine=args.test_engine,
                     device=args.device, precision=args.precision)


def _output_folder(out) -> pathlib.Path:
    """The output folder, made now: one that cannot be written is found before the model loads."""
    from .batch.errors import CaseInputError

    path = pathlib.Path(out)
    if path.exists() and not path.is_dir():
        raise CaseInputError(f"The output folder {path} is a file; give a folder (-o).")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CaseInputError(f"The output folder {path} cannot be made ({e.strerror or e}).") from None
    return path


def _segment(args) -> int:
    from .batch.case import plan_case, run_case

    spec = _model_spec(args)
    options = _options(args)
    label_only = [option for option, name in (("--label-values", "label_values"), ("--per-component",
                  "per_component"), ("--box-jitter", "box_jitter"), ("--seed", "seed")) if getattr(args, name, None)]
    if label_only and not getattr(args, "from_labels", None):
        return _fail(f"{', '.join(label_only)} {'apply' if len(label_only) > 1 else 'applies'} only with "
                     "--from-labels.")
    if getattr(args, "series", None) and not pathlib.Path(args.volume).is_dir():
        return _fail(f"--series chooses a series in a DICOM folder; {args.volume} is not a folder.")
    plan = plan_case(args.volume, prompts_path=getattr(args, "prompts", None),
                     labels_path=getattr(args, "from_labels", None), slice_index=args.slice, box=args.box,
                     options=options)
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    _output_folder(args.out)
    engine = spec.build()
    planned = sum(o.last - o.first + 1 for o in plan.objects)
    done = [0]

    def on_slice(_done, _planned):
        done[0] += 1
        print(f"\rpropagating: {done[0]}/{planned} slices", end="", file=sys.stderr, flush=True)

    report = run_case(engine, plan, pathlib.Path(args.out), options, on_slice=on_slice)
    print(file=sys.stderr)
    for obj in report["objects"]:
        m = obj.get("metrics")
        scores = (f"  Dice {m['dice']:.3f}  NSD {m['nsd']:.3f}  HD95 "
                  f"{'-' if m['hd95_mm'] is None else format(m['hd95_mm'], '.1f') + ' mm'}") if m else ""
        print(f"{obj['name']}: {obj['voxels']} voxels{scores}")
    for kind, path in report["outputs"].items():
        print(f"{kind}: {path}")
    print(f"report: {pathlib.Path(args.out) / 'report.json'}")
    if report["model"].get("random_weights"):
        shout("These masks come from RANDOM WEIGHTS, not MedSAM2. Give --checkpoint for real results.")
    return 0


def _batch(args) -> int:
    from .batch.cohort import read_manifest, run_cohort

    spec = _model_spec(args)
    options = _options(args)
    if args.workers < 1 or args.threads < 1:
        return _fail("--workers and --threads must be at least 1.")
    cases = read_manifest(args.manifest)
    _output_folder(args.out)
    summary = run_cohort(cases, pathlib.Path(args.out), options, spec, workers=args.workers,
                         threads=args.threads, ray_address=args.ray_address, use_ray=not args.no_ray,
                         progress=sys.stderr.isatty())
    print(f"{summary['ok']} done, {summary['skipped']} skipped (already done), {len(summary['failed'])} failed "
          f"of {summary['cases']} cases in {summary['timings']['total_s']:.1f} s")
    for m, s in summary["metrics"].items():
        print(f"{m}: mean {s['mean']:.3f}, median {s['median']:.3f} (n={s['n']})")
    for row in summary["worst_first"][:5]:
        print(f"worst: {row['id']} / {row['object']} dice={row['dice']}")
    for f in summary["failed"]:
        print(f"failed: {f['id']}: {f['message']}", file=sys.stderr)
    print(f"summary: {summary['summary_csv']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        import slicerio

        args.volume = slicerio.get_testdata_file("CTChest4.nrrd")
        args.preset = args.preset or "soft_tissue"
        if not (args.checkpoint or args.random_weights or args.test_engine):
            from .engine.checkpoints import fetch_for_demo

            try:  # MedSAM2_latest; random weights, loudly, only when the Hub cannot be reached
                verified = fetch_for_demo(shout)
            except EngineInputError as e:  # a hash mismatch is never a fallback
                return _fail(str(e))
            args.checkpoint, args.random_weights = (str(verified.path), False) if verified else (None, True)
    try:
        from medsam2_client.geometry import GeometryError

        from .batch import case, cohort  # noqa: F401 - SimpleITK, monai and Ray come with the extra
        from .batch.errors import CaseInputError, CohortError
    except ImportError as e:
        return _fail(f"the batch tools need the [batch] extra (pip install 'medsam2-slicer-backend[batch]'): {e}.")
    try:
        return _batch(args) if args.command == "batch" else _segment(args)
    except (CaseInputError, EngineInputError, GeometryError) as e:
        return _fail(str(e))
    except CohortError as e:
        print(f"medsam2-segment: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        return _fail(f"{e.filename or ''} {e.strerror or e}".strip() + ".")


if __name__ == "__main__":
    sys.exit(main())
