"""Slicer segmentations whose segments overlap, in and out: a multi-layer .seg.nrrd as ground truth is split into
one object per segment (its name, colour and voxels, read on its own grid), and predicted objects that overlap
keep all their voxels in the written .seg.nrrd (layers), while the NIfTI label map gives a shared voxel to the
object listed later (the documented rule; the report counts those voxels)."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from medsam2_backend.cli import main
from test_batch_formats import expected_test_engine_mask, no_model, read_outputs  # noqa: F401 - a fixture

CT = slicerio.get_testdata_file("CTChest4.nrrd")
SEG = slicerio.get_testdata_file("Segmentation.seg.nrrd")
LUNG_COLOR = [0.1, 0.7, 0.3]
LESION_COLOR = [0.9, 0.2, 0.1]


def overlapping_segmentation(path, crop_ijk=((6, 120), (4, 124), (0, 34))):
    """CTChest4's right lung, and a 'lesion' that overlaps it, written as Slicer does: the lesion in a second layer,
    the voxels cropped to `crop_ijk` (I, J, K ranges) so the file's grid is not the CT's. Returns the two masks on
    the CT's grid (K,J,I)."""
    truth = slicerio.read_segmentation(SEG)
    lung = slicerio.segment_mask(truth, "right lung")  # I,J,K on the CT's grid
    lesion = np.zeros_like(lung)
    lesion[30:70, 40:90, 10:22] = True
    assert (lung & lesion).sum() > 1000 and (lesion & ~lung).sum() > 1000
    (i0, i1), (j0, j1), (k0, k1) = crop_ijk
    origin = truth["ijkToLPS"] @ [i0, j0, k0, 1]
    matrix = truth["ijkToLPS"].copy()
    matrix[:3, 3] = origin[:3]
    seg = slicerio.create_segmentation((i1 - i0, j1 - j0, k1 - k0), matrix)
    for name, mask, color in (("right lung", lung, LUNG_COLOR), ("lesion", lesion, LESION_COLOR)):
        assert not mask[:i0].any() and not mask[i1:].any() and not mask[:, :j0].any() and not mask[:, j1:].any()
        slicerio.add_segment(seg, mask[i0:i1, j0:j1, k0:k1], {"id": name, "name": name, "color": color})
    slicerio.write_segmentation(str(path), seg)
    written = slicerio.read_segmentation(str(path))
    assert written["voxels"].ndim == 4 and [s["layer"] for s in written["segments"]] == [0, 1]
    assert [s["labelValue"] for s in written["segments"]] == [1, 1]  # values repeat across layers
    return np.transpose(lung), np.transpose(lesion)


def segment_masks(seg):
    """name -> (K,J,I bool mask, colour) of every segment of a slicerio segmentation, whatever its layer."""
    return {s["name"]: (np.transpose(slicerio.segment_mask(seg, s)), s["color"]) for s in seg["segments"]}


def test_overlapping_segments_are_objects_of_their_own_and_overlapping_predictions_keep_their_voxels(tmp_path):
    lung, lesion = overlapping_segmentation(tmp_path / "truth.seg.nrrd")
    out = tmp_path / "out"
    assert main(["segment", CT, "--from-labels", str(tmp_path / "truth.seg.nrrd"), "-o", str(out),
                 "--test-engine"]) == 0
    report, label_out, seg = read_outputs(out, sitk.ReadImage(CT))
    objs = {o["name"]: o for o in report["objects"]}
    assert [(o["name"], o["label"]) for o in report["objects"]] == [("right lung", 1), ("lesion", 2)]
    expected = {}
    for name, truth in (("right lung", lung), ("lesion", lesion)):
        expected[name], key = expected_test_engine_mask(truth, True, 0)
        assert objs[name]["steps"][0]["slice_index"] == key
        t = expected[name]
        assert objs[name]["voxels"] == t.sum()
        assert objs[name]["metrics"]["dice"] == pytest.approx(2 * (t & truth).sum() / (t.sum() + truth.sum()))
    shared = expected["right lung"] & expected["lesion"]
    assert shared.sum() > 1000
    # The .seg.nrrd keeps both objects whole (two layers), with their names and the truth's colours.
    masks = segment_masks(seg)
    assert seg["voxels"].ndim == 4
    for name, color in (("right lung", LUNG_COLOR), ("lesion", LESION_COLOR)):
        np.testing.assert_array_equal(masks[name][0], expected[name])
        assert masks[name][1] == pytest.approx(color)
    # The label map has one value per voxel: the object listed later wins, and the report says how many.
    np.testing.assert_array_equal(label_out == 2, expected["lesion"])
    np.testing.assert_array_equal(label_out == 1, expected["right lung"] & ~expected["lesion"])
    assert report["overlap_voxels"] == int(shared.sum())
    assert any("later" in note and str(int(shared.sum())) in note for note in report["notes"])


