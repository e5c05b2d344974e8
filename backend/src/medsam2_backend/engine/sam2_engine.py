"""SAM-2 with MedSAM2 weights behind the engine interface.

All model work goes through SAM-2's own `SAM2VideoPredictor` methods, so the masks are those of the official
predictor. Two things differ, neither of which changes what is computed:
- frames come from `SliceFrames` (lazy, in memory) instead of a folder of JPEG files;
- backbone features are kept in a `FeatureCache` shared by all tracking states of a volume, bounded by a memory
  budget, instead of SAM-2's cache of the last frame only, so corrections and re-propagation never re-encode.
"""

from __future__ import annotations

import collections
import threading
from typing import Iterator

import numpy as np
import torch
from medsam2_client import protocol
from sam2.sam2_video_predictor import SAM2VideoPredictor

from .base import BACKWARD, SlicePrompt, SliceResult, VolumeSession
from .model import Sam2Model
from .preprocess import Preprocessing, SliceFrames, square_size

_OBJ = 1  # each tracking state holds one object; objects are kept apart by the session


class FeatureCache:
    """Backbone features per slice, least-recently-used out when over `budget_bytes`.

    Position encodings are the same for every slice, so one copy is kept for all. Whatever the budget, the slice
    encoded last is kept (every object of a propagation needs it in turn), and so are the `pinned` slices: prompted
    slices whose memory SAM-2 encodes only when the next propagation starts, from the same features.
    Features are kept in the dtypes the encoder gave them (under bf16 autocast the two high-resolution levels are
    bf16, the lowest stays fp32), never cast: a hit then gives exactly the features an encoding gives, so a mask
    never depends on whether its slice was still cached (another object's pass, a re-propagation, a replay).
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: collections.OrderedDict[int, list[torch.Tensor]] = collections.OrderedDict()
        self._entry_bytes = 0
        self._last: tuple[int, list[torch.Tensor]] | None = None
        self._pinned: set[int] = set()
        self._pos_enc: list[torch.Tensor] | None = None
        self.misses = 0  # slices encoded: a correction must not add any

    @property
    def nbytes(self) -> int:
        extra = self._last is not None and self._last[0] not in self._entries
        return self._entry_bytes + (_size(self._last[1]) if extra else 0)

    def get(self, k: int) -> dict | None:
        fpn = self._entries.get(k)
        if fpn is not None:
            self._entries.move_to_end(k)
        elif self._last is not None and self._last[0] == k:
            fpn = self._last[1]
        else:
            self.misses += 1
            return None
        return {"backbone_fpn": list(fpn), "vision_pos_enc": list(self._pos_enc)}

    def put(self, k: int, backbone_out: dict) -> None:
        fpn = list(backbone_out["backbone_fpn"])
        if self._pos_enc is None:
            self._pos_enc = list(backbone_out["vision_pos_enc"])
        self._last = (k, fpn)
        self._remove(k)
        self._entries[k] = fpn
        self._entry_bytes += _size(fpn)
        self._evict()

    def pin_only(self, slices) -> None:
        """Keep exactly these slices beyond the budget (those still cached, or encoded last)."""
        self._pinned = set(slices)
        for k in self._pinned - set(self._entries):
            if self._last is not None and self._last[0] == k:
                self._entries[k] = self._last[1]
                self._entry_bytes += _size(self._last[1])
        self._evict()

    def _remove(self, k: int) -> None:
        old = self._entries.pop(k, None)
        if old is not None:
            self._entry_bytes -= _size(old)

    def _evict(self) -> None:
        for k in list(self._entries):  # least recently used first
            if self._entry_bytes <= self.budget_bytes:
                return
            if k not in self._pinned:
                self._remove(k)

    def shrink(self, budget_bytes: int) -> None:
        """Lower (or raise) the budget, dropping least-recently-used slices until the cache fits it."""
        self.budget_bytes = budget_bytes
        self._evict()  # the same rule as on every insert: least recently used first, pinned slices kept

    def clear(self) -> None:
        self._entries.clear()
        self._entry_bytes = 0
        self._last = None
        self._pinned = set()
        self._pos_enc = None

    def __len__(self) -> int:
        return len(self._entries)


def _size(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


_NOT_STATE = ("images", "feature_cache")  # a tracking state's entries that are not its own memory


def _tensor_bytes(tree) -> int:
    """Bytes of the tensor storages in nested dicts/lists, each storage once (views share theirs)."""
    seen, total, todo = set(), 0, [tree]
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
    return total


class CachingVideoPredictor(SAM2VideoPredictor):
    """SAM-2's video predictor with a bounded multi-slice feature cache and the predicted IoU kept per output."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        reuse_position_embedding(self.image_encoder.trunk)

    def _get_image_feature(self, inference_state, frame_idx, batch_size):
        cache: FeatureCache = inference_state["feature_cache"]
        backbone_out = cache.get(frame_idx)
        if backbone_out is None:
            image = inference_state["images"][frame_idx].to(inference_state["device"]).float().unsqueeze(0)
            backbone_out = self.forward_image(image)
            cache.put(frame_idx, backbone_out)
        expanded = {
            "backbone_fpn": [f.expand(batch_size, -1, -1, -1) for f in backbone_out["backbone_fpn"]],
            "vision_pos_enc": [p.expand(batch_size, -1, -1, -1) for p in backbone_out["vision_pos_enc"]],
        }
        # SAM-2 never reads the image back from here (callers discard it), so it is not kept.
        return (None,) + self._prepare_backbone_features(expanded)

    def _forward_sam_heads(self, *args, **kwargs):
        outputs = super()._forward_sam_heads(*args, **kwargs)
        ious, multimask = outputs[2], kwargs.get("multimask_output", False)
        self._last_iou = float((ious.max(dim=-1).values if multimask else ious[:, 0]).float()[0])
        return outputs

    def _use_mask_as_output(self, *args, **kwargs):
        self._last_iou = 1.0  # a mask prompt is taken as it is
        return super()._use_mask_as_output(*args, **kwargs)

    def _run_single_frame_inference(self, *args, **kwargs):
        compact, pred_masks = super()._run_single_frame_inference(*args, **kwargs)
        compact["iou"] = self._last_iou
        return compact, pred_masks

    def new_state(self, frames, video_height: int, video_width: int, cache: FeatureCache) -> dict:
        """What `init_state` builds, for in-memory frames and a shared feature cache."""
        device = self.device
        return {
            "images": frames, "num_frames": len(frames), "offload_video_to_cpu": False,
            "offload_state_to_cpu": False, "video_height": video_height, "video_width": video_width,
            "device": device, "storage_device": device, "point_inputs_per_obj": {}, "mask_inputs_per_obj": {},
            "cached_features": {}, "constants": {}, "obj_id_to_idx": collections.OrderedDict(),
            "obj_idx_to_id": collections.OrderedDict(), "obj_ids": [], "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {}, "frames_tracked_per_obj": {}, "feature_cache": cache,
        }


