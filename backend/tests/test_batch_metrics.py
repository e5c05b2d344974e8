"""Metrics against values computed by hand on small masks, with anisotropic spacing and the empty-mask conventions."""

import numpy as np
import pytest

from medsam2_backend.batch.metrics import segmentation_metrics


def cube(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_dice_is_overlap_over_mean_size():
    truth = cube((6, 10, 10), (1, 2, 2), (5, 6, 6))  # 4x4x4 = 64
    pred = cube((6, 10, 10), (1, 2, 3), (5, 6, 7))  # shifted one voxel along the last axis: 48 overlap
    m = segmentation_metrics(pred, truth, (2.0, 1.0, 1.0))
    assert m["dice"] == pytest.approx(2 * 48 / 128)
    assert (m["predicted_voxels"], m["truth_voxels"]) == (64, 64)


def test_hd95_and_nsd_follow_the_spacing():
    """A one-voxel shift along an axis of 3 mm: every surface distance is 0 or 3 mm."""
    truth = cube((8, 8, 8), (2, 2, 2), (6, 6, 6))
    pred = cube((8, 8, 8), (3, 2, 2), (7, 6, 6))  # shifted along axis 0
    near = segmentation_metrics(pred, truth, (3.0, 1.0, 1.0), nsd_tolerance_mm=2.0)
    assert near["hd95_mm"] == pytest.approx(3.0)
    # The two faces across the shift (16 + 16 border voxels of 56 + 56) are 3 mm away: beyond 2 mm, within 3 mm.
    edges = segmentation_metrics(pred, truth, (3.0, 1.0, 1.0), nsd_tolerance_mm=3.0)
    assert edges["nsd"] == pytest.approx(1.0)
    assert 0 < near["nsd"] < 1
    fine = segmentation_metrics(pred, truth, (1.0, 1.0, 1.0), nsd_tolerance_mm=2.0)
    assert fine["hd95_mm"] == pytest.approx(1.0) and fine["nsd"] == pytest.approx(1.0)


def test_nsd_counts_surface_voxels_within_tolerance():
    """2D-thin masks: truth a 1x1x4 line, prediction the same line plus one voxel 5 mm away."""
    truth = np.zeros((1, 1, 12), bool)
    truth[0, 0, 2:6] = True
    pred = truth.copy()
    pred[0, 0, 11] = True
    m = segmentation_metrics(pred, truth, (1.0, 1.0, 1.0), nsd_tolerance_mm=2.0)
    # Surfaces: truth 4 voxels all within 0 of pred; pred 5 voxels, the lone one 5 mm from truth -> (4 + 4) / 9.
    assert m["nsd"] == pytest.approx(8 / 9)
    assert m["dice"] == pytest.approx(8 / 9)


def test_empty_conventions():
    empty = np.zeros((3, 4, 4), bool)
    some = cube((3, 4, 4), (0, 0, 0), (2, 2, 2))
    both = segmentation_metrics(empty, empty, (1, 1, 1))
    assert (both["dice"], both["nsd"], both["hd95_mm"]) == (1.0, 1.0, 0.0)
    for pred, truth in ((empty, some), (some, empty)):
        one = segmentation_metrics(pred, truth, (1, 1, 1))
        assert (one["dice"], one["nsd"], one["hd95_mm"]) == (0.0, 0.0, None)