def test_slicers_own_overlapping_file_and_segment_selection(tmp_path):
    """slicerio's SegmentationOverlapping.seg.nrrd (Slicer-written): its 8th segment, a sphere in layer 1 with the
    same label value as the ribs in layer 0, is segment number 8 and is selected by that number."""
    path = slicerio.get_testdata_file("SegmentationOverlapping.seg.nrrd")
    truth = slicerio.read_segmentation(path)
    sphere = np.transpose(slicerio.segment_mask(truth, "overlapping sphere"))
    ribs = np.transpose(slicerio.segment_mask(truth, "ribs"))
    assert sphere.sum() > 1000 and ribs.sum() > 1000
    out = tmp_path / "out"
    assert main(["segment", CT, "--from-labels", path, "-o", str(out), "--test-engine",
                 "--label-values", "8", "1"]) == 0
    report, _, seg = read_outputs(out, sitk.ReadImage(CT))
    assert [(o["name"], o["label"]) for o in report["objects"]] == [("overlapping sphere", 8), ("ribs", 1)]
    masks = segment_masks(seg)
    for name, t in (("overlapping sphere", sphere), ("ribs", ribs)):
        np.testing.assert_array_equal(masks[name][0], expected_test_engine_mask(t, True, 0)[0])
    assert masks["overlapping sphere"][1] == pytest.approx(
        next(s["color"] for s in truth["segments"] if s["name"] == "overlapping sphere"))


def test_unknown_segment_numbers_list_the_segments(tmp_path, capsys, no_model):  # noqa: F811
    path = slicerio.get_testdata_file("SegmentationOverlapping.seg.nrrd")
    assert main(["segment", CT, "--from-labels", path, "--random-weights", "--label-values", "9"]) == 2
    err = capsys.readouterr().err
    assert "Label value(s) 9 are not in" in err and "8 (overlapping sphere)" in err and err.count("\n") == 1


def test_a_segment_outside_the_image_is_left_out_with_a_note(tmp_path, capsys):
    """A segmentation on a larger grid whose one segment lies beyond the CT: the others are used, a note says so."""
    truth = slicerio.read_segmentation(SEG)
    matrix = truth["ijkToLPS"].copy()
    matrix[:3, 3] = (truth["ijkToLPS"] @ [0, 0, -10, 1])[:3]  # ten slices below the CT's first one
    seg = slicerio.create_segmentation((128, 128, 54), matrix)
    lung = np.zeros((128, 128, 54), bool)
    lung[:, :, 10:44] = slicerio.segment_mask(truth, "left lung")
    below = np.zeros_like(lung)
    below[40:60, 40:60, 2:6] = True
    slicerio.add_segment(seg, lung, {"id": "l", "name": "left lung"})
    slicerio.add_segment(seg, below, {"id": "b", "name": "below"})
    slicerio.write_segmentation(str(tmp_path / "big.seg.nrrd"), seg)
    assert main(["segment", CT, "--from-labels", str(tmp_path / "big.seg.nrrd"), "-o", str(tmp_path / "out"),
                 "--test-engine"]) == 0
    assert "segment(s) 2 (below) have no voxel on the image's grid" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert [o["name"] for o in report["objects"]] == ["left lung"]
    t = np.transpose(slicerio.segment_mask(truth, "left lung"))
    expected = expected_test_engine_mask(t, True, 0)[0]
    assert report["objects"][0]["voxels"] == expected.sum()
    dice = 2 * (expected & t).sum() / (expected.sum() + t.sum())
    assert report["objects"][0]["metrics"]["dice"] == pytest.approx(dice)