def reuse_position_embedding(trunk: torch.nn.Module) -> None:
    """Hiera interpolates its position embedding (bicubic, to the feature size) on every frame, ~2 % of the image
    encoder; the result depends only on the weights and the size, so inference computes it once and reuses it
    (the same tensor bit for bit). Weights loaded later bump the parameters' versions and so recompute it."""
    compute = trunk._get_pos_embed
    cache: dict = {}

    def cached(hw):
        if not torch.is_inference_mode_enabled():
            return compute(hw)
        device = trunk.pos_embed.device.type
        key = (tuple(hw), trunk.pos_embed._version, trunk.pos_embed_window._version,
               torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        if key not in cache:
            cache.clear()
            cache[key] = compute(hw)
        return cache[key]

    trunk._get_pos_embed = cached


def frame_output(state: dict, frame_idx: int) -> dict | None:
    """The latest output of the state's object on a frame (temporary outputs first, as SAM-2 looks them up)."""
    for d in (state["temp_output_dict_per_obj"].get(0, {}), state["output_dict_per_obj"].get(0, {})):
        for key in ("cond_frame_outputs", "non_cond_frame_outputs"):
            out = d.get(key, {}).get(frame_idx)
            if out is not None:
                return out
    return None


class Sam2VolumeSession(VolumeSession):
    """A volume segmented by SAM-2: per object one forward and one backward tracking state (see `base`)."""

    def __init__(self, model: Sam2Model, volume: np.ndarray, spacing=(1.0, 1.0, 1.0), axis: int = 0,
                 preprocessing: Preprocessing | None = None, cache_budget_bytes: int = protocol.DEFAULT_CACHE_BUDGET_BYTES,
                 lock: threading.Lock | None = None):
        super().__init__(volume, spacing, axis, preprocessing)
        self.model = model
        self.lock = lock or threading.RLock()  # the accelerator's lock, shared by all sessions of one server
        self.cache = FeatureCache(cache_budget_bytes)
        self._states: dict[int, dict[str, dict]] = {}
        self._tracking: dict[int, int] = {}  # obj_id -> bytes its tracking states hold, measured
        self._tracking_total = 0  # their sum, one int the server may read from another thread
        self._make_frames()

    def _make_frames(self) -> None:
        self.frames = SliceFrames(self.volume, self.axis, self.preprocessing, self.model.image_size)
        self._square = square_size(self.slice_shape, self.preprocessing.resize)

    def _preprocessing_changed(self) -> None:
        self.cache.clear()
        self._make_frames()

    def _state(self, obj_id: int, side: str) -> dict:
        states = self._states.setdefault(obj_id, {})
        if side not in states:
            states[side] = self.model.predictor.new_state(self.frames, *self._square, self.cache)
        return states[side]

    def _forget_object(self, obj_id: int) -> None:
        self._states.pop(obj_id, None)
        self._measure_tracking(obj_id)
        self.cache.pin_only(self._prompted_not_encoded())

    def _prompted_not_encoded(self) -> set[int]:
        """Slices prompted since their state last propagated: SAM-2 encodes their memory when it next does."""
        return {k for states in self._states.values() for state in states.values()
                for outputs in state["temp_output_dict_per_obj"].get(0, {}).values() for k in outputs}

    def _begin_propagation(self, passes) -> None:
        # SAM-2 encodes the memory of newly prompted slices when a propagation starts: do it for every state now,
        # while those slices' features are pinned, instead of as each pass reaches its first slice.
        with self.lock, torch.inference_mode(), self.model.autocast():
            for p in passes:
                self.model.predictor.propagate_in_video_preflight(self._state(p.obj_id, p.direction))
            self.cache.pin_only(self._prompted_not_encoded())
        for obj_id in {p.obj_id for p in passes}:
            self._measure_tracking(obj_id)

    def working_bytes(self) -> int:
        return super().working_bytes() + self.cache.nbytes + self._tracking_total

    # ---- the tracking states' memory, for the server's budget ----------------------------------------------------
    def tracking_bytes(self) -> int:
        """What the tracking states hold (SAM-2's memory bank, outputs, prompt inputs), measured from their tensors
        after each prompt and pass (a view of another tensor's storage counts once); the cache is counted apart."""
        return self._tracking_total

    def _measure_tracking(self, obj_id: int) -> None:
        states = self._states.get(obj_id)
        if states is None:
            self._tracking.pop(obj_id, None)
        else:
            self._tracking[obj_id] = _tensor_bytes(
                [v for state in states.values() for key, v in state.items() if key not in _NOT_STATE])
        self._tracking_total = sum(self._tracking.values())

    def _slice_state_bytes(self) -> int:
        """At most what one more tracked slice adds to a state: memory features (stored as bfloat16 by SAM-2),
        low-resolution mask logits, object pointer and score (float32)."""
        p = self.model.predictor
        side = p.sam_image_embedding_size
        return p.mem_dim * side * side * 2 + (p.image_size // 4) ** 2 * 4 + p.hidden_dim * 4 + 4

    def propagation_growth_bytes(self, passes) -> int:
        """A bound, before a propagation, on what its passes add to the tracking states: a slice state per slice a
        state has not tracked yet, and SAM-2's one memory position encoding per state that lacks it."""
        p = self.model.predictor
        per_slice = self._slice_state_bytes()
        n = 0
        for ps in passes:
            state = self._states.get(ps.obj_id, {}).get(ps.direction)
            held = set()
            if state is not None:
                for outputs in state["output_dict_per_obj"].get(0, {}).values():
                    held.update(outputs)
            n += per_slice * sum(k not in held for k in ps.slices())
            if state is None or "maskmem_pos_enc" not in state["constants"]:
                n += p.mem_dim * p.sam_image_embedding_size ** 2 * 4
        return n

    def prompt_growth_bytes(self, mask: bool = False) -> int:
        """A bound on what one prompt adds: a slice state on each side, and a mask prompt's model-sized input."""
        size = self.model.predictor.image_size
        return 2 * (self._slice_state_bytes() + (size * size * 4 if mask else 0))

    def close(self) -> None:
        super().close()
        self.cache.clear()  # the features are the bulk of a session's memory: free them now, not at collection

    def _result(self, obj_id: int, k: int, video_res_logits: torch.Tensor, out: dict) -> SliceResult:
        h, w = self.slice_shape
        logits = video_res_logits[0, 0, :h, :w].float().cpu().numpy()
        return SliceResult(obj_id, k, logits > 0, float(out["object_score_logits"].float().reshape(-1)[0]),
                           float(out.get("iou", 1.0)), logits=logits)

    def _apply_prompt(self, obj_id, slice_index, prompt: SlicePrompt, merged, sides, replace) -> SliceResult:
        predictor = self.model.predictor
        result = None
        with self.lock, torch.inference_mode(), self.model.autocast():
            for side in sides:
                state = self._state(obj_id, side)
                if prompt.mask is not None:
                    mask = prompt.mask
                    if self._square != self.slice_shape:
                        mask = np.zeros(self._square, bool)
                        mask[: self.slice_shape[0], : self.slice_shape[1]] = prompt.mask
                    _, _, logits = predictor.add_new_mask(state, slice_index, _OBJ, torch.from_numpy(mask))
                else:
                    _, _, logits = predictor.add_new_points_or_box(
                        state, slice_index, _OBJ, points=prompt.points, labels=prompt.labels, box=prompt.box,
                        clear_old_points=replace)
                if result is None:
                    result = self._result(obj_id, slice_index, logits, frame_output(state, slice_index))
            self.cache.pin_only(self._prompted_not_encoded())
        self._measure_tracking(obj_id)
        return result

    def _track(self, obj_id: int, direction: str, first: int, last: int) -> Iterator[SliceResult]:
        predictor = self.model.predictor
        state = self._state(obj_id, direction)
        reverse = direction == BACKWARD
        if reverse and first == 0:
            # SAM-2 skips a reverse pass that starts on frame 0; the prompted slice is all there is to report.
            with self.lock, torch.inference_mode(), self.model.autocast():
                predictor.propagate_in_video_preflight(state)
                out = frame_output(state, 0)
                yield self._result(obj_id, 0, predictor._get_orig_video_res_output(state, out["pred_masks"])[1],
                                   out)
            return
        steps = predictor.propagate_in_video(state, start_frame_idx=first, max_frame_num_to_track=abs(last - first),
                                             reverse=reverse)
        try:
            while True:
                with self.lock, self.model.autocast():
                    item = next(steps, None)
                    if item is None:
                        return
                    k, _, logits = item
                    result = self._result(obj_id, k, logits, frame_output(state, k))
                yield result
        finally:
            steps.close()
            self._measure_tracking(obj_id)


class Sam2Engine:
    """Opens SAM-2 sessions on one loaded model; all sessions share one lock for the accelerator."""

    name = "sam2"

    def __init__(self, model: Sam2Model, cache_budget_bytes: int = protocol.DEFAULT_CACHE_BUDGET_BYTES):
        self.model = model
        self.cache_budget_bytes = cache_budget_bytes
        self.lock = threading.RLock()

    def describe(self) -> dict:
        return {"engine": self.name, **self.model.describe()}

    def open_session(self, volume: np.ndarray, spacing=(1.0, 1.0, 1.0), axis: int = 0,
                     preprocessing: Preprocessing | None = None) -> Sam2VolumeSession:
        return Sam2VolumeSession(self.model, volume, spacing, axis, preprocessing, self.cache_budget_bytes,
                                 self.lock)
