"""The engine interface: what every segmentation engine (SAM-2, the deterministic test engine) offers.

A `VolumeSession` holds one volume along one propagation axis. Everything that does not depend on the model lives
here, so every engine shares it: input validation, the record of prompts per object, the plan of a propagation
(which passes, from where to where), early stop, cancel, the per-object mask store and post-processing.

Propagation semantics (deliberate, documented in the README):
- Each object has an *anchor*: the slice of its first prompt. A later prompt on slice s belongs to the forward side
  if s > anchor, to the backward side if s < anchor, to both if s == anchor.
- The forward pass runs towards higher slices and the backward pass towards lower ones, each in its own tracking
  state. The reverse pass therefore never sees memories of the forward pass (MedSAM2 resets between the two passes;
  keeping two states gives the same result and keeps both memories for later corrections).
- A prompt on a side marks that side dirty from that slice. Re-propagation runs only the dirty part of each side:
  a correction on slice c > anchor re-tracks c..end, exactly as SAM-2's own correction workflow does (click on a
  tracked frame, propagate from it). Slices between the anchor and the correction keep their masks.
- Every prompted slice (anchor and corrections, points, box or mask) is a *conditioning* slice of its side's state:
  re-propagation reports the mask its prompt call returned, never recomputes it, and every later slice of that side
  attends to all conditioning slices (SAM-2 with `add_all_frames_to_correct_as_cond`; see the README for the cost).
- A propagate call runs only the sides dirty within its range; with none it re-runs the requested sides from the
  anchor. A pass that ended at the requested range's end (not the volume's, not an early stop) leaves its side
  dirty beyond it: those slices were never computed, so a later, wider propagation (or a correction past the
  range) fills them from there instead of leaving a gap.
- Several objects propagate together: all forward passes advance slice by slice, then all backward ones, so a
  slice's features are computed once for all objects (see `PropagationRun`). Post-processing never changes a
  prompted slice.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from typing import Iterable, Iterator, Sequence

import numpy as np

from .errors import EngineInputError
from .preprocess import Preprocessing, validate_volume
from .postprocess import fill_holes_3d, keep_largest_component

FORWARD = "forward"
BACKWARD = "backward"
DIRECTIONS = ("both", FORWARD, BACKWARD)


@dataclasses.dataclass
class SliceResult:
    """One object's mask on one slice (slice pixel coordinates, rows x columns)."""

    obj_id: int
    slice_index: int
    mask: np.ndarray  # bool (H, W)
    object_score: float  # the model's object-presence logit (> 0: object present)
    iou: float  # the model's predicted IoU of the mask, 0..1
    stage: str = "propagate"  # "prompt", "propagate", "postprocess" or "cleared"
    logits: np.ndarray | None = None  # float32 (H, W) mask logits, when the engine has them


@dataclasses.dataclass
class SlicePrompt:
    """The prompts of one object on one slice, as the user gave them (slice pixels, x = column, y = row)."""

    points: np.ndarray | None = None  # float32 (N, 2) as (x, y)
    labels: np.ndarray | None = None  # int32 (N,), 1 positive, 0 negative
    box: np.ndarray | None = None  # float32 (4,) as x0, y0, x1, y1
    mask: np.ndarray | None = None  # bool (H, W)


@dataclasses.dataclass(frozen=True)
class Pass:
    obj_id: int
    direction: str
    first: int  # slice where the pass starts
    last: int  # slice where it ends (inclusive); last < first for backward passes

    def slices(self) -> range:
        step = 1 if self.last >= self.first else -1
        return range(self.first, self.last + step, step)


@dataclasses.dataclass
class PropagationSummary:
    slices_done: int = 0
    cancelled: bool = False
    stopped_early: dict = dataclasses.field(default_factory=dict)  # (obj_id, direction) -> slice where it stopped
    least_certain: dict = dataclasses.field(default_factory=dict)  # obj_id -> [(slice, iou)] lowest IoU first


