"""The file side of the one geometry module: ITK (LPS) grids to IJK->RAS, the S-I axis, 3D boxes."""

import numpy as np
import pytest
import SimpleITK as sitk

from medsam2_client import geometry


def oblique_flipped_image():
    a = np.radians(25)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    direction = rot @ np.diag([1.0, -1.0, 1.0])  # flipped J: determinant -1
    img = sitk.Image(10, 12, 8, sitk.sitkInt16)
    img.SetDirection(direction.ravel().tolist())
    img.SetSpacing((0.7, 1.1, 3.0))
    img.SetOrigin((4.0, -9.0, 31.0))
    return img


def test_ijk_to_ras_matches_simpleitk_points():
    img = oblique_flipped_image()
    m = geometry.ijk_to_ras_from_image(img.GetDirection(), img.GetSpacing(), img.GetOrigin())
    for ijk in ([0, 0, 0], [9, 11, 7], [2.5, 3.0, 6.25]):
        lps = img.TransformContinuousIndexToPhysicalPoint(ijk)
        np.testing.assert_allclose(geometry.ijk_to_ras(ijk, m)[0], [-lps[0], -lps[1], lps[2]], atol=1e-9)
    np.testing.assert_allclose(geometry.lps_points_to_ras(geometry.lps_points_to_ras([[1, 2, 3]])), [[1, 2, 3]])
    np.testing.assert_allclose(geometry.LPS_TO_RAS @ geometry.ijk_to_lps_from_image(
        img.GetDirection(), img.GetSpacing(), img.GetOrigin()), m)


def test_superior_axis_follows_the_direction_matrix():
    assert geometry.superior_axis(np.diag([-1.0, -1.0, 2.0, 1.0])) == 0  # K is S-I: array axis 0
    sagittal = np.eye(4)
    sagittal[:3, :3] = [[0, 0, 1.0], [1, 0, 0], [0, 1, 0]]  # I runs A-P, J runs S-I, K runs R-L
    assert geometry.superior_axis(sagittal) == 1  # J: array axis 1
    assert geometry.axis_spacing(np.diag([0.5, 0.7, 2.5, 1.0]), 0) == pytest.approx(2.5)


def test_3d_box_gives_centre_slice_outline_and_limits():
    m = np.diag([1.0, 1.0, 2.0, 1.0])  # K spacing 2 mm
    shape = (20, 30, 40)  # K, J, I
    plan = geometry.box_prompt_from_corners([[5, 6, 8], [15, 20, 20]], m, 0, shape, margin_mm=3.0)
    assert plan.slice_index == 7 and (plan.first, plan.last) == (2, 12)  # slices 4..10, 2 slices (4 mm) margin
    np.testing.assert_allclose(plan.box, [5, 6, 15, 20])
    roi = [[x, y, z] for x in (5, 15) for y in (6, 20) for z in (8, 20)]  # all 8 corners of a Slicer ROI
    from_roi = geometry.box_prompt_from_corners(roi, m, 0, shape, margin_mm=3.0)
    assert (from_roi.slice_index, from_roi.first, from_roi.last) == (7, 2, 12)
    np.testing.assert_allclose(from_roi.box, plan.box)
    flat = geometry.box_prompt_from_corners([[5, 6, 8], [15, 20, 8]], m, 0, shape, margin_mm=3.0)
    assert flat.slice_index == 4 and (flat.first, flat.last) == (0, 19)  # a 2D box: no limits
    with pytest.raises(geometry.GeometryError, match="outside the image"):
        geometry.box_prompt_from_corners([[5, 6, 100], [15, 20, 120]], m, 0, shape, margin_mm=3.0)
    with pytest.raises(geometry.GeometryError, match="outside the image on its slice"):
        geometry.box_prompt_from_corners([[100, 6, 8], [150, 20, 20]], m, 0, shape, margin_mm=3.0)
