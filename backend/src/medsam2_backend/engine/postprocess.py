"""3D mask clean-up after propagation (MedSAM2 keeps the largest 3D connected component)."""

import numpy as np
from scipy import ndimage


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a 3D bool mask (what MedSAM2's largest-CC step keeps)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def fill_holes_3d(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice (axis 0): a hole is what a user sees enclosed on the slice they look at."""
    out = np.empty_like(mask, dtype=bool)
    for k in range(mask.shape[0]):
        out[k] = ndimage.binary_fill_holes(mask[k])
    return out
