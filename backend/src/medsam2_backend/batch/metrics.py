"""Segmentation metrics per object, with monai's definitions and the voxel spacing (mm).

Empty masks, by convention (monai returns NaN or inf there): both empty -> Dice = NSD = 1, HD95 = 0; exactly one
empty -> Dice = NSD = 0, HD95 = None. NSD is the normalised surface Dice at a tolerance in mm (default 2 mm).
"""

from __future__ import annotations

import numpy as np

DEFAULT_NSD_TOLERANCE_MM = 2.0


def segmentation_metrics(prediction: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float],
                         nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> dict:
    """Dice, NSD and HD95 of two boolean masks of one shape; `spacing` in the arrays' own axis order (mm)."""
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    result = {"dice": None, "nsd": None, "hd95_mm": None, "nsd_tolerance_mm": float(nsd_tolerance_mm),
              "predicted_voxels": int(prediction.sum()), "truth_voxels": int(truth.sum())}
    if not prediction.any() and not truth.any():
        return {**result, "dice": 1.0, "nsd": 1.0, "hd95_mm": 0.0}
    if not prediction.any() or not truth.any():
        return {**result, "dice": 0.0, "nsd": 0.0, "hd95_mm": None}
    import warnings

    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    p = torch.from_numpy(prediction[None, None].astype(np.float32))
    t = torch.from_numpy(truth[None, None].astype(np.float32))
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # monai's own deprecated internal argument (1.5+)
        dice = compute_dice(p, t, include_background=True)
        nsd = compute_surface_dice(p, t, class_thresholds=[float(nsd_tolerance_mm)], include_background=True,
                                   spacing=spacing)
        hd95 = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)
    return {**result, "dice": float(dice), "nsd": float(nsd), "hd95_mm": float(hd95)}
