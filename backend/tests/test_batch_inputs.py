"""Inputs ITK accepts too readily, and options no case can use: each one sentence and exit code 2 before a model
loads; NIfTI files whose qform and sform disagree give outputs that every tool overlays on the input."""

import gzip
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from medsam2_backend.cli import main
from test_batch_formats import make_image, no_model, pyramid_label  # noqa: F401 - a fixture


def one_sentence(capsys, words):
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and err.count("\n") == 1, err


def write_nifti(path, shape=(10, 14, 16)):
    sitk.WriteImage(make_image(shape, np.eye(3)), str(path))
    return path


@pytest.mark.parametrize("name, cut, words", [
    ("half.nii.gz", lambda data: data[: len(data) // 2], "damaged or truncated"),
    ("header_only.nii.gz", lambda data: data[:300], "damaged or truncated"),
    ("short.nii", lambda data: gzip.decompress(data)[:-100], "is truncated: it holds 4732 bytes, its header "
                                                             "announces 4832"),
])
def test_truncated_nifti_is_refused_not_filled(tmp_path, capsys, no_model, name, cut, words):  # noqa: F811
    """ITK reads a cut NIfTI without an error, filling the missing voxels with whatever memory held."""
    full = write_nifti(tmp_path / "full.nii.gz").read_bytes()
    (tmp_path / name).write_bytes(cut(full))
    assert main(["segment", str(tmp_path / name), "--random-weights"]) == 2
    one_sentence(capsys, words)


def test_truncated_metaimage_is_one_line_even_on_the_c_stderr(tmp_path):
    """MetaIO prints its reason to the C stderr and ITK's exception says 'No such file or directory'; the user
    sees one line, with MetaIO's reason in it."""
    sitk.WriteImage(make_image((6, 8, 8), np.eye(3)), str(tmp_path / "v.mha"))
    data = (tmp_path / "v.mha").read_bytes()
    (tmp_path / "v.mha").write_bytes(data[:-150])
    run = subprocess.run([sys.executable, "-m", "medsam2_backend.cli", "segment", str(tmp_path / "v.mha"),
                          "--random-weights"], capture_output=True, text=True, encoding="utf-8")
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "data not read completely" in run.stderr, run.stderr
    assert "No such file" not in run.stderr


@pytest.mark.parametrize("extra, words", [
    (["--box-jitter", "-2"], "--box-jitter must be a number of 0 or more"),
    (["--nsd-tolerance-mm", "-1"], "--nsd-tolerance-mm must be a number of 0 or more"),
    (["--box-margin-mm", "nan"], "--box-margin-mm must be a number of 0 or more"),
    (["--seed", "-1"], "--seed must be 0 or more"),
])
def test_option_values_no_case_can_use(tmp_path, capsys, no_model, extra, words):  # noqa: F811
    image = write_nifti(tmp_path / "img.nii.gz")
    labels = sitk.GetImageFromArray(pyramid_label((10, 14, 16), 0)[0])
    labels.CopyInformation(sitk.ReadImage(str(image)))
    sitk.WriteImage(labels, str(tmp_path / "lab.nii.gz"))
    assert main(["segment", str(image), "--from-labels", str(tmp_path / "lab.nii.gz"), "--random-weights",
                 *extra]) == 2
    one_sentence(capsys, words)
    assert main(["batch", str(tmp_path / "none.csv"), "--random-weights", *extra]) == 2
    one_sentence(capsys, words)


def test_label_options_without_labels_are_refused(tmp_path, capsys, no_model):  # noqa: F811
    image = write_nifti(tmp_path / "img.nii.gz")
    assert main(["segment", str(image), "--random-weights", "--label-values", "3", "--per-component"]) == 2
    one_sentence(capsys, "--label-values, --per-component apply only with --from-labels")


def set_transforms(path, srow_ras, qform_code, sform_code):
    """Rewrite a NIfTI-1 file's sform rows and transform codes (the qform stays as SimpleITK wrote it)."""
    data = bytearray(path.read_bytes())
    for offset, row in zip((280, 296, 312), srow_ras):
        data[offset:offset + 16] = struct.pack("<4f", *row)
    data[252:256] = struct.pack("<2h", qform_code, sform_code)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("codes, followed", [((1, 1), "sform"), ((1, 2), "qform")])
def test_nifti_qform_and_sform_that_disagree(tmp_path, capsys, codes, followed):
    """ITK (and Slicer) follow one of the two transforms by ITK's rule; the note names it, the outputs follow it, and
    the label map carries the input's own qform and sform so tools that prefer the other one overlay it too."""
    path = tmp_path / "img.nii"
    sitk.WriteImage(make_image((6, 10, 12), np.eye(3), spacing_ijk=(1.0, 2.0, 3.0), origin=(10.0, 20.0, 30.0)),
                    str(path))
    set_transforms(path, [(0, -2, 0, -50), (-1, 0, 0, -60), (0, 0, 3, 70)], *codes)  # I and J swapped, moved
    reference = sitk.ReadImage(str(path))
    expected_origin = (50.0, 60.0, 70.0) if followed == "sform" else (10.0, 20.0, 30.0)
    np.testing.assert_allclose(reference.GetOrigin(), expected_origin, atol=1e-4)
    out = tmp_path / "out"
    assert main(["segment", str(path), "--test-engine", "-o", str(out), "--axis", "k", "--slice", "3",
                 "--box", "2", "3", "6", "7"]) == 0
    assert f"the outputs follow the {followed}" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert any(followed in note for note in report["notes"])
    written = sitk.ReadImage(report["outputs"]["label_map"])
    for a, b in ((written.GetOrigin(), reference.GetOrigin()), (written.GetSpacing(), reference.GetSpacing()),
                 (written.GetDirection(), reference.GetDirection())):
        np.testing.assert_allclose(a, b, atol=1e-4)
    header_in, header_out = path.read_bytes()[:348], gzip.decompress(open(report["outputs"]["label_map"], "rb").read())
    assert header_out[252:328] == header_in[252:328] and header_out[76:92] == header_in[76:92]
    mask = sitk.GetArrayFromImage(written)
    assert mask[3, 3:8, 2:7].all() and mask.sum() == 25 + 2 * 9 + 2 * 1


FLIPPED_ANISOTROPIC = np.diag([1.0, -1.0, 1.0]) @ np.array([[0, 0, 1.0], [1, 0, 0], [0, 1, 0]])  # K runs L-R


@pytest.mark.parametrize("axis", ["i", "j", "k"])
def test_prompts_in_lps_ras_and_voxels_on_each_axis(tmp_path, axis):
    """One 3D box and one point given three ways land on the same, hand-computed voxels along each axis, on a
    flipped, permuted grid with anisotropic voxels."""
    shape = (12, 14, 16)  # K, J, I
    image = make_image(shape, FLIPPED_ANISOTROPIC, spacing_ijk=(0.7, 1.1, 2.0))
    sitk.WriteImage(image, str(tmp_path / "img.nrrd"))
    a = "kji".index(axis)  # K,J,I array axis
    lo, hi = [3, 4, 2], [9, 10, 8]  # I, J, K corners
    lo[2 - a], hi[2 - a] = 4, 8  # the box spans slices 4..8 along the axis: key slice 6

    def lps(ijk):
        return list(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in ijk]))

    ras = [[-x, -y, z] for x, y, z in (lps(lo), lps(hi))]
    point_ijk = [5, 6, 4]
    objects = [{"name": "voxel", "coordinates": "voxel", "box": [lo, hi]},
               {"name": "lps", "coordinates": "LPS", "box": [lps(lo), lps(hi)]},
               {"name": "ras", "coordinates": "RAS", "box": ras},
               {"name": "point lps", "coordinates": "LPS", "points": [lps(point_ijk)], "labels": [1]},
               {"name": "point voxel", "coordinates": "voxel", "points": [point_ijk], "labels": [1]}]
    (tmp_path / "p.json").write_text(json.dumps({"objects": objects}))
    assert main(["segment", str(tmp_path / "img.nrrd"), "--prompts", str(tmp_path / "p.json"), "--axis", axis,
                 "-o", str(tmp_path / "out"), "--test-engine", "--box-margin-mm", "0"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    objs = {o["name"]: o for o in report["objects"]}
    x_index, y_index = sorted(n for n in (0, 1, 2) if n != 2 - a)  # slice pixels: x = lower index, y = higher
    box = [lo[x_index], lo[y_index], hi[x_index], hi[y_index]]
    expected = np.zeros(shape, bool)
    for k in range(4, 9):
        d = abs(k - 6)
        plane = np.zeros([n for m, n in enumerate(shape) if m != a], bool)
        plane[box[1] + d:box[3] - d + 1, box[0] + d:box[2] - d + 1] = True
        np.moveaxis(expected, a, 0)[k] = plane
    labels = sitk.GetArrayFromImage(sitk.ReadImage(report["outputs"]["label_map"]))
    for name in ("voxel", "lps", "ras"):
        assert objs[name]["axis"] == axis and objs[name]["propagation"] == [4, 8]
        assert objs[name]["steps"] == [{"slice_index": 6, "box": pytest.approx(box)}]
    assert objs["point lps"]["steps"] == objs["point voxel"]["steps"]
    assert objs["point voxel"]["steps"][0]["slice_index"] == point_ijk[2 - a]
    assert objs["point voxel"]["steps"][0]["points"] == [[point_ijk[x_index], point_ijk[y_index]]]
    import slicerio

    seg = slicerio.read_segmentation(report["outputs"]["seg_nrrd"])
    for name in ("voxel", "lps", "ras"):
        np.testing.assert_array_equal(np.transpose(slicerio.segment_mask(seg, name)), expected)
    assert labels.shape == shape


def test_a_3d_box_partly_outside_is_clipped_and_one_wholly_outside_is_refused(tmp_path, capsys):
    shape = (10, 14, 16)
    sitk.WriteImage(make_image(shape, np.eye(3)), str(tmp_path / "img.nrrd"))
    partly = {"coordinates": "voxel", "objects": [{"name": "edge", "box": [[-6, 3, 5], [9, 30, 20]]}]}
    (tmp_path / "partly.json").write_text(json.dumps(partly))
    assert main(["segment", str(tmp_path / "img.nrrd"), "--prompts", str(tmp_path / "partly.json"),
                 "-o", str(tmp_path / "out"), "--test-engine", "--box-margin-mm", "0"]) == 0
    (obj,) = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))["objects"]
    # Slices 5..20 of 0..9: the centre (12.5) is clipped to the last slice; the box to the slice's pixels.
    assert obj["propagation"] == [5, 9] and obj["steps"] == [{"slice_index": 9, "box": [0, 3, 9, 13]}]
    capsys.readouterr()
    outside = {"coordinates": "voxel", "objects": [{"name": "far", "box": [[2, 3, 12], [9, 10, 20]]}]}
    (tmp_path / "outside.json").write_text(json.dumps(outside))
    assert main(["segment", str(tmp_path / "img.nrrd"), "--prompts", str(tmp_path / "outside.json"),
                 "--random-weights"]) == 2
    one_sentence(capsys, "The box lies outside the image")