def test_overlapping_segmentation_on_an_oblique_coarser_grid_is_resampled_nearest_neighbour(tmp_path):
    """Segments on their own oblique grid with 2x voxels: each lands where nearest-neighbour lookup through the
    two grids' matrices (computed here with numpy, not ITK) puts it."""
    from test_batch_formats import GRIDS, make_image

    shape = (12, 16, 18)  # the image, K,J,I
    image = make_image(shape, GRIDS["flipped"], spacing_ijk=(1.0, 1.2, 2.0))
    sitk.WriteImage(image, str(tmp_path / "img.nrrd"))
    image_to_lps = np.eye(4)
    image_to_lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * image.GetSpacing()
    image_to_lps[:3, 3] = image.GetOrigin()
    seg_to_lps = np.eye(4)
    seg_to_lps[:3, :3] = GRIDS["oblique"] * [2.1, 2.3, 3.9]
    centre = (image_to_lps @ [8.6, 7.7, 5.9, 1])[:3]  # near the image's centre (I, J, K), off its voxel centres
    seg_to_lps[:3, 3] = centre - seg_to_lps[:3, :3] @ [6, 6, 4]
    seg = slicerio.create_segmentation((12, 12, 8), seg_to_lps)
    a = np.zeros((12, 12, 8), bool)
    a[2:8, 3:9, 2:6] = True
    b = np.zeros_like(a)
    b[5:10, 5:11, 3:7] = True
    slicerio.add_segment(seg, a, {"id": "a", "name": "a"})
    slicerio.add_segment(seg, b, {"id": "b", "name": "b"})
    slicerio.write_segmentation(str(tmp_path / "s.seg.nrrd"), seg)
    # By hand: every image voxel centre, into the segmentation's voxels, rounded.
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centres = image_to_lps @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    seg_ijk = (np.linalg.inv(seg_to_lps) @ centres)[:3]
    assert (np.abs(seg_ijk - np.round(seg_ijk)) < 0.5 - 1e-6).all(), "no voxel centre on a tie"
    index = np.floor(seg_ijk + 0.5).astype(int)
    inside = ((index >= 0) & (index < np.array([12, 12, 8])[:, None])).all(axis=0)
    truths = {}
    for name, mask in (("a", a), ("b", b)):
        values = np.zeros(i.size, bool)
        values[inside] = mask[tuple(index[:, inside])]
        truths[name] = values.reshape(shape)
        assert truths[name].sum() > 50
    assert (truths["a"] & truths["b"]).any()
    assert main(["segment", str(tmp_path / "img.nrrd"), "--from-labels", str(tmp_path / "s.seg.nrrd"),
                 "-o", str(tmp_path / "out"), "--test-engine"]) == 0
    report, _, out_seg = read_outputs(tmp_path / "out", image)
    masks = segment_masks(out_seg)
    for obj in report["objects"]:
        expected, key = expected_test_engine_mask(truths[obj["name"]], True, 0)
        assert obj["steps"][0]["slice_index"] == key
        np.testing.assert_array_equal(masks[obj["name"]][0], expected)
        t = truths[obj["name"]]
        assert obj["metrics"]["dice"] == pytest.approx(2 * (expected & t).sum() / (expected.sum() + t.sum()))
