"""Volume -> K,J,I array + IJK->RAS (oblique, flipped, anisotropic, transformed); axis choice; RAS -> slice pixels."""

import numpy as np
import pytest
import slicer

from MedSAM2SlicerLib import geometry, scenarios


def test_array_is_kji_copy_and_matrix_is_the_nodes(mrml):
    volume = scenarios.add_volume(shape_kji=(5, 6, 7))
    array = geometry.volume_array_kji(volume)
    assert array.shape == (5, 6, 7)
    assert array[2, 3, 4] == (2 * 42 + 3 * 7 + 4) % 1000  # the ramp at K=2, J=3, I=4
    slicer.util.arrayFromVolume(volume)[2, 3, 4] = -1
    assert array[2, 3, 4] != -1  # a copy: the backend never aliases VTK memory
    np.testing.assert_allclose(geometry.ijk_to_world_ras(volume), scenarios.OBLIQUE_IJK_TO_RAS)
    assert geometry.spacing_kji(volume) == pytest.approx((2.5, 1.1, 0.8))


def test_parent_transform_is_included_and_round_trips(mrml):
    volume = scenarios.add_volume(shape_kji=(5, 6, 7))
    parent = np.array([[0, -1, 0, 10.0], [1, 0, 0, -4.0], [0, 0, 1, 2.0], [0, 0, 0, 1]])
    transform = mrml.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(geometry.vtk_matrix(parent))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    matrix = geometry.ijk_to_world_ras(volume)
    np.testing.assert_allclose(matrix, parent @ scenarios.OBLIQUE_IJK_TO_RAS)
    ijk = np.array([[1.0, 2.0, 3.0], [6.0, 0.0, 4.0]])
    np.testing.assert_allclose(geometry.ras_to_ijk(geometry.ijk_to_ras(ijk, matrix), matrix), ijk, atol=1e-9)
    # Under a transform, the volume's IJK -> the segmentation's local frame (no transform) is the world matrix.
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode")
    np.testing.assert_allclose(geometry.ijk_to_node_local(volume, segmentation), matrix)


def test_non_linear_parent_transform_is_refused(mrml):
    volume = scenarios.add_volume(shape_kji=(5, 6, 7))
    transform = mrml.AddNewNodeByClass("vtkMRMLGridTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(geometry.GeometryError, match="non-linear"):
        geometry.ijk_to_world_ras(volume)


@pytest.mark.parametrize("view, axis", [("axial", 0), ("coronal", 1), ("sagittal", 2)])
def test_axis_is_the_volume_axis_nearest_the_view_normal(view, axis):
    # Flipped (negative I and J) anisotropic volume rotated 30 degrees: still within 30 degrees of each view.
    choice = geometry.choose_propagation_axis(scenarios.OBLIQUE_IJK_TO_RAS, geometry.view_slice_to_ras(view))
    assert choice.axis == axis
    expected_angle = 0.0 if view == "axial" else 30.0
    assert choice.angle_degrees == pytest.approx(expected_angle, abs=1e-6)
    assert (choice.warning is not None) == (expected_angle > geometry.OBLIQUE_WARNING_DEGREES)


def test_axis_choice_on_an_axis_aligned_permuted_volume():
    # A sagittally acquired volume: I runs A->P, J runs S->I, K runs L->R (array axis 0 = K = R).
    ijk_to_ras = np.array([[0, 0, -1.0, 0], [-1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])
    sagittal = geometry.choose_propagation_axis(ijk_to_ras, geometry.view_slice_to_ras("sagittal"))
    axial = geometry.choose_propagation_axis(ijk_to_ras, geometry.view_slice_to_ras("axial"))
    assert (sagittal.axis, sagittal.warning) == (0, None)
    assert (axial.axis, axial.warning) == (1, None)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_ras_points_become_slice_index_and_xy_pixels(axis):
    shape = (40, 40, 50)  # every rolled point lies inside
    kji = np.array([[6.0, 10.0, 12.0], [6.0, 18.0, 30.0]])
    kji = np.roll(kji, axis, axis=1)  # the slice index sits on the propagation axis
    ras = geometry.ijk_to_ras(kji[:, ::-1], scenarios.OBLIQUE_IJK_TO_RAS)
    slice_index, xy = geometry.ras_to_slice_pixels(ras, scenarios.OBLIQUE_IJK_TO_RAS, axis, shape)
    rows, cols = [a for a in range(3) if a != axis]
    assert slice_index == 6
    np.testing.assert_allclose(xy, np.c_[kji[:, cols], kji[:, rows]], atol=1e-9)


def test_box_is_clipped_to_the_slice_and_outside_prompts_are_refused():
    shape = (4, 10, 12)
    identity = np.eye(4)
    plan = geometry.box_prompt_from_corners(np.array([[-5.0, 3, 2], [20.0, 30, 2]]), identity, 0, shape, 10.0)
    assert plan.slice_index == 2 and (plan.first, plan.last) == (0, 3)  # a 2D box: propagation is not limited
    np.testing.assert_allclose(plan.box, [0, 3, 11, 9])
    with pytest.raises(geometry.GeometryError, match="outside the volume"):
        geometry.ras_to_slice_pixels(np.array([[1.0, 1.0, 9.0]]), identity, 0, shape)


def test_a_click_on_an_edge_voxel_is_inside_and_one_beyond_is_refused():
    shape, identity = (4, 10, 12), np.eye(4)  # identity: RAS = IJK, slices along K
    _, xy = geometry.ras_to_slice_pixels(np.array([[11.4, -0.4, 1.0]]), identity, 0, shape)
    np.testing.assert_allclose(xy, [[11, 0]])  # the outer halves of the last column / first row
    _, xy = geometry.ras_to_slice_pixels(np.array([[5.25, 3.5, 1.0]]), identity, 0, shape)
    np.testing.assert_allclose(xy, [[5.25, 3.5]])  # inside: unchanged
    with pytest.raises(geometry.GeometryError, match="outside the image"):
        geometry.ras_to_slice_pixels(np.array([[11.6, 3.0, 1.0]]), identity, 0, shape)


def test_roi_corners_follow_the_roi(mrml):
    roi = mrml.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(1.0, 2.0, 3.0)
    roi.SetSize(4.0, 6.0, 2.0)
    corners = geometry.roi_corners_ras(roi)
    np.testing.assert_allclose(corners.min(axis=0), [-1, -1, 2])
    np.testing.assert_allclose(corners.max(axis=0), [3, 5, 4])
