"""Slice preprocessing exactly as MedSAM2 does it, one slice at a time.

Intensities -> 0..255 (a CT window, or the 0.5-99.5 percentiles of the non-zero voxels for MR and other images)
-> uint8 (truncated, as MedSAM2's `np.uint8` does) -> bicubic resize to the model's square input (PIL, as MedSAM2)
-> /255 -> ImageNet mean/std, three identical channels. Nothing is written to disk and no float copy of the whole
volume is made: `SliceFrames[k]` builds one model input on demand.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from medsam2_client import protocol

from .errors import EngineInputError

CT_PRESETS = protocol.CT_PRESETS  # (level, width) in Hounsfield units
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("stretch", "pad")
ALLOWED_DTYPES = tuple(np.dtype(name).type for name in protocol.VOLUME_DTYPES)
MAX_SLICE_SIDE = 4096


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How intensities become model input. Default: MR/other (percentiles), stretched to square like MedSAM2.

    Give `preset` (a CT window name) or `level` and `width` for CT; neither for percentile scaling.
    """

    preset: str | None = None
    level: float | None = None
    width: float | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    resize: str = "stretch"

    def __post_init__(self):
        # Values may arrive as JSON (lists, ints, strings): normalise them, or say what is wrong.
        try:
            lo, hi = (float(x) for x in self.percentiles)
            level, width = (None if v is None else float(v) for v in (self.level, self.width))
        except (TypeError, ValueError):
            raise EngineInputError("Preprocessing values must be numbers: a level and a width, or two "
                                   "percentiles.") from None
        object.__setattr__(self, "percentiles", (lo, hi))
        object.__setattr__(self, "level", level)
        object.__setattr__(self, "width", width)
        if self.preset is not None and self.preset not in CT_PRESETS:
            raise EngineInputError(
                f"Unknown CT window preset {self.preset!r}; use one of {', '.join(CT_PRESETS)}.")
        if self.preset is not None and (self.level is not None or self.width is not None):
            raise EngineInputError("Give either a CT window preset or a level and width, not both.")
        if (self.level is None) != (self.width is None):
            raise EngineInputError("A CT window needs both a level and a width.")
        if self.level is not None and not np.isfinite(self.level):
            raise EngineInputError(f"The window level must be a finite number (got {self.level!r}).")
        if self.width is not None and not (np.isfinite(self.width) and self.width > 0):
            raise EngineInputError(f"The window width must be a positive number (got {self.width!r}).")
        if not 0 <= lo < hi <= 100:
            raise EngineInputError(f"Percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles!r}.")
        if self.resize not in RESIZE_MODES:
            raise EngineInputError(f"Unknown resize mode {self.resize!r}; use one of {', '.join(RESIZE_MODES)}.")

    @classmethod
    def from_options(cls, options) -> "Preprocessing":
        """Settings from what callers hold: None (the default), a `Preprocessing`, or its JSON form (a dict)."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(options, dict) or set(options) - set(names):
            raise EngineInputError(f"Preprocessing is an object with the fields {', '.join(names)} only.")
        return cls(**options)

    @property
    def window(self) -> tuple[float, float] | None:
        """The CT window as (low, high), or None for percentile scaling."""
        if self.preset is not None:
            level, width = CT_PRESETS[self.preset]
        elif self.level is not None:
            level, width = self.level, self.width
        else:
            return None
        return level - width / 2.0, level + width / 2.0


def validate_shape(shape) -> None:
    """The engine's size limits, checkable on a declared shape before any voxel is received."""
    if max(shape) > 4 * MAX_SLICE_SIDE or sorted(shape)[1] > MAX_SLICE_SIDE:
        raise EngineInputError(f"The volume {tuple(shape)} is too large for interactive segmentation (slices up "
                               f"to {MAX_SLICE_SIDE} pixels a side, up to {4 * MAX_SLICE_SIDE} slices).")


def validate_volume(volume) -> None:
    """Reject what cannot be segmented, with a sentence a user can act on."""
    if not isinstance(volume, np.ndarray):
        raise EngineInputError(f"The volume must be a numpy array, not {type(volume).__name__}.")
    if volume.ndim != 3:
        raise EngineInputError(f"The volume must be 3D; this array has {volume.ndim} dimension(s) "
                                 f"{volume.shape}.")
    if volume.size == 0:
        raise EngineInputError(f"The volume is empty (shape {volume.shape}).")
    if volume.dtype.type not in ALLOWED_DTYPES:
        raise EngineInputError(f"Voxel type {volume.dtype} is not supported; use an integer or float type.")
    validate_shape(volume.shape)
    if volume.dtype.kind == "f" and not all(np.isfinite(slab).all() for slab in _slabs(volume)):
        raise EngineInputError("The volume contains NaN or infinite voxels; fix or mask them first.")


