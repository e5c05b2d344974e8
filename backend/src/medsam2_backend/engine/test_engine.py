"""A deterministic engine whose masks are known in advance, for geometry tests through every layer.

On a prompted slice: a box gives exactly the box's pixels, positive points give a disk of `radius` pixels around
each, negative points cut a disk of the same radius, a mask is taken as it is. Propagation from the last prompted
slice passed shrinks that mask by `shrink` pixels per slice (Euclidean erosion), so slice k's mask is computable by
hand. Predicted IoU falls by 0.01 per slice of distance, so the least certain slices are the farthest.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from scipy import ndimage

from .base import FORWARD, SlicePrompt, SliceResult, VolumeSession
from .preprocess import Preprocessing


def disk(shape: tuple[int, int], x: float, y: float, radius: float) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (cols - x) ** 2 + (rows - y) ** 2 <= radius**2


def prompt_mask(shape: tuple[int, int], prompt: SlicePrompt, radius: float) -> np.ndarray:
    if prompt.mask is not None:
        return prompt.mask.copy()
    m = np.zeros(shape, bool)
    if prompt.box is not None:
        x0, y0, x1, y1 = np.round(prompt.box).astype(int)
        m[y0 : y1 + 1, x0 : x1 + 1] = True
    if prompt.points is not None:
        for (x, y), label in zip(prompt.points, prompt.labels):
            if label == 1:
                m |= disk(shape, x, y, radius)
        for (x, y), label in zip(prompt.points, prompt.labels):
            if label == 0:
                m &= ~disk(shape, x, y, radius)
    return m


def shrink_mask(mask: np.ndarray, pixels: float) -> np.ndarray:
    """Pixels deeper than `pixels` inside the mask (distance to the nearest outside pixel, image border counts)."""
    if pixels <= 0:
        return mask.copy()
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return depth > pixels


class DiskVolumeSession(VolumeSession):
    def __init__(self, volume, spacing=(1.0, 1.0, 1.0), axis=0, preprocessing: Preprocessing | None = None,
                 radius: float = 10.0, shrink: float = 1.0):
        super().__init__(volume, spacing, axis, preprocessing)
        self.radius, self.shrink = radius, shrink

    def _apply_prompt(self, obj_id, slice_index, prompt, merged, sides, replace) -> SliceResult:
        mask = prompt_mask(self.slice_shape, merged, self.radius)
        return SliceResult(obj_id, slice_index, mask, 5.0 if mask.any() else -5.0, 1.0)

    def _track(self, obj_id, direction, first, last) -> Iterator[SliceResult]:
        step = 1 if direction == FORWARD else -1
        prompts = self.prompts(obj_id)
        for k in range(first, last + step, step):
            behind = [p for p in prompts if (k - p) * step >= 0]
            source = min(behind or prompts, key=lambda p: abs(k - p))
            d = abs(k - source)
            mask = shrink_mask(prompt_mask(self.slice_shape, prompts[source], self.radius), self.shrink * d)
            yield SliceResult(obj_id, k, mask, 5.0 if mask.any() else -5.0, 1.0 - 0.01 * d)

    def _forget_object(self, obj_id) -> None:
        pass


class DiskEngine:
    name = "disk-test-engine"

    def __init__(self, radius: float = 10.0, shrink: float = 1.0):
        self.radius, self.shrink = radius, shrink

    def describe(self) -> dict:
        return {"engine": self.name, "model": "deterministic test engine (disks, no model)",
                "checkpoint": "none", "checkpoint_sha256": None, "random_weights": False, "device": "cpu",
                "precision": "fp32", "image_size": None, "radius": self.radius, "shrink": self.shrink}

    def open_session(self, volume, spacing=(1.0, 1.0, 1.0), axis=0, preprocessing=None) -> DiskVolumeSession:
        return DiskVolumeSession(volume, spacing, axis, preprocessing, self.radius, self.shrink)
