"""`make bench`: the engine against SAM-2's official pipeline, side by side in one run, same weights and precision.

Prints one JSON object per line: case, ours_s, ref_s, ratio (= ref_s / ours_s), peak_rss_mb, and details.
The reference is SAM-2 as its users run it (MedSAM2's flow): slices windowed and written as JPEG frames into a
folder, `init_state(folder)`, prompt, propagate forward, `reset_state`, prompt again, propagate backward.
Random weights (no checkpoint can be downloaded here): timings do not depend on the weights' values.
Both sides compute in fp32 (or both under bf16 autocast). On the CPU in fp32 our linear layers run on oneDNN with
prepacked weights (the same fp32 arithmetic, see engine/cpu_kernels.py); the `_torch_kernels` cases repeat the
ratios with PyTorch's own kernels on both sides, so the pipeline's share of the gain is visible on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from medsam2_backend.engine import Preprocessing  # noqa: E402
from medsam2_backend.engine.model import SAM2_CONFIG, SAM2_OVERRIDES, load_model  # noqa: E402
from medsam2_backend.engine.preprocess import to_uint8  # noqa: E402
from medsam2_backend.engine.sam2_engine import Sam2Engine  # noqa: E402

PRE = Preprocessing(preset="soft_tissue")
BOX_FRACTION = (0.35, 0.35, 0.65, 0.65)


def rss_mb() -> float:
    """Peak resident memory of this process. VmHWM, not ru_maxrss: the latter survives fork+exec on Linux and
    would report the parent's peak in the memory subprocess."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def ct_volume(n_slices: int, side: int = 512) -> np.ndarray:
    """slicerio's CTChest4 (real CT, 128x128x34) resampled to side x side x n_slices, int16, slices on axis 0."""
    import nrrd
    import slicerio
    from scipy import ndimage

    vol, _ = nrrd.read(slicerio.get_testdata_file("CTChest4.nrrd"))
    vol = np.moveaxis(vol, 2, 0).astype(np.float32)
    zoom = (n_slices / vol.shape[0], side / vol.shape[1], side / vol.shape[2])
    return ndimage.zoom(vol, zoom, order=1).astype(np.int16)


def box_for(shape) -> np.ndarray:
    h, w = shape
    x0, y0, x1, y1 = BOX_FRACTION
    return np.array([x0 * w, y0 * h, x1 * w, y1 * h], np.float32)


class Reference:
    """SAM-2's official video predictor, driven as its users drive it."""

    def __init__(self, model):
        from sam2.build_sam import build_sam2_video_predictor

        self.model = model
        self.predictor = build_sam2_video_predictor(SAM2_CONFIG, None, device=str(model.device),
                                                    hydra_overrides_extra=list(SAM2_OVERRIDES))
        self.predictor.load_state_dict(model.predictor.state_dict())
        self.predictor.fill_hole_area = model.predictor.fill_hole_area

    def write_frames(self, volume, folder):
        lo, hi = PRE.window
        for k in range(volume.shape[0]):
            grey = to_uint8(volume[k], lo, hi)
            Image.fromarray(np.stack([grey] * 3, axis=-1)).save(os.path.join(folder, f"{k:05d}.jpg"), quality=95)

    def first_propagation(self, volume, k, box):
        with tempfile.TemporaryDirectory() as folder, torch.inference_mode(), self.model.autocast():
            self.write_frames(volume, folder)
            state = self.predictor.init_state(folder)
            self.predictor.add_new_points_or_box(state, k, 1, box=box)
            n = sum(1 for _ in self.predictor.propagate_in_video(state))
            self.predictor.reset_state(state)
            self.predictor.add_new_points_or_box(state, k, 1, box=box)
            n += sum(1 for _ in self.predictor.propagate_in_video(state, reverse=True))
        return state, n

    def correction(self, state, k, box, c, point):
        """The same logical work as the engine's re-propagation, on the reference's initialised state: its
        forward state is rebuilt (prompt + forward pass), then the correction and the affected range."""
        with torch.inference_mode(), self.model.autocast():
            self.predictor.reset_state(state)
            self.predictor.add_new_points_or_box(state, k, 1, box=box)
            for _ in self.predictor.propagate_in_video(state):
                pass
            t0 = time.perf_counter()
            self.predictor.add_new_points_or_box(state, c, 1, points=[point], labels=[1], clear_old_points=False)
            n = sum(1 for _ in self.predictor.propagate_in_video(state, start_frame_idx=c))
            return time.perf_counter() - t0, n


