"""A cohort: a manifest of cases, each segmented (and measured) like one `segment` call, on Ray or in one process.

Ray runs one actor per worker, each with its own model (`num_cpus` = threads, one GPU each where the cluster has
GPUs); Ray's ActorPool hands out cases. Each case is read where its task runs and only its summary comes back.
A case is skipped when its report says it finished with the same inputs (file contents), options and model; a
failed case is recorded with its message and the run goes on. The report is written last, atomically, so a case
killed half-way is redone on the next run.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import pathlib
import statistics
import time
import traceback

from ..engine import EngineInputError
from .case import CaseOptions, case_stem, plan_case, run_case, write_json_atomically
from .errors import CaseInputError, CohortError

METRICS = ("dice", "nsd", "hd95_mm")
SUMMARY_COLUMNS = ("id", "status", "object", "label", "dice", "nsd", "hd95_mm", "voxels", "seconds",
                   "least_certain_slice", "least_certain_iou", "message")


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    image: str
    prompts: str | None = None
    labels: str | None = None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How a worker builds its engine (sent to each Ray actor; the model itself never travels)."""

    checkpoint: str | None = None
    random_weights: bool = False
    test_engine: bool = False
    device: str | None = None
    precision: str | None = None

    def build(self):
        if self.test_engine:
            from ..engine import DiskEngine

            return DiskEngine()
        from ..engine import load_engine

        return load_engine(self.checkpoint, device=self.device, precision=self.precision,
                           random_weights=self.random_weights)


def read_manifest(path: str | pathlib.Path) -> list[Case]:
    """Cases of a manifest CSV (columns image, prompts or labels, optional id); paths relative to its folder."""
    path = pathlib.Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # a spreadsheet's CSV may start with a BOM
            rows = [{(k or "").strip().lower(): v for k, v in row.items()} for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CaseInputError(f"The manifest {path} could not be read ({e}).") from None
    if not rows:
        raise CaseInputError(f"The manifest {path} has no cases (a header line image,prompts|labels[,id] and one "
                             "line per case).")
    columns = set(rows[0])
    if "image" not in columns or not columns & {"prompts", "labels"}:
        raise CaseInputError(f"The manifest {path} needs an \"image\" column and a \"prompts\" or \"labels\" "
                             f"column; it has {', '.join(sorted(c for c in columns if c)) or 'none'}.")
    base = path.resolve().parent  # absolute: a worker on a cluster runs in another folder

    def resolve(value):
        value = (value or "").strip()
        return str(base / value) if value else None

    cases, seen = [], set()
    for n, row in enumerate(rows, 2):
        image = resolve(row.get("image"))
        if image is None:
            raise CaseInputError(f"The manifest {path}, line {n}, has no image.")
        case_id = (row.get("id") or "").strip() or case_stem(image)
        if case_id in seen or "/" in case_id or case_id in (".", ".."):
            raise CaseInputError(f"The manifest {path}, line {n}: case id {case_id!r} is repeated or not a "
                                 "valid folder name; give each case a unique id.")
        seen.add(case_id)
        cases.append(Case(case_id, image, resolve(row.get("prompts")), resolve(row.get("labels"))))
    return cases


def _hash_path(digest, path: str) -> None:
    p = pathlib.Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        digest.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)