def test_every_option_with_a_default_says_it_and_every_command_has_an_example(capsys):
    import argparse

    from medsam2_backend.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for command, p in sub.choices.items():
        for action in p._actions:
            if action.help in (None, argparse.SUPPRESS) or action.option_strings in ([], ["-h", "--help"]):
                continue
            if action.default not in (None, False) or action.dest in ("box", "slice", "axis", "preset"):
                assert "default" in action.help, (command, action.option_strings)
        assert "-o" in p._option_string_actions and "example" in (p.epilog or ""), command
        assert f"medsam2-segment {command}" in p.epilog
    assert "example" in parser.epilog


def test_bad_output_folder_dicom_slice_and_series_option(tmp_path, capsys, no_model):  # noqa: F811
    import pydicom.data

    image = write_nifti(tmp_path / "img.nii.gz")
    (tmp_path / "a_file").write_text("")
    for extra, words in ((["-o", str(tmp_path / "a_file")], "is a file; give a folder"),
                         (["-o", str(tmp_path / "a_file" / "sub")], "cannot be made"),
                         (["--series", "1.2.3"], "is not a folder")):
        assert main(["segment", str(image), "--random-weights", *extra]) == 2
        one_sentence(capsys, words)
    (tmp_path / "m.csv").write_text("image,labels\nimg.nii.gz,img.nii.gz\n")
    assert main(["batch", str(tmp_path / "m.csv"), "--random-weights", "-o", str(tmp_path / "a_file")]) == 2
    one_sentence(capsys, "is a file; give a folder")
    assert main(["segment", pydicom.data.get_testdata_file("CT_small.dcm"), "--random-weights"]) == 2
    one_sentence(capsys, "is one DICOM slice; give the folder that holds its whole series")