@dataclasses.dataclass
class _ObjectRecord:
    anchor: int
    prompts: dict = dataclasses.field(default_factory=dict)  # slice -> SlicePrompt
    dirty: dict = dataclasses.field(default_factory=dict)  # direction -> slice from which that side is stale
    ious: dict = dataclasses.field(default_factory=dict)  # slice -> predicted IoU of the latest mask


def _side_of(anchor: int, s: int) -> tuple[str, ...]:
    if s > anchor:
        return (FORWARD,)
    if s < anchor:
        return (BACKWARD,)
    return (FORWARD, BACKWARD)


class PropagationRun:
    """An iterable propagation: `planned` is known before the first slice, `summary` is filled as it runs.

    Stops between slices when `cancel()` is called (from any thread) or the consumer stops iterating.
    """

    def __init__(self, session: "VolumeSession", passes: list[Pass], stop_after_empty: int | None,
                 postprocess: Sequence[str]):
        self._session = session
        self.passes = passes
        # A slice prompted on both sides starts both passes; it is reported once.
        self.planned = len({(p.obj_id, k) for p in passes for k in p.slices()})
        self._stop_after_empty = stop_after_empty
        self._postprocess = tuple(postprocess)
        self._cancel = threading.Event()
        self.summary = PropagationSummary()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def done(self) -> int:
        """Slices tracked so far (of `planned`); post-processed slices rewrite tracked ones and do not count."""
        return self.summary.slices_done

    def __iter__(self) -> Iterator[SliceResult]:
        s = self._session
        self._reported: set = set()
        self._done_objects: list = []
        lanes = [_Lane(p) for p in self.passes]
        forward = [lane for lane in lanes if lane.step > 0]
        backward = [lane for lane in lanes if lane.step < 0]
        # All objects advance together, slice by slice, so each slice is encoded once for all of them. When a
        # backward pass starts above a forward one (objects anchored on different slices), the forward sweep
        # stops there, the backward sweep runs, then the forward sweep goes on: the slices both sweeps track are
        # then the most recently encoded ones, which a cache smaller than the volume still holds.
        split = max((lane.p.first for lane in backward), default=None)
        if forward and backward and split > min(lane.p.first for lane in forward):
            schedule = [(forward, split), (backward, None), (forward, None)]
        else:
            schedule = [(forward, None), (backward, None)]
        try:
            if not self._cancel.is_set():
                s._begin_propagation(self.passes)
            for group, until in schedule:
                if self._cancel.is_set():
                    break
                yield from self._sweep(group, until)
        finally:
            for lane in lanes:
                lane.close()
        if self._cancel.is_set():
            self.summary.cancelled = True  # unfinished sides stay dirty: the next propagate redoes them
            return
        for obj_id in self._done_objects:
            yield from self._postprocess_object(obj_id)
            ranked = sorted(s._objects[obj_id].ious.items(), key=lambda kv: kv[1])[:5]
            self.summary.least_certain[obj_id] = [(int(k), float(v)) for k, v in ranked]

    def _sweep(self, lanes: list["_Lane"], until: int | None) -> Iterator[SliceResult]:
        """Advance the lanes of one direction in slice order (up to `until`, inclusive), all lanes on a slice
        before the next slice."""
        while not self._cancel.is_set():
            live = [lane for lane in lanes if not lane.finished
                    and (until is None or (lane.next - until) * lane.step <= 0)]
            if not live:
                return
            k = min(lane.next * lane.step for lane in live) * live[0].step
            for lane in live:
                if lane.next == k:
                    yield from self._advance(lane)
                    if self._cancel.is_set():
                        return  # before the next slice is computed

    def _advance(self, lane: "_Lane") -> Iterator[SliceResult]:
        """One slice of one pass."""
        s, p = self._session, lane.p
        if lane.steps is None:
            lane.steps = s._track(p.obj_id, p.direction, p.first, p.last)
        result = next(lane.steps, None)
        if result is None:
            return self._finish(lane)
        lane.next = result.slice_index + lane.step
        if (p.obj_id, result.slice_index) not in self._reported:  # a slice prompted on both sides: once
            self._reported.add((p.obj_id, result.slice_index))
            s._store(result)
            self.summary.slices_done += 1
            yield result
            lane.empties = 0 if result.mask.any() else lane.empties + 1
            if (self._stop_after_empty and lane.empties >= self._stop_after_empty
                    and result.slice_index != p.last and not self._cancel.is_set()):
                self.summary.stopped_early[(p.obj_id, p.direction)] = result.slice_index
                yield from self._clear_beyond(p, result.slice_index)
                return self._finish(lane, stopped_early=True)
        if (lane.next - p.last) * lane.step > 0:
            self._finish(lane)

    def _finish(self, lane: "_Lane", stopped_early: bool = False) -> None:
        lane.close()
        p, s = lane.p, self._session
        volume_end = s.num_slices - 1 if p.direction == FORWARD else 0
        if stopped_early or p.last == volume_end:
            s._objects[p.obj_id].dirty.pop(p.direction, None)
        else:  # the range ended the pass: the slices beyond were never computed
            s._objects[p.obj_id].dirty[p.direction] = p.last + lane.step
        if lane.p.obj_id not in self._done_objects:
            self._done_objects.append(lane.p.obj_id)

    def _clear_beyond(self, p: Pass, stopped_at: int) -> Iterator[SliceResult]:
        """Slices past an early stop lose what an earlier run left there: the result must not mix two runs."""
        s = self._session
        for k in p.slices()[p.slices().index(stopped_at) + 1:]:
            if k in s._objects[p.obj_id].prompts:
                continue
            result = SliceResult(p.obj_id, k, np.zeros(s.slice_shape, bool), float("-inf"), 0.0, stage="cleared")
            s._store(result)
            yield result

    def _postprocess_object(self, obj_id: int) -> Iterator[SliceResult]:
        if not self._postprocess:
            return
        s = self._session
        before = s._masks[obj_id]
        after = before
        if "largest_component" in self._postprocess:
            after = keep_largest_component(after)
        if "fill_holes" in self._postprocess:
            after = fill_holes_3d(after)
        changed = (before != after).reshape(len(before), -1).any(axis=1)
        # A prompted or corrected slice shows what the user asked for: clean-up must not undo a correction.
        changed[list(s._objects[obj_id].prompts)] = False
        changed = np.flatnonzero(changed)
        for k in changed:
            s._masks[obj_id][k] = after[k]
            yield SliceResult(obj_id, int(k), after[k].copy(), float("nan"), float("nan"), stage="postprocess")