def ours_first_propagation(engine, volume, k, box):
    s = engine.open_session(volume, axis=0, preprocessing=PRE)
    s.add_prompt(1, k, box=box)
    n = sum(1 for _ in s.propagate())
    return s, n


def steady_state_per_slice(engine, volume, k, box, slices) -> tuple[float, float]:
    """Median seconds per slice of a forward pass over `slices` (the memory bank already full), measured between
    the slices the engine yields, and the model's own forward on the same slices, called directly."""
    session = engine.open_session(volume, axis=0, preprocessing=PRE)
    session.add_prompt(1, k, box=box)
    times, last = {}, time.perf_counter()
    for r in session.propagate(direction="forward", stop=slices[-1]):
        now = time.perf_counter()
        times[r.slice_index], last = now - last, now
    ours = float(np.median([times[j] for j in slices]))
    p, model = engine.model.predictor, engine.model
    out = session._states[1]["forward"]["output_dict_per_obj"][0]
    direct = []
    with torch.inference_mode(), model.autocast():
        for j in slices:
            saved = out["non_cond_frame_outputs"].pop(j)  # the memory bank as it was when slice j was tracked
            t0 = time.perf_counter()
            image = session.frames[j].unsqueeze(0)
            backbone = p.forward_image(image)
            _, feats, pos, sizes = p._prepare_backbone_features(backbone)
            p.track_step(frame_idx=j, is_init_cond_frame=False, current_vision_feats=feats,
                         current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=None, mask_inputs=None,
                         output_dict=out, num_frames=session.num_slices, run_mem_encoder=True)
            direct.append(time.perf_counter() - t0)
            out["non_cond_frame_outputs"][j] = saved
    return ours, float(np.median(direct))


def emit(**row):
    print(json.dumps(row), flush=True)


def timing_cases(n_slices: int, precision: str, repeats: int, kernels: str | None = None, only_ratios=False):
    """The timed cases. `kernels="torch"` is the labelled case without oneDNN-packed linears: what the pipeline
    alone (lazy frames, feature cache, no JPEG) gains over the reference, with PyTorch's own kernels on both sides."""
    model = load_model(random_weights=True, seed=0, precision=precision, kernels=kernels)
    engine, ref = Sam2Engine(model, cache_budget_bytes=4 << 30), Reference(model)
    volume = ct_volume(n_slices)
    k, box = n_slices // 2, box_for(volume.shape[1:])
    tag = ("" if precision == "fp32" else f"_{precision}") + ("_torch_kernels" if kernels == "torch" else "")
    ours_t, ref_t = [], []
    for _ in range(repeats):  # alternate, so drift on the machine hits both sides alike
        t0 = time.perf_counter()
        session, n_ours = ours_first_propagation(engine, volume, k, box)
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref_state, n_ref = ref.first_propagation(volume, k, box)
        ref_t.append(time.perf_counter() - t0)
    assert n_ours == n_slices and n_ref == n_slices + 1  # the reference reports the prompted slice twice
    o, r = float(np.median(ours_t)), float(np.median(ref_t))
    emit(case="first_propagation" + tag, ours_s=round(o, 3), ref_s=round(r, 3), ratio=round(r / o, 3),
         peak_rss_mb=round(rss_mb()), slices=n_slices, shape=list(volume.shape), precision=precision,
         kernels=model.kernels, per_slice_ours_s=round(o / n_slices, 3), repeats=repeats, statistic="median")

    c, point = k + n_slices // 4, [float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2]
    t0 = time.perf_counter()
    session.add_prompt(1, c, points=[point], labels=[1])
    n_ours = sum(1 for _ in session.propagate(direction="forward"))
    o = time.perf_counter() - t0
    r, n_ref = ref.correction(ref_state, k, box, c, point)
    assert n_ours == n_ref
    emit(case="repropagation" + tag, ours_s=round(o, 3), ref_s=round(r, 3), ratio=round(r / o, 3),
         peak_rss_mb=round(rss_mb()), slices=n_ours, precision=precision)
    if only_ratios:
        return

    t0 = time.perf_counter()
    session.add_prompt(1, k, points=[[float(box[0]) + 3, float(box[1]) + 3]], labels=[0])
    emit(case="click_encoded_slice" + tag, ours_s=round(time.perf_counter() - t0, 3), ref_s=None, ratio=None,
         peak_rss_mb=round(rss_mb()), precision=precision, target_s=0.3)

    steady = list(range(k + 8, min(k + 16, n_slices)))
    ours, direct = steady_state_per_slice(engine, volume, k, box, steady)
    emit(case="model_forward_overhead" + tag, ours_s=round(ours, 3), ref_s=round(direct, 3),
         ratio=round(direct / ours, 3), overhead=round(ours / direct, 3), slices=steady, peak_rss_mb=round(rss_mb()),
         precision=precision, note="overhead = our per-slice propagation time / the model's own forward "
                                   "(preprocessing + encoder + memory attention + decoder + memory encoder), "
                                   "median over the same slices with a full memory bank; target <= 1.15")


