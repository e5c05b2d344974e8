"""Cohort throughput: cases per minute on Ray with 1 and 2 workers (1 thread each) against the single-process loop
with 1 and 2 threads, on the same small cohort (CTChest4 slices, one label, random SAM-2 weights: the same work
as a checkpoint). Configurations alternate, each repeated; medians are reported, with Ray's start-up overhead
(Ray and the workers' models ready, against loading one model in the loop).

    .venv/bin/python backend/bench/bench_batch.py [--cases 4] [--slices 6] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import tempfile

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import SimpleITK as sitk  # noqa: E402
import slicerio  # noqa: E402

from medsam2_backend.batch.case import CaseOptions  # noqa: E402
from medsam2_backend.batch.cohort import Case, ModelSpec, run_cohort  # noqa: E402

CONFIGS = (("loop, 1 thread", False, 1, 1), ("loop, 2 threads", False, 1, 2),
           ("Ray, 1 worker x 1 thread", True, 1, 1), ("Ray, 2 workers x 1 thread", True, 2, 1))


def make_cohort(folder: pathlib.Path, cases: int, slices: int) -> list[Case]:
    ct = sitk.ReadImage(slicerio.get_testdata_file("CTChest4.nrrd"))
    seg = sitk.ReadImage(slicerio.get_testdata_file("Segmentation.seg.nrrd"))
    out = []
    for n in range(cases):
        first = 10 + n % 3  # slightly different volumes, same amount of work
        sitk.WriteImage(ct[:, :, first:first + slices], str(folder / f"ct{n}.nrrd"))
        sitk.WriteImage(seg[:, :, first:first + slices], str(folder / f"seg{n}.nrrd"))
        out.append(Case(f"case{n}", str(folder / f"ct{n}.nrrd"), labels=str(folder / f"seg{n}.nrrd")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--slices", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    options = CaseOptions(label_values=[5], preset="lung")
    spec = ModelSpec(random_weights=True)
    results = {name: [] for name, *_ in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        cases = make_cohort(tmp, args.cases, args.slices)
        for repeat in range(args.repeats):
            for name, use_ray, workers, threads in CONFIGS if repeat % 2 == 0 else CONFIGS[::-1]:
                out = tmp / f"out_{repeat}_{workers}_{threads}_{use_ray}"
                summary = run_cohort(cases, out, options, spec, workers=workers, threads=threads,
                                     use_ray=use_ray, progress=False)
                assert summary["ok"] == args.cases, summary["failed"]
                t = summary["timings"]
                start = t.get("ray_start_s", t.get("model_load_s"))
                results[name].append((t["total_s"], start))
                print(f"repeat {repeat + 1} {name}: {t['total_s']:.1f} s total, start-up {start:.1f} s", flush=True)
    print(f"\n{args.cases} cases x {args.slices} slices (CTChest4, right lung, random SAM-2 weights), "
          f"{os.cpu_count()} CPUs, medians of {args.repeats}")
    print(f"{'configuration':28s} {'cases/min':>9s} {'excl. start-up':>14s} {'start-up s':>10s}")
    rate = {}
    for name, runs in results.items():
        total = statistics.median(r[0] for r in runs)
        start = statistics.median(r[1] for r in runs)
        rate[name] = args.cases * 60 / total
        print(f"{name:28s} {rate[name]:9.2f} {args.cases * 60 / (total - start):14.2f} {start:10.1f}")
    print(f"scaling, Ray 2 vs 1 workers: x{rate[CONFIGS[3][0]] / rate[CONFIGS[2][0]]:.2f}; "
          f"loop 2 vs 1 threads: x{rate[CONFIGS[1][0]] / rate[CONFIGS[0][0]]:.2f}; "
          f"Ray 2x1 vs loop 2 threads: x{rate[CONFIGS[3][0]] / rate[CONFIGS[1][0]]:.2f}")
    ray_start = statistics.median(r[1] for r in results[CONFIGS[2][0]])
    loop_start = statistics.median(r[1] for r in results[CONFIGS[0][0]])
    print(f"Ray start-up overhead (1 worker ready minus one model load in the loop): {ray_start - loop_start:.1f} s")


if __name__ == "__main__":
    main()
