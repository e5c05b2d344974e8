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
    o, r = min(ours_t), min(ref_t)
    emit(case="first_propagation" + tag, ours_s=round(o, 3), ref_s=round(r, 3), ratio=round(r / o, 3),
         peak_rss_mb=round(rss_mb()), slices=n_slices, shape=list(volume.shape), precision=precision,
         kernels=model.kernels, per_slice_ours_s=round(o / n_slices, 3))

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
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.memory_only:
        emit(**memory_case(args.memory_only))
        return
    n = 300 if args.full else 48
    timing_cases(n, "fp32", repeats=1 if args.full else 2)
    for m in ([96, 300] if args.full else [96]):
        subprocess.run([sys.executable, __file__, "--memory-only", str(m)], check=True)
    timing_cases(n, "fp32", repeats=1, kernels="torch", only_ratios=True)
    timing_cases(n, "bf16", repeats=1)


if __name__ == "__main__":
    main()
