"""Volumes for engine tests. A module of its own (not conftest) so `from synthetic_volumes import ...` works
whichever test folder pytest collects first (both folders have a conftest module)."""

import numpy as np


def blob_volume(shape=(6, 48, 64), seed=0, dtype=np.int16):
    """A CT-like volume (HU) with a bright ellipsoid drifting across slices, so masks and logits vary."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    cy, cx = shape[1] / 2 + (k - shape[0] / 2), shape[2] / 2
    inside = ((j - cy) / (shape[1] / 4)) ** 2 + ((i - cx) / (shape[2] / 5)) ** 2 <= 1.0
    vol = np.where(inside, 120.0, -80.0) + rng.normal(0, 15, shape)
    return vol.astype(dtype)