def warm_up(model, volume) -> None:
    """One untimed prompt and two tracked slices: oneDNN builds its kernels on first use."""
    s = Sam2Engine(model).open_session(volume[:3], axis=0, preprocessing=PRE)
    s.add_prompt(1, 0, box=box_for(volume.shape[1:]))
    list(s.propagate(direction="forward"))


def several_segments(n_slices: int, repeats: int, budget_slices: int | None):
    """3 segments in one propagation (`propagate([1, 2, 3])`) against 3 propagations one after another, each on a
    fresh session with the same prompts (anchors on three different slices), same weights, same volume.

    Like with like: one untimed round of both sides first, so neither pays oneDNN's first-use kernel builds (one per
    new shape: memory banks of every depth, both directions) or the process's first heap growth (the first timed run
    used to pay them, which made "together" look slower), then repeats in ABBA order. Each row reports the slices
    each side encoded (with a cache that holds the volume both encode every slice once: the same work) and the
    process's CPU seconds besides wall seconds: on a machine shared with other jobs the CPU time of the same work
    varies far less than the wall time.
    """
    model = load_model(random_weights=True, seed=0)
    volume = ct_volume(n_slices, side=256)
    box = box_for(volume.shape[1:])
    anchors = {1: n_slices // 2 - 2, 2: n_slices // 2, 3: n_slices // 2 + 2}
    per_slice = 4 << 20  # fp32 features of one 512 px slice (32x128², 64x64², 256x32² floats)
    budget = 4 << 30 if budget_slices is None else budget_slices * per_slice

    def prompted():
        s = Sam2Engine(model, cache_budget_bytes=budget).open_session(volume, axis=0, preprocessing=PRE)
        for obj_id, k in anchors.items():
            s.add_prompt(obj_id, k, box=box + 4 * (obj_id - 2))
        return s

    def timed(propagations):
        s = prompted()
        t0, c0 = time.perf_counter(), time.process_time()
        n = sum(1 for run in propagations(s) for _ in run)
        return time.perf_counter() - t0, time.process_time() - c0, n, s.cache.misses

    def together(s):
        return [s.propagate([1, 2, 3])]

    def one_by_one(s):
        return (s.propagate([obj_id]) for obj_id in anchors)

    timed(together), timed(one_by_one)  # untimed warm-up: the same work as the timed runs
    wall, cpu, encoded = {together: [], one_by_one: []}, {together: [], one_by_one: []}, {}
    for i in range(repeats):  # ABBA: each side goes first as often as the other
        for side in ((together, one_by_one) if i % 2 == 0 else (one_by_one, together)):
            t, c, n, encoded[side] = timed(side)
            assert n == 3 * n_slices
            wall[side].append(t)
            cpu[side].append(c)
    o, r = float(np.median(wall[together])), float(np.median(wall[one_by_one]))
    o_cpu, r_cpu = float(np.median(cpu[together])), float(np.median(cpu[one_by_one]))
    paired = [b / a for a, b in zip(wall[together], wall[one_by_one])]
    emit(case="three_segments_" + ("cache_holds_volume" if budget_slices is None else f"cache_{budget_slices}_slices"),
         ours_s=round(o, 3), ref_s=round(r, 3), ratio=round(r / o, 3), paired_ratio_median=round(float(
             np.median(paired)), 3), peak_rss_mb=round(rss_mb()), slices=n_slices, shape=list(volume.shape),
         slices_encoded_ours=encoded[together], slices_encoded_ref=encoded[one_by_one], repeats=repeats,
         statistic="median", order="ABBA after one untimed round of both",
         ours_cpu_s=round(o_cpu, 3), ref_cpu_s=round(r_cpu, 3), cpu_ratio=round(r_cpu / o_cpu, 3),
         ours_runs_s=[round(t, 2) for t in wall[together]], ref_runs_s=[round(t, 2) for t in wall[one_by_one]],
         note="ours = one propagate([1, 2, 3]); ref = propagate([1]), ([2]), ([3]) one after another")


def corrections_on_one_side(n_slices: int, repeats: int, counts=(1, 4, 8)):
    """What conditioning frames cost: seconds per slice re-tracked beyond 1, 4 or 8 corrections on the forward
    side (every correction is a conditioning frame each later slice attends to)."""
    model = load_model(random_weights=True, seed=0)
    volume = ct_volume(n_slices, side=256)
    box, anchor = box_for(volume.shape[1:]), 1
    first_fix, last_fix = anchor + 1, anchor + max(counts)
    point = [[float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2]]
    warm_up(model, volume)
    sessions = {}
    for n in counts:
        s = Sam2Engine(model, cache_budget_bytes=4 << 30).open_session(volume, axis=0, preprocessing=PRE)
        s.add_prompt(1, anchor, box=box)
        list(s.propagate(direction="forward"))
        for c in range(last_fix - n + 1, last_fix + 1):  # the corrections end on the same slice for every n
            s.add_prompt(1, c, points=point, labels=[1])
        list(s.propagate(direction="forward"))
        sessions[n] = s
    per_slice = {n: [] for n in counts}
    for _ in range(repeats):  # alternate the counts, so drift hits all alike
        for n, s in sessions.items():
            times, last = [], None
            for r in s.propagate(direction="forward", start=first_fix):
                now = time.perf_counter()
                if r.slice_index > last_fix + 1:
                    times.append(now - last)
                last = now
            per_slice[n].append(float(np.median(times)))
    base = float(np.median(per_slice[counts[0]]))
    for n in counts:
        t = float(np.median(per_slice[n]))
        emit(case=f"corrections_{n}_one_side", ours_s=round(t, 4), ref_s=round(base, 4), ratio=round(base / t, 3),
             peak_rss_mb=round(rss_mb()), conditioning_frames=n + 1, slices_timed=n_slices - last_fix - 2,
             repeats=repeats, statistic="median",
             note=f"seconds per re-tracked slice beyond the corrections; ref = the same with {counts[0]} correction")


def undo_replay(n_slices: int):
    """What an Undo's replay changes today. Original: box, propagate; click on a tracked slice, propagate; click on
    the other side, propagate. Replay after an Undo (what the Slicer side does: the same add_prompt calls, in order,
    on a fresh object) and then the user's next Propagate; and the same replay with the recorded propagations
    between the calls. A click on a tracked slice is computed from that slice's memory (the earlier slices' masks,
    the conditioning slices) and its previous mask logits; on a fresh object the slice is untracked, so SAM-2 takes
    the click as a new initial prompt: no memory, no previous mask. Counts pixels differing (random weights)."""
    model = load_model(random_weights=True, seed=0)
    volume = ct_volume(n_slices, side=128)
    box, anchor = box_for(volume.shape[1:]), n_slices // 2
    cx, cy = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
    calls = [(anchor, dict(box=box)),
             (anchor + 3, dict(points=[[cx + 8, cy + 6], [cx - 8, cy - 6]], labels=[1, 0])),
             (anchor - 3, dict(points=[[cx - 8, cy - 6]], labels=[0]))]

    def history(with_propagations: bool):
        s = Sam2Engine(model).open_session(volume, axis=0, preprocessing=PRE)
        returned = {}
        for k, prompt in calls:
            returned[k] = s.add_prompt(1, k, **prompt).mask
            if with_propagations:
                list(s.propagate())
        list(s.propagate())  # the user's next Propagate
        return returned, s.object_mask(1).copy()

    original = history(True)
    for name, with_propagations in (("prompts_only", False), ("with_recorded_propagations", True)):
        returned, after = history(with_propagations)
        per_slice = (after != original[1]).reshape(n_slices, -1).sum(axis=1)
        emit(case=f"undo_replay_{name}", ours_s=None, ref_s=None, ratio=None, slices=n_slices,
             slice_pixels=int(after[0].size), corrections={str(k): int((returned[k] != original[0][k]).sum())
                                                            for k, _ in calls[1:]},
             next_propagate_pixels_differing_per_slice=per_slice.tolist(),
             object_voxels_original=int(original[1].sum()), object_voxels_replayed=int(after.sum()),
             note="corrections: pixels of each correction's returned mask that differ from the original click's")


def memory_case(n_slices: int) -> dict:
    """Run in a fresh process: peak RSS of a two-way propagation, then of 5 corrections + re-propagations."""
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(random_weights=True, seed=0)
    volume = ct_volume(n_slices)
    base = rss_mb()
    engine = Sam2Engine(model, cache_budget_bytes=1 << 30)
    k, box = n_slices // 2, box_for(volume.shape[1:])
    session, _ = ours_first_propagation(engine, volume, k, box)
    first = rss_mb()
    for i in range(5):
        c = k + (i + 1) * n_slices // 12 * (1 if i % 2 == 0 else -1)
        session.add_prompt(1, c, points=[[float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2]], labels=[1])
        for _ in session.propagate():
            pass
    after = rss_mb()
    return {"case": f"memory_{n_slices}", "ours_s": None, "ref_s": None, "ratio": None,
            "peak_rss_mb": round(first), "peak_rss_after_5_repropagations_mb": round(after),
            "growth_pct": round(100 * (after - first) / first, 2), "rss_before_session_mb": round(base),
            "shape": list(volume.shape), "feature_cache_mb": round(session.cache.nbytes / 2**20)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="512x512x300 volumes (no time limit)")
    parser.add_argument("--memory-only", type=int, metavar="N", help=argparse.SUPPRESS)
    parser.add_argument("--slices", type=int, help="slices of the pipeline cases' volume (default 48, FULL 300)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (default: all cores; 1 makes CPU seconds a clean measure of the work on a "
                             "machine shared with other jobs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_only:
        emit(**memory_case(args.memory_only))
        return
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    n = args.slices or (300 if args.full else 48)
    if "pipeline" in cases:
        timing_cases(n, "fp32", repeats=3)
    if "segments" in cases:
        several_segments(10, repeats=4, budget_slices=None)
        several_segments(10, repeats=4, budget_slices=4)
    if "corrections" in cases:
        corrections_on_one_side(18, repeats=3)
    if "replay" in cases:
        undo_replay(12)
    if "memory" in cases:
        for m in ([96, 300] if args.full else [96]):
            subprocess.run([sys.executable, __file__, "--memory-only", str(m)], check=True)
    if "kernels" in cases:
        timing_cases(n, "fp32", repeats=3, kernels="torch", only_ratios=True)
    if "bf16" in cases:
        timing_cases(n, "bf16", repeats=3)


CASES = ("pipeline", "segments", "corrections", "replay", "memory", "kernels", "bf16")


if __name__ == "__main__":
    main()