def test_nan_voxels_are_read_as_the_lowest_value_with_a_note(tmp_path, capsys):
    array = np.linspace(-5, 50, 8 * 10 * 12, dtype=np.float32).reshape(8, 10, 12)
    array[0, :3, :3] = np.nan
    array[7, 0, 0] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "nan.mha"))
    from medsam2_backend.batch.images import read_image

    image = read_image(tmp_path / "nan.mha")
    lowest = array[0, 0, 3]
    assert np.isfinite(image.array).all() and image.array[0, 0, 0] == lowest and image.array[7, 0, 0] == lowest
    assert "10 voxels are NaN or infinite" in image.notes[0]
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 5, 6), np.nan, np.float32)), str(tmp_path / "all.mha"))
    assert main(["segment", str(tmp_path / "all.mha"), "--random-weights"]) == 2
    one_sentence(capsys, "has no voxel with a finite value")


def test_eight_corners_of_a_world_aligned_box_on_an_oblique_grid(tmp_path):
    """Two corners bound a box on the voxel grid; a box aligned with the world's axes on an oblique image is given
    by its eight corners, and their bounding box on the voxel grid (computed here with ITK) is what is prompted."""
    from itertools import product

    from test_batch_formats import GRIDS

    shape = (12, 20, 24)
    image = make_image(shape, GRIDS["oblique"], spacing_ijk=(1.0, 1.0, 2.0))
    sitk.WriteImage(image, str(tmp_path / "img.mha"))
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint((11.0, 9.0, 5.0)))
    corners_lps = [centre + np.array(signs) * [4.0, 3.0, 4.5] for signs in product((-1, 1), repeat=3)]
    ijk = np.array([image.TransformPhysicalPointToContinuousIndex(c.tolist()) for c in corners_lps])
    low, high = ijk.min(axis=0), ijk.max(axis=0)
    two = ijk[[0, 7]]  # the two "opposite" world corners alone span less of the voxel grid
    assert (two.max(axis=0) - two.min(axis=0) < high - low - 0.5).any()
    ras = [[-x, -y, z] for x, y, z in corners_lps]
    (tmp_path / "p.json").write_text(json.dumps({"objects": [{"name": "world box", "box": ras}]}))
    assert main(["segment", str(tmp_path / "img.mha"), "--prompts", str(tmp_path / "p.json"),
                 "-o", str(tmp_path / "out"), "--test-engine", "--box-margin-mm", "0"]) == 0
    (obj,) = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))["objects"]
    assert obj["axis"] == "k" and obj["steps"][0]["slice_index"] == 5
    assert obj["steps"][0]["box"] == pytest.approx([low[0], low[1], high[0], high[1]], abs=1e-5)
    assert obj["propagation"] == [int(np.floor(low[2] + 0.5)), int(np.floor(high[2] + 0.5))]


def test_a_3d_nrrd_stored_with_one_time_point_is_a_volume(tmp_path):
    four = sitk.JoinSeries([make_image((6, 8, 10), np.eye(3))])
    assert four.GetDimension() == 4 and four.GetSize()[3] == 1
    sitk.WriteImage(four, str(tmp_path / "t1.nrrd"))
    assert main(["segment", str(tmp_path / "t1.nrrd"), "--test-engine", "-o", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["image"]["size_ijk"] == [10, 8, 6]