def _slabs(volume: np.ndarray, voxels: int = 1 << 16):
    """The volume in views of ~10^5 voxels (or one slice) along its first axis: temporaries stay that small."""
    step = max(1, voxels // max(1, volume[0].size))
    for k in range(0, volume.shape[0], step):
        yield volume[k : k + step]


def intensity_range(volume: np.ndarray, pre: Preprocessing) -> tuple[float, float]:
    """The intensities mapped to 0 and 255: the CT window, or the percentiles of the non-zero voxels.

    Every session computes this (one per propagation axis), so nothing the size of the volume is copied: the
    percentiles equal `np.percentile` of the non-zero voxels bit for bit (see `_nonzero_percentiles`)."""
    window = pre.window
    if window is not None:
        return window
    return _nonzero_percentiles(volume, pre.percentiles)


def _nonzero_percentiles(volume: np.ndarray, percentiles) -> tuple[float, float]:
    """`np.percentile` (linear method) of the non-zero voxels with temporaries of a slab: the order statistics it
    interpolates between are located by a histogram of the top 16 bits of an order-preserving key, then read from
    the (few) voxels of their histogram bins."""
    shift = np.uint64(max(0, 8 * volume.dtype.itemsize - 16))

    def nonzero_and_bins():
        for slab in _slabs(volume):
            values = slab[slab != 0]
            key = _order_key(values)
            key >>= shift
            yield values, key.view(np.intp)  # < 2**16: the same numbers
            del values, key  # one slab's temporaries at a time

    counts = np.zeros(1 << min(16, 8 * volume.dtype.itemsize), np.int64)
    for _, bins in nonzero_and_bins():
        counts += np.bincount(bins, minlength=len(counts))
    n = int(counts.sum())
    if n == 0:
        return 0.0, 1.0
    cumulative = np.cumsum(counts)
    # numpy's linear method: the virtual index (n - 1) q between two order statistics, interpolated the way its
    # `_lerp` does (from below for weights under 0.5, from above otherwise, in the voxel type's arithmetic).
    virtual = (n - 1) * np.true_divide(np.asarray(percentiles, np.float64), 100)
    below = np.floor(virtual).astype(np.intp)
    ranks = np.concatenate([below, np.minimum(below + 1, n - 1)])
    bins = np.searchsorted(cumulative, ranks, side="right")
    wanted = np.unique(bins)
    is_wanted = np.zeros(len(counts), bool)
    is_wanted[wanted] = True
    gathered = np.sort(np.concatenate([values[is_wanted[b]] for values, b in nonzero_and_bins()]))
    # Sorted, the gathered voxels are the wanted bins one after the other.
    first_in_gathered = np.cumsum(counts[wanted]) - counts[wanted]
    index = first_in_gathered[np.searchsorted(wanted, bins)] + ranks - (cumulative[bins] - counts[bins])
    a, b = np.split(gathered[index], 2)
    weight = virtual - below
    step = b - a
    lo, hi = np.where(weight >= 0.5, b - step * (1 - weight), a + step * weight)
    return float(lo), float(hi)


def _order_key(values: np.ndarray) -> np.ndarray:
    """uint64 keys that order as `values` do (integers offset to start at 0; IEEE floats by their bits)."""
    kind, bits = values.dtype.kind, 8 * values.dtype.itemsize
    if kind == "u":
        return values.astype(np.uint64)
    if kind == "i":
        key = values.astype(np.int64)
        key -= np.iinfo(values.dtype).min
        return key.view(np.uint64)
    raw = values.view(np.uint32 if bits == 32 else np.uint64).astype(np.uint64)
    sign, ones = np.uint64(1 << (bits - 1)), np.uint64((1 << bits) - 1)
    return np.where(raw & sign, ~raw & ones, raw | sign)


def to_uint8(slice_2d: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip to [lo, hi] and scale to 0..255, truncating like MedSAM2 (a flat range maps to 0)."""
    x = np.clip(slice_2d.astype(np.float32), lo, hi)
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    return ((x - np.float32(lo)) * np.float32(255.0 / (hi - lo))).astype(np.uint8)


def square_size(shape: tuple[int, int], resize: str) -> tuple[int, int]:
    """The (height, width) that is resized to the model's square: the slice, or the slice padded to a square."""
    if resize == "pad":
        side = max(shape)
        return side, side
    return tuple(shape)


def to_model_input(grey: np.ndarray, image_size: int, resize: str) -> np.ndarray:
    """uint8 (H, W) -> float32 (3, S, S) normalised model input. `pad` adds zeros at the bottom and right so
    slice pixel coordinates stay valid; masks are cropped back to (H, W)."""
    if resize == "pad":
        side = max(grey.shape)
        padded = np.zeros((side, side), np.uint8)
        padded[: grey.shape[0], : grey.shape[1]] = grey
        grey = padded
    img = Image.fromarray(np.ascontiguousarray(grey)).resize((image_size, image_size), Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    return (x[None] - mean) / std


class SliceFrames:
    """A lazy sequence of model inputs along one axis, for SAM-2's video predictor (`len` and `[k]` only)."""

    def __init__(self, volume: np.ndarray, axis: int, pre: Preprocessing, image_size: int):
        self.volume, self.axis, self.pre, self.image_size = volume, axis, pre, image_size
        self.lo, self.hi = intensity_range(volume, pre)

    def __len__(self) -> int:
        return self.volume.shape[self.axis]

    def grey(self, k: int) -> np.ndarray:
        return to_uint8(np.take(self.volume, k, axis=self.axis), self.lo, self.hi)

    def __getitem__(self, k: int):
        import torch

        return torch.from_numpy(to_model_input(self.grey(k), self.image_size, self.pre.resize))