def resume_key(case: Case, options: CaseOptions, model: dict) -> str:
    """Same file contents, options and model -> same key (paths may move; contents may not change)."""
    digest = hashlib.sha256()
    for path in (case.image, case.prompts, case.labels):
        digest.update(b"|")
        if path is not None and pathlib.Path(path).exists():
            _hash_path(digest, path)
    wanted = {k: model.get(k) for k in ("engine", "model", "checkpoint", "checkpoint_sha256", "precision",
                                        "image_size", "radius", "shrink")}
    digest.update(json.dumps([options.as_dict(), wanted], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def process_case(engine, case: Case, out_root: pathlib.Path, options: CaseOptions, on_slice=None) -> dict:
    """Run (or skip) one case; never raises for a bad case: the failure is its result."""
    t0 = time.perf_counter()
    out_dir = out_root / case.id
    try:
        key = resume_key(case, options, engine.describe())
        previous = out_dir / "report.json"
        if previous.exists():
            try:
                old = json.loads(previous.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                old = {}
            if old.get("status") == "ok" and old.get("resume_key") == key:
                return {"id": case.id, "status": "skipped", "report": old}
        if case.prompts and case.labels:
            raise CaseInputError("The case has both prompts and labels; give one of them.")
        if not case.prompts and not case.labels:
            raise CaseInputError("The case has neither prompts nor labels.")
        plan = plan_case(case.image, prompts_path=case.prompts, labels_path=case.labels, options=options)
        report = run_case(engine, plan, out_dir, options, on_slice=on_slice,
                          extra={"id": case.id, "resume_key": key})
        (out_dir / "failed.json").unlink(missing_ok=True)  # an earlier failure of this case is history now
        return {"id": case.id, "status": "ok", "report": report}
    except (CaseInputError, EngineInputError) as e:
        message, detail = str(e), None
    except Exception as e:  # noqa: BLE001 - one broken case must not end a cohort; the trace goes to failed.json
        message, detail = f"{type(e).__name__}: {e}", traceback.format_exc()
    out_dir.mkdir(parents=True, exist_ok=True)
    failure = {"id": case.id, "status": "failed", "message": message, "seconds": time.perf_counter() - t0,
               "traceback": detail}
    write_json_atomically(out_dir / "failed.json", failure)
    return failure


# ---- running the cohort ----------------------------------------------------------------------------------------
def worker_resources(threads: int, cluster_gpus: float) -> dict:
    """What each worker asks Ray for: its threads as CPUs, and one GPU where the cluster has any."""
    return {"num_cpus": threads, "num_gpus": 1 if cluster_gpus >= 1 else 0}


def _ray_worker_class():
    import ray

    @ray.remote
    class CaseWorker:
        """One model per worker process; cases arrive one at a time."""

        def __init__(self, spec: ModelSpec, threads: int):
            import torch

            torch.set_num_threads(threads)
            self.engine = spec.build()

        def run(self, case: Case, out_root: str, options: CaseOptions) -> dict:
            return process_case(self.engine, case, pathlib.Path(out_root), options)

        def gpu_ids(self) -> list:
            return [str(g) for g in ray.get_gpu_ids()]

    return CaseWorker


def start_workers(spec: ModelSpec, workers: int, threads: int):
    """Ray actors (Ray must be initialised), each holding its own engine."""
    import ray

    resources = worker_resources(threads, ray.cluster_resources().get("GPU", 0))
    worker = _ray_worker_class()
    actors = [worker.options(**resources).remote(spec, threads) for _ in range(workers)]
    ray.get([a.gpu_ids.remote() for a in actors])  # every worker has its model: start-up ends here
    return actors, resources


def run_cohort(cases: list[Case], out_root: pathlib.Path, options: CaseOptions, spec: ModelSpec, *,
               workers: int = 1, threads: int = 1, ray_address: str | None = None, use_ray: bool = True,
               progress: bool = True) -> dict:
    """Every case once; writes summary.csv and cohort_summary.json in `out_root` and returns the summary."""
    from tqdm import tqdm

    out_root = pathlib.Path(out_root).resolve()  # workers on a cluster run in another folder
    out_root.mkdir(parents=True, exist_ok=True)
    results, timings = [], {}
    t0 = time.perf_counter()
    bar = tqdm(total=len(cases), unit="case", desc="cases", disable=not progress)
    if use_ray:
        import ray

        started_here = not ray.is_initialized()
        if started_here:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # medical cohorts: nothing leaves the machine
            if ray_address:
                try:
                    ray.init(address=ray_address, log_to_driver=False)
                except (ConnectionError, RuntimeError, ValueError) as e:
                    raise CohortError(f"No Ray cluster could be reached at {ray_address} ({e}).") from None
            else:  # a private Ray on this machine: loopback only, no dashboard, as many CPUs as workers use
                ray.init(address="local", num_cpus=workers * threads, include_dashboard=False, log_to_driver=False,
                         _node_ip_address="127.0.0.1")
        try:
            try:
                actors, resources = start_workers(spec, workers, threads)
                timings["ray_start_s"] = time.perf_counter() - t0
                pool = ray.util.ActorPool(actors)
                for result in pool.map_unordered(lambda a, c: a.run.remote(c, str(out_root), options), cases):
                    results.append(result)
                    bar.update()
            except ray.exceptions.RayError as e:
                cause = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
                raise CohortError(f"A Ray worker could not start or stopped ({cause[0].strip()[:200]}); the "
                                  f"{len(results)} finished cases are kept, run the command again to resume.") from None
            for a in actors:
                ray.kill(a)
        finally:
            if started_here:
                ray.shutdown()
        timings["worker_resources"] = resources
    else:
        import torch

        torch.set_num_threads(threads)
        engine = spec.build()
        timings["model_load_s"] = time.perf_counter() - t0
        for case in cases:
            def on_slice(done, planned, case_id=case.id):  # slices of the running object
                bar.set_postfix_str(f"{case_id}: slice {done}/{planned}")

            results.append(process_case(engine, case, out_root, options, on_slice=on_slice))
            bar.update()
    bar.close()
    timings["total_s"] = time.perf_counter() - t0
    return write_summaries(results, out_root, timings)


def _rows(result: dict) -> list[dict]:
    if result["status"] == "failed":
        return [{"id": result["id"], "status": "failed", "message": result["message"],
                 "seconds": round(result["seconds"], 3)}]
    rows = []
    for obj in result["report"]["objects"]:
        metrics = obj.get("metrics") or {}
        worst = obj["least_certain"][0] if obj["least_certain"] else {}
        rows.append({"id": result["id"], "status": result["status"], "object": obj["name"], "label": obj["label"],
                     **{m: metrics.get(m) for m in METRICS}, "voxels": obj["voxels"],
                     "seconds": round(obj["seconds"], 3), "least_certain_slice": worst.get("slice"),
                     "least_certain_iou": worst.get("iou"), "message": ""})
    return rows


def write_summaries(results: list[dict], out_root: pathlib.Path, timings: dict) -> dict:
    """summary.csv (one row per case and object) and cohort_summary.json (statistics, worst cases first)."""
    rows = [row for r in sorted(results, key=lambda r: r["id"]) for row in _rows(r)]
    with open(out_root / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    done = [r for r in rows if r["status"] in ("ok", "skipped")]
    stats = {}
    for m in METRICS:
        values = [r[m] for r in done if r[m] is not None]
        if values:
            stats[m] = {"mean": statistics.fmean(values), "median": statistics.median(values), "n": len(values)}
    # Worst first: lowest Dice where there is ground truth, else lowest predicted IoU (the model's own doubt).
    worst = sorted(done, key=lambda r: (r["dice"] if r["dice"] is not None else 2.0,
                                        r["least_certain_iou"] if r["least_certain_iou"] is not None else 2.0))
    summary = {"cases": len(results), "ok": sum(r["status"] == "ok" for r in results),
               "skipped": sum(r["status"] == "skipped" for r in results),
               "failed": [{"id": r["id"], "message": r["message"]} for r in results if r["status"] == "failed"],
               "metrics": stats, "worst_first": [{k: r[k] for k in ("id", "object", "dice", "nsd", "hd95_mm",
                                                                     "least_certain_slice")} for r in worst],
               "timings": timings, "summary_csv": str(out_root / "summary.csv")}
    write_json_atomically(out_root / "cohort_summary.json", summary)
    return summary