class _Lane:
    """One pass while it runs: its slice iterator (started at its first slice, not before) and where it is."""

    def __init__(self, p: Pass):
        self.p = p
        self.step = 1 if p.direction == FORWARD else -1
        self.next = p.first
        self.steps: Iterator[SliceResult] | None = None
        self.empties = 0
        self.finished = False

    def close(self) -> None:
        self.finished = True
        if self.steps is not None:
            self.steps.close()


POSTPROCESS_STEPS = ("largest_component", "fill_holes")


class VolumeSession(abc.ABC):
    """One volume, one propagation axis, any number of objects. Engines implement the four abstract methods.

    `volume` is never modified; slices are `np.take(volume, k, axis)`, so slice rows/columns are the two remaining
    array axes in order, and prompt coordinates are (x = column, y = row) in those slice pixels.
    """

    def __init__(self, volume: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), axis: int = 0,
                 preprocessing: Preprocessing | dict | None = None):
        validate_volume(volume)
        if axis not in (0, 1, 2):
            raise EngineInputError(f"The propagation axis must be 0, 1 or 2, not {axis!r}.")
        spacing = tuple(float(x) for x in spacing)
        if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise EngineInputError(f"The spacing must be three positive numbers, got {spacing!r}.")
        self.volume = volume
        self.spacing = spacing
        self.axis = axis
        self.num_slices = volume.shape[axis]
        self.slice_shape = tuple(n for i, n in enumerate(volume.shape) if i != axis)
        self.preprocessing = Preprocessing.from_options(preprocessing)
        self._objects: dict[int, _ObjectRecord] = {}
        self._masks: dict[int, np.ndarray] = {}  # obj_id -> bool (num_slices, H, W)

    # ---- what engines implement -------------------------------------------------------------------------------
    @abc.abstractmethod
    def _apply_prompt(self, obj_id: int, slice_index: int, prompt: SlicePrompt, merged: SlicePrompt,
                      sides: tuple[str, ...], replace: bool) -> SliceResult:
        """Feed one slice's new prompt to the object's tracking state(s) and return that slice's mask.

        `prompt` is what this call adds, `merged` all the slice's prompts after it."""

    @abc.abstractmethod
    def _track(self, obj_id: int, direction: str, first: int, last: int) -> Iterator[SliceResult]:
        """Track one object from `first` to `last` (inclusive), yielding each slice as soon as it is computed."""

    @abc.abstractmethod
    def _forget_object(self, obj_id: int) -> None:
        """Drop an object's tracking state(s)."""

    def _preprocessing_changed(self) -> None:
        """Hook: drop whatever depended on the old preprocessing (features, tracking states)."""

    def _begin_propagation(self, passes: list[Pass]) -> None:
        """Hook: prepare the tracking states of all passes of a propagation before its first slice."""

    # ---- user actions -----------------------------------------------------------------------------------------
    @property
    def object_ids(self) -> list[int]:
        return list(self._objects)

    def add_prompt(self, obj_id: int, slice_index: int, *, points=None, labels=None, box=None, mask=None,
                   replace: bool = False) -> SliceResult:
        """Add points (and/or a box, or a mask) for one object on one slice; returns that slice's mask at once.

        Points are added to what the slice already has unless `replace`; a box or a mask replaces the slice's
        prompts (SAM-2 takes a box only as the first prompt of a slice).
        """
        obj_id = self._check_obj_id(obj_id)
        slice_index = self._check_slice(slice_index)
        prompt = self._check_prompt(points, labels, box, mask)
        rec = self._objects.get(obj_id)
        if rec is None:
            rec = self._objects[obj_id] = _ObjectRecord(anchor=slice_index)
            self._masks[obj_id] = np.zeros((self.num_slices,) + self.slice_shape, bool)
        replace = replace or prompt.box is not None or prompt.mask is not None
        old = rec.prompts.get(slice_index)
        if old is not None and not replace and old.mask is None:
            merged = SlicePrompt(
                points=_concat(old.points, prompt.points, np.float32),
                labels=_concat(old.labels, prompt.labels, np.int32),
                box=old.box)
        else:
            merged = prompt
        sides = _side_of(rec.anchor, slice_index)
        result = self._apply_prompt(obj_id, slice_index, prompt, merged, sides, replace)
        rec.prompts[slice_index] = merged
        for side in sides:
            current = rec.dirty.get(side)
            if side == FORWARD:
                rec.dirty[side] = slice_index if current is None else min(current, slice_index)
            else:
                rec.dirty[side] = slice_index if current is None else max(current, slice_index)
        result.stage = "prompt"
        self._store(result)
        return result

    def propagate(self, obj_ids: Iterable[int] | None = None, direction: str = "both", start: int | None = None,
                  stop: int | None = None, stop_after_empty: int | None = None,
                  postprocess: Sequence[str] = ()) -> PropagationRun:
        """Plan a propagation of the given objects (default: all) within slices start..stop (inclusive)."""
        if direction not in DIRECTIONS:
            raise EngineInputError(f"Unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}.")
        if not self._objects:
            raise EngineInputError("Nothing to propagate: place a point, box or mask on a slice first.")
        ids = self.object_ids if obj_ids is None else [self._check_obj_id(o) for o in obj_ids]
        for o in ids:
            if o not in self._objects:
                raise EngineInputError(f"Object {o} has no prompt yet; place a prompt for it first.")
        lo = 0 if start is None else self._check_slice(start, "start")
        hi = self.num_slices - 1 if stop is None else self._check_slice(stop, "stop")
        if lo > hi:
            raise EngineInputError(f"The slice range is empty: start {lo} is after stop {hi}.")
        if stop_after_empty is not None and (int(stop_after_empty) != stop_after_empty or stop_after_empty < 1):
            raise EngineInputError("stop_after_empty must be a whole number of slices, at least 1.")
        for step in postprocess:
            if step not in POSTPROCESS_STEPS:
                raise EngineInputError(f"Unknown post-processing {step!r}; use {', '.join(POSTPROCESS_STEPS)}.")
        passes = []
        for o in ids:
            rec = self._objects[o]
            sides = [d for d in (FORWARD, BACKWARD) if direction in ("both", d)]
            stale = {d: rec.dirty[d] for d in sides  # stale from a slice within the requested range
                     if d in rec.dirty and (rec.dirty[d] <= hi if d == FORWARD else rec.dirty[d] >= lo)}
            if stale:
                sides = list(stale)  # only what prompts (or an earlier, narrower range) left stale
            for side in sides:
                first = stale.get(side, rec.anchor)
                if side == FORWARD:
                    first, last = max(first, lo), hi
                    if first <= last:
                        passes.append(Pass(o, side, first, last))
                else:
                    first, last = min(first, hi), lo
                    if first >= last:
                        passes.append(Pass(o, side, first, last))
        return PropagationRun(self, passes, stop_after_empty, postprocess)

    def set_preprocessing(self, preprocessing) -> None:
        """Change the intensity mapping (a `Preprocessing`, its dict form, or None for the default); prompts are
        kept and replayed, every side must be propagated again."""
        preprocessing = Preprocessing.from_options(preprocessing)
        if preprocessing == self.preprocessing:
            return
        self.preprocessing = preprocessing
        self._preprocessing_changed()
        for obj_id, rec in self._objects.items():
            self._forget_object(obj_id)
            prompts, rec.prompts, rec.dirty = rec.prompts, {}, {}
            for k in sorted(prompts, key=lambda k: (k != rec.anchor, k)):
                p = prompts[k]
                self.add_prompt(obj_id, k, points=p.points, labels=p.labels, box=p.box, mask=p.mask, replace=True)

    def reset_object(self, obj_id: int) -> None:
        """Forget an object's prompts, tracking state and masks."""
        obj_id = self._check_obj_id(obj_id)
        if obj_id in self._objects:
            self._forget_object(obj_id)
            del self._objects[obj_id]
            del self._masks[obj_id]

    def object_mask(self, obj_id: int) -> np.ndarray:
        """The object's current mask over the whole volume, in the volume's own array order (bool)."""
        obj_id = self._check_obj_id(obj_id)
        if obj_id not in self._masks:
            raise EngineInputError(f"Object {obj_id} has no prompt yet.")
        return np.moveaxis(self._masks[obj_id], 0, self.axis)

    def working_bytes(self) -> int:
        """Memory this session holds beyond the volume it was given (the server budgets sessions by it)."""
        return sum(m.nbytes for m in self._masks.values())

    def prompt_growth_bytes(self, mask: bool = False) -> int:
        """A bound on what one prompt adds beyond a new object's masks (an engine's tracking states); 0 here."""
        return 0

    def propagation_growth_bytes(self, passes: Sequence[Pass]) -> int:
        """A bound, before a propagation runs `passes`, on what it adds to `working_bytes`; 0 here (the masks of
        every object are allocated when it is created)."""
        return 0

    def prompts(self, obj_id: int) -> dict[int, SlicePrompt]:
        return dict(self._objects[self._check_obj_id(obj_id)].prompts)

    def close(self) -> None:
        for obj_id in list(self._objects):
            self.reset_object(obj_id)

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _store(self, result: SliceResult) -> None:
        self._masks[result.obj_id][result.slice_index] = result.mask
        if result.stage in ("prompt", "propagate"):
            self._objects[result.obj_id].ious[result.slice_index] = result.iou

    def slice_image(self, slice_index: int) -> np.ndarray:
        """The raw slice (a view, never a copy of the volume)."""
        return np.take(self.volume, self._check_slice(slice_index), axis=self.axis)

    @staticmethod
    def _check_obj_id(obj_id) -> int:
        if isinstance(obj_id, (bool, np.bool_)) or not isinstance(obj_id, (int, np.integer)) or not (
                0 <= obj_id < 2**31):
            raise EngineInputError(f"An object id must be a whole number from 0 to 2^31-1, not {obj_id!r}.")
        return int(obj_id)

    def _check_slice(self, k, what: str = "slice index") -> int:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            raise EngineInputError(f"The {what} must be a whole number, not {k!r}.")
        if not 0 <= k < self.num_slices:
            raise EngineInputError(f"The {what} {k} is outside the volume (0..{self.num_slices - 1}).")
        return int(k)

    def _check_prompt(self, points, labels, box, mask) -> SlicePrompt:
        h, w = self.slice_shape
        if points is None and box is None and mask is None:
            raise EngineInputError("A prompt needs points, a box or a mask.")
        if mask is not None and (points is not None or box is not None):
            raise EngineInputError("A mask prompt cannot be combined with points or a box on the same call.")
        out = SlicePrompt()
        if (points is None) != (labels is None):
            raise EngineInputError("Points and labels go together: one label (1 positive, 0 negative) per point.")
        if points is not None:
            pts = _finite_array(points, np.float32, "points")
            if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
                raise EngineInputError(f"Points must be a list of (x, y) pairs, got shape {pts.shape}.")
            lab = np.asarray(labels)
            if lab.shape != (len(pts),) or not np.isin(lab, (0, 1)).all():
                raise EngineInputError("Give one label per point: 1 for a positive point, 0 for a negative one.")
            bad = (pts[:, 0] < 0) | (pts[:, 0] > w - 1) | (pts[:, 1] < 0) | (pts[:, 1] > h - 1)
            if bad.any():
                x, y = pts[np.argmax(bad)]
                raise EngineInputError(f"Point ({x:g}, {y:g}) is outside the slice (x 0..{w - 1}, y 0..{h - 1}).")
            out.points, out.labels = pts, lab.astype(np.int32)
        if box is not None:
            b = _finite_array(box, np.float32, "box").reshape(-1)
            if b.shape != (4,):
                raise EngineInputError("A box is four numbers: x0, y0, x1, y1.")
            x0, y0, x1, y1 = b
            if x1 <= x0 or y1 <= y0:
                raise EngineInputError(f"The box corners are reversed or empty (x0={x0:g}, x1={x1:g}, y0={y0:g}, "
                                       f"y1={y1:g}); x1 must exceed x0 and y1 must exceed y0.")
            if x0 < 0 or y0 < 0 or x1 > w - 1 or y1 > h - 1:
                raise EngineInputError(f"The box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) reaches outside the slice "
                                       f"(x 0..{w - 1}, y 0..{h - 1}).")
            out.box = b
        if mask is not None:
            m = np.asarray(mask)
            if m.shape != (h, w):
                raise EngineInputError(f"A mask prompt must have the slice's shape {(h, w)}, got {m.shape}.")
            if m.dtype != bool and not np.isin(m, (0, 1)).all():
                raise EngineInputError("A mask prompt must be binary (0/1 or bool).")
            out.mask = m.astype(bool)
        return out


def _finite_array(x, dtype, what: str) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError):
        raise EngineInputError(f"The {what} must be numbers.") from None
    if not np.isfinite(a).all():
        raise EngineInputError(f"The {what} contain NaN or infinity.")
    return a


def _concat(a, b, dtype):
    parts = [x for x in (a, b) if x is not None]
    return np.concatenate(parts).astype(dtype) if parts else None

