"""What the model knows of each segment after every MedSAM2 action, so undo, redo and the user's edits are agreed.

Undo and redo restore a segmentation's voxels *and its segments' tags* (`vtkSegmentationHistory` copies segment
metadata with every state). So after each action the controller files a `SegmentState` under a fresh token and
tags each segment it concerns with that token; before the next action, the tag the segment carries says which
state it is in now, whoever undid or redid (the Segment Editor, Ctrl+Z, the console). Setting the tag is also what
makes an action that changes no voxel one undo step of its own.

A `SegmentState` holds the engine calls that built the segment's object, its prompts and its propagations
(replayed in order, propagations included, when the engine must go back or forward to that state) and what
MedSAM2 last wrote into the segment (its voxels right after the write, masking and overwrite applied, on the
source volume's lattice). Slices that differ from that record were edited by the user since.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
import zlib

import numpy as np
import vtk

TAG = "MedSAM2.State"


@dataclasses.dataclass(frozen=True, eq=False)
class PromptCall:
    """One `add_prompt` call exactly as it was made (slice pixels), to replay it on a fresh object."""

    slice_index: int
    kwargs: dict  # points/labels, box or mask (and replace)
    source: str = "prompt"  # "prompt" (points/box), "segment" (voxels the user chose), "edit" (an edited slice)

    def apply(self, session, obj_id: int):
        return session.add_prompt(obj_id, self.slice_index, **self.kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class PropagateCall:
    """One propagation of the object as it ran, replayed without writing: SAM-2 computes a later click on a tracked
    slice from that slice's tracked mask and the side's memory, so a replay of the prompts alone would give such a
    correction another mask (engine2's `bench.py --cases replay`: thousands of pixels)."""

    options: dict  # direction, start, stop, stop_after_empty, postprocess
    results: int | None = None  # results read before it was cancelled; None: it ran to its end

    def apply(self, session, obj_id: int, watch=None):
        """`watch(run)` is told the run before it is read (so whoever replays can cancel it)."""
        run = session.propagate([obj_id], **self.options)
        if watch is not None:
            watch(run)
        if self.results == 0:
            run.cancel()
        for n, _result in enumerate(run, 1):
            if n == self.results:
                run.cancel()  # where the original stopped: the engine ends between two slices
        return None


@dataclasses.dataclass(frozen=True, eq=False)
class SegmentState:
    """A segment as MedSAM2 left it after one action; immutable, so identity says "the same state"."""

    volume_id: str
    axis: int | None  # None: no object (never prompted, or reset)
    calls: tuple  # PromptCall, in order
    prompts: tuple  # the controller's RasPrompt records, for listing
    shape_kji: tuple
    written: bytes  # zlib(packbits(mask)) of what MedSAM2 last wrote, bool K,J,I on the volume lattice
    fingerprint: str = ""  # the volume's voxels the calls were made on (a changed volume forgets its prompts)

    def written_mask(self) -> np.ndarray:
        return unpack(self.written, self.shape_kji)


def pack(mask_kji: np.ndarray) -> bytes:
    return zlib.compress(np.packbits(np.asarray(mask_kji, bool).reshape(-1)).tobytes(), 1)


def unpack(data: bytes, shape_kji) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(zlib.decompress(data), np.uint8), count=int(np.prod(shape_kji)))
    return bits.reshape(shape_kji).astype(bool)


def edited_slices(written_kji: np.ndarray, current_kji: np.ndarray, axis: int) -> list[int]:
    """Slices along `axis` whose voxels differ from what MedSAM2 last wrote there."""
    differs = np.moveaxis(written_kji != current_kji, axis, 0).reshape(written_kji.shape[axis], -1).any(axis=1)
    return [int(k) for k in np.flatnonzero(differs)]


def refreshed(written_kji: np.ndarray, current_kji: np.ndarray, slabs) -> np.ndarray:
    """The record after a write: the current voxels inside the written slabs (axis, first, last), the old outside."""
    out = written_kji.copy()
    for axis, first, last in slabs:
        index = [slice(None)] * 3
        index[axis] = slice(first, last + 1)
        out[tuple(index)] = current_kji[tuple(index)]
    return out


def read_token(segmentation_node, segment_id: str) -> str | None:
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    value = vtk.reference("")
    if segment is None or not segment.GetTag(TAG, value):
        return None
    return value.get() or None


def write_token(segmentation_node, segment_id: str, token: str) -> None:
    segmentation_node.GetSegmentation().GetSegment(segment_id).SetTag(TAG, token)


class StateBook:
    """Token -> state, with tokens unique across controllers and app sessions (tags are saved with the scene)."""

    def __init__(self):
        self._states: dict[str, SegmentState] = {}
        self._prefix = uuid.uuid4().hex[:12]
        self._counter = itertools.count(1)

    def file(self, state: SegmentState) -> str:
        token = f"{self._prefix}-{next(self._counter)}"
        self._states[token] = state
        return token

    def get(self, token: str | None) -> SegmentState | None:
        return None if token is None else self._states.get(token)

    def clear(self) -> None:
        self._states.clear()


def same_object(a: SegmentState | None, b: SegmentState | None) -> bool:
    """Whether the engine object built for one state is the object of the other (same axis, same calls)."""
    if a is None or b is None:
        return a is b or (a or b).axis is None
    return a.axis == b.axis and len(a.calls) == len(b.calls) and all(x is y for x, y in zip(a.calls, b.calls))
