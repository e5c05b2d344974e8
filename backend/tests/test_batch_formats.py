"""`medsam2-segment segment` on every input format: outputs on exactly the input's grid, voxels where hand-computed.

With the deterministic test engine, `--from-labels` prompts the label's bounding box on its largest slice, and the
engine shrinks that rectangle by one pixel per slice of distance: slice key +- d holds the rectangle with d pixels
cut from each side. That rule is computed here by hand (no scipy) and compared voxel for voxel, on oblique, flipped
and anisotropic grids, after writing and re-reading every format.
"""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from medsam2_backend.batch import cohort as cohort_module
from medsam2_backend.cli import main


def rotation(axis, degrees):
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    m = np.eye(3)
    i, j = [x for x in range(3) if x != axis]
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


# Direction matrices (columns: I, J, K directions in LPS).
GRIDS = {
    "oblique": rotation(0, 17) @ rotation(2, 11),
    "flipped": np.diag([1.0, -1.0, 1.0]) @ rotation(1, 8) @ np.diag([-1.0, 1.0, 1.0]),  # det < 0
    "j_is_superior": np.array([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]]),  # J runs S-I: the default axis is j
}


def make_image(shape_kji, direction, spacing_ijk=(0.9, 1.3, 2.5), origin=(12.5, -40.0, 7.25), seed=0,
               dtype=np.int16):
    rng = np.random.default_rng(seed)
    itk = sitk.GetImageFromArray(rng.integers(-100, 200, shape_kji).astype(dtype))
    itk.SetDirection(np.asarray(direction, float).ravel().tolist())
    itk.SetSpacing(spacing_ijk)
    itk.SetOrigin(origin)
    return itk


def pyramid_label(shape_kji, axis, value=3):
    """A label whose area peaks on one slice along `axis` (K,J,I array axis): rectangles shrinking away from it."""
    labels = np.zeros(shape_kji, np.uint8)
    n = shape_kji[axis]
    key = n // 2 + 1
    for k in range(n):
        d = abs(k - key)
        idx = [slice(None)] * 3
        idx[axis] = k
        plane = np.zeros([s for a, s in enumerate(shape_kji) if a != axis], np.uint8)
        r0, r1, c0, c1 = 3 + d, plane.shape[0] - 4 - d, 2 + d, plane.shape[1] - 3 - d
        if r0 <= r1 and c0 <= c1 and d <= 3:
            plane[r0:r1 + 1, c0:c1 + 1] = value
        labels[tuple(idx)] = plane
    return labels, key


def expected_test_engine_mask(labels_kji, value, axis):
    """By hand: the box on the largest slice, d pixels cut from each side on the slices d away."""
    mask = labels_kji == value
    areas = mask.sum(axis=tuple(a for a in range(3) if a != axis))
    key = int(np.argmax(areas))
    rows, cols = np.nonzero(np.take(mask, key, axis=axis))
    y0, y1, x0, x1 = rows.min(), rows.max(), cols.min(), cols.max()
    out = np.zeros(mask.shape, bool)
    for k in range(mask.shape[axis]):
        d = abs(k - key)
        if y0 + d <= y1 - d and x0 + d <= x1 - d:
            idx = [slice(None)] * 3
            idx[axis] = k
            plane = np.zeros([s for a, s in enumerate(mask.shape) if a != axis], bool)
            plane[y0 + d:y1 - d + 1, x0 + d:x1 - d + 1] = True
            out[tuple(idx)] = plane
    return out, key


def assert_same_grid(itk, reference):
    assert itk.GetSize() == reference.GetSize()
    np.testing.assert_allclose(itk.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(itk.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(itk.GetDirection(), reference.GetDirection(), atol=1e-4)


def read_outputs(out, reference):
    """The label map (SimpleITK) and the .seg.nrrd (slicerio), both checked against the input's grid."""
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    label_itk = sitk.ReadImage(report["outputs"]["label_map"])
    assert_same_grid(label_itk, reference)
    seg = slicerio.read_segmentation(report["outputs"]["seg_nrrd"])
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(reference.GetDirection()).reshape(3, 3) * reference.GetSpacing()
    lps[:3, 3] = reference.GetOrigin()
    np.testing.assert_allclose(seg["ijkToLPS"], lps, atol=1e-4)
    return report, sitk.GetArrayFromImage(label_itk), seg


def seg_mask(seg, name):
    """One segment of a slicerio segmentation as a K,J,I bool array."""
    segment = next(s for s in seg["segments"] if s["name"] == name)
    voxels = seg["voxels"] if seg["voxels"].ndim == 3 else seg["voxels"][segment["layer"]]
    return np.transpose(voxels == segment["labelValue"])


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: bad input must be found before."""
    def refuse(self):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cohort_module.ModelSpec, "build", refuse)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_from_labels_lands_on_hand_computed_voxels(tmp_path, suffix, grid):
    shape = (10, 14, 16)
    image = make_image(shape, GRIDS[grid])
    axis = 1 if grid == "j_is_superior" else 0  # K,J,I array axis closest to S-I
    labels, key = pyramid_label(shape, axis)
    label_itk = sitk.GetImageFromArray(labels)
    label_itk.CopyInformation(image)
    sitk.WriteImage(image, str(tmp_path / f"img{suffix}"))
    sitk.WriteImage(label_itk, str(tmp_path / f"lab{suffix}"))
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / f"img{suffix}"), "--from-labels", str(tmp_path / f"lab{suffix}"),
                 "-o", str(out), "--test-engine"]) == 0
    reference = sitk.ReadImage(str(tmp_path / f"img{suffix}"))
    report, label_out, seg = read_outputs(out, reference)
    expected, expected_key = expected_test_engine_mask(labels, 3, axis)
    assert expected_key == key
    obj = report["objects"][0]
    assert obj["axis"] == "kji"[axis] and obj["steps"][0]["slice_index"] == key
    np.testing.assert_array_equal(label_out == 3, expected)
    np.testing.assert_array_equal(seg_mask(seg, "label 3"), expected)
    truth = labels == 3
    dice = 2 * (expected & truth).sum() / (expected.sum() + truth.sum())
    assert obj["metrics"]["dice"] == pytest.approx(dice)


def test_label_map_on_another_grid_is_resampled_nearest_neighbour(tmp_path):
    shape = (10, 14, 16)
    image = make_image(shape, GRIDS["oblique"])
    labels, _ = pyramid_label(shape, 0)
    padded = np.pad(labels, 2)  # the same voxels on a grid two voxels larger on every side
    label_itk = sitk.GetImageFromArray(padded)
    label_itk.SetDirection(image.GetDirection())
    label_itk.SetSpacing(image.GetSpacing())
    label_itk.SetOrigin(image.TransformContinuousIndexToPhysicalPoint((-2.0, -2.0, -2.0)))
    sitk.WriteImage(image, str(tmp_path / "img.nrrd"))
    sitk.WriteImage(label_itk, str(tmp_path / "lab.nii.gz"))
    assert main(["segment", str(tmp_path / "img.nrrd"), "--from-labels", str(tmp_path / "lab.nii.gz"),
                 "-o", str(tmp_path / "out"), "--test-engine"]) == 0
    _, label_out, _ = read_outputs(tmp_path / "out", image)
    np.testing.assert_array_equal(label_out == 3, expected_test_engine_mask(labels, 3, 0)[0])


def test_ctchest4_real_anatomy_from_labels(tmp_path):
    """Slicer's own segmentation of CTChest4 (same grid): every segment's key slice, box and propagated voxels."""
    ct, segfile = slicerio.get_testdata_file("CTChest4.nrrd"), slicerio.get_testdata_file("Segmentation.seg.nrrd")
    assert main(["segment", ct, "--from-labels", segfile, "-o", str(tmp_path), "--test-engine",
                 "--label-values", "1", "5", "6"]) == 0
    reference = sitk.ReadImage(ct)
    report, label_out, seg = read_outputs(tmp_path, reference)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(segfile))
    names = {o["label"]: o["name"] for o in report["objects"]}
    assert names == {1: "ribs", 5: "right lung", 6: "left lung"}
    for obj in report["objects"]:
        expected, key = expected_test_engine_mask(truth, obj["label"], 0)
        assert obj["axis"] == "k" and obj["steps"][0]["slice_index"] == key
        np.testing.assert_array_equal(seg_mask(seg, obj["name"]), expected)
        t = truth == obj["label"]
        assert obj["metrics"]["dice"] == pytest.approx(2 * (expected & t).sum() / (expected.sum() + t.sum()))
        assert obj["least_certain"][0]["iou"] == pytest.approx(1 - 0.01 * max(key, 33 - key))
    assert set(np.unique(label_out)) <= {0, 1, 5, 6}


def write_dicom_series(itk, folder):
    """A CT series, one file per slice, with the tags GDCM and highdicom need (patient, study, frame of reference)."""
    import pydicom.uid

    folder.mkdir()
    study, series, frame = (pydicom.uid.generate_uid() for _ in range(3))
    direction = itk.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(itk.GetDepth()):
        s = itk[:, :, k]
        tags = {"0010|0010": "Test^Patient", "0010|0020": "T1", "0020|000d": study, "0020|000e": series,
                "0020|0052": frame, "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0008|0018": pydicom.uid.generate_uid(), "0020|0011": "1", "0020|0013": str(k + 1),
                "0008|0020": "20260101", "0008|0030": "120000", "0020|0010": "1", "0008|0050": "1",
                "0020|0037": "\\".join(f"{v:.10f}" for v in (direction[0], direction[3], direction[6],
                                                             direction[1], direction[4], direction[7])),
                "0020|0032": "\\".join(f"{v:.10f}" for v in itk.TransformIndexToPhysicalPoint((0, 0, k))),
                "0028|0030": f"{itk.GetSpacing()[1]:.10f}\\{itk.GetSpacing()[0]:.10f}",
                "0018|0050": f"{itk.GetSpacing()[2]:.10f}", "0028|1052": "0", "0028|1053": "1",
                "0028|1054": "HU"}
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(s)


def test_dicom_series_from_ctchest4_gives_dicom_seg_and_grid(tmp_path):
    import pydicom

    ct = sitk.Cast(sitk.ReadImage(slicerio.get_testdata_file("CTChest4.nrrd")), sitk.sitkInt16)
    write_dicom_series(ct, tmp_path / "dicom")
    segfile = slicerio.get_testdata_file("Segmentation.seg.nrrd")
    assert main(["segment", str(tmp_path / "dicom"), "--from-labels", segfile, "-o", str(tmp_path / "out"),
                 "--test-engine", "--label-values", "5"]) == 0
    report, label_out, seg = read_outputs(tmp_path / "out", ct)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(segfile))
    expected, _ = expected_test_engine_mask(truth, 5, 0)
    np.testing.assert_array_equal(label_out == 5, expected)
    dcm = pydicom.dcmread(report["outputs"]["dicom_seg"])
    assert dcm.Modality == "SEG" and dcm.SegmentSequence[0].SegmentLabel == "right lung"
    source = pydicom.dcmread(str(tmp_path / "dicom" / "slice000.dcm"))
    assert dcm.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    frames = np.asarray(dcm.pixel_array, bool).reshape(-1, *expected.shape[1:])
    positions = [float(f.PlanePositionSequence[0].ImagePositionPatient[2])
                 for f in dcm.PerFrameFunctionalGroupsSequence]
    k_of = {round(ct.TransformIndexToPhysicalPoint((0, 0, k))[2], 3): k for k in range(ct.GetDepth())}
    for frame, z in zip(frames, positions):
        np.testing.assert_array_equal(frame, expected[k_of[round(z, 3)]])


def test_mni152_grey_and_white_matter(tmp_path):
    """The MNI152 T1 template with its GM/WM probability maps (nilearn's data files), thresholded at 0.5."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("nilearn")
    assert spec is not None, "make setup installs nilearn (--no-deps) for its MNI152 files"
    data = pathlib.Path(spec.origin).parent / "datasets" / "data"
    t1 = data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    gm = sitk.ReadImage(str(data / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"))
    wm = sitk.ReadImage(str(data / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"))
    labels = np.zeros(sitk.GetArrayViewFromImage(gm).shape, np.uint8)
    labels[sitk.GetArrayViewFromImage(gm) > 0.5] = 1
    labels[sitk.GetArrayViewFromImage(wm) > 0.5] = 2
    label_itk = sitk.GetImageFromArray(labels)
    label_itk.CopyInformation(gm)
    sitk.WriteImage(label_itk, str(tmp_path / "gm_wm.nii.gz"))
    assert main(["segment", str(t1), "--from-labels", str(tmp_path / "gm_wm.nii.gz"), "-o", str(tmp_path / "out"),
                 "--test-engine"]) == 0
    reference = sitk.ReadImage(str(t1))
    report, label_out, _ = read_outputs(tmp_path / "out", reference)
    axis = 0  # MNI152 is axial: K runs S-I
    for obj in report["objects"]:
        expected, key = expected_test_engine_mask(labels, obj["label"], axis)
        assert obj["steps"][0]["slice_index"] == key
        # Where GM and WM predictions overlap the later (WM) wins in the label map.
        np.testing.assert_array_equal(label_out == obj["label"], expected & (
            True if obj["label"] == 2 else ~expected_test_engine_mask(labels, 2, axis)[0]))
        assert 0 < obj["metrics"]["dice"] < 1


def test_prompts_file_world_voxel_and_3d_box(tmp_path):
    """RAS, LPS and voxel prompts land on the same voxels; a 3D box limits propagation to its slices + margin."""
    shape = (12, 20, 24)
    image = make_image(shape, GRIDS["oblique"], spacing_ijk=(1.0, 1.0, 2.0))
    sitk.WriteImage(image, str(tmp_path / "img.nii.gz"))
    reference = sitk.ReadImage(str(tmp_path / "img.nii.gz"))

    def lps(ijk):
        return list(reference.TransformContinuousIndexToPhysicalPoint([float(v) for v in ijk]))

    corners_ijk = [[4, 5, 3], [14, 12, 7]]  # a 3D box: slices 3..7 along K, centre 5
    prompts = {"objects": [
        {"name": "voxel box", "coordinates": "voxel", "box": corners_ijk},
        {"name": "lps box", "coordinates": "LPS", "box": [lps(c) for c in corners_ijk]},
        {"name": "ras box", "box": [[-x, -y, z] for x, y, z in (lps(c) for c in corners_ijk)]},
        {"name": "point", "coordinates": "voxel", "points": [[10, 10, 9]], "labels": [1], "axis": "k"}]}
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    assert main(["segment", str(tmp_path / "img.nii.gz"), "--prompts", str(tmp_path / "p.json"),
                 "-o", str(tmp_path / "out"), "--test-engine", "--box-margin-mm", "2"]) == 0
    report, label_out, seg = read_outputs(tmp_path / "out", reference)
    objs = {o["name"]: o for o in report["objects"]}
    for name in ("voxel box", "lps box", "ras box"):
        assert objs[name]["steps"][0] == {"slice_index": 5, "box": pytest.approx([4, 5, 14, 12])}
        assert objs[name]["propagation"] == [2, 8]  # slices 3..7 plus one 2 mm slice each side
    expected = np.zeros(shape, bool)
    for k in range(2, 9):
        d = abs(k - 5)
        expected[k, 5 + d:12 - d + 1, 4 + d:14 - d + 1] = True
    for name in ("voxel box", "lps box", "ras box"):
        np.testing.assert_array_equal(seg_mask(seg, name), expected)
    assert objs["point"]["steps"][0]["slice_index"] == 9
    assert seg_mask(seg, "point")[9, 10, 10] and not seg_mask(seg, "point")[9, 0, 0]


BAD_CASES = {
    "missing file": (lambda p: p / "nope.nii.gz", "does not exist"),
    "empty NRRD": (lambda p: text(p / "e.nrrd", ""), "empty file"),
    "truncated NRRD": (lambda p: truncated_nrrd(p), "could not be read"),
    "NRRD without space": (lambda p: nrrd_without_space(p), "no space fields"),
    "2D image": (lambda p: write(p / "flat.nii.gz", sitk.Image(8, 8, sitk.sitkInt16)), "2D"),
    "4D image": (lambda p: write(p / "t.nii.gz", sitk.Image([4, 4, 4, 3], sitk.sitkInt16)), "4D"),
    "not an image": (lambda p: text(p / "x.mha", "hello"), "could not be read"),
}


def text(path, content):
    path.write_text(content)
    return path


def write(path, itk):
    sitk.WriteImage(itk, str(path))
    return path


def truncated_nrrd(p):
    write(p / "full.nrrd", make_image((6, 8, 8), np.eye(3)))
    data = (p / "full.nrrd").read_bytes()
    (p / "t.nrrd").write_bytes(data[: len(data) - 200])
    return p / "t.nrrd"


def nrrd_without_space(p):
    import nrrd

    nrrd.write(str(p / "raw.nrrd"), np.zeros((8, 8, 4), np.int16))
    return p / "raw.nrrd"


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_image_is_one_sentence_before_the_model(tmp_path, capsys, no_model, case):
    make, words = BAD_CASES[case]
    path = make(tmp_path)
    assert main(["segment", str(path), "--random-weights"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and err.count("\n") == 1, err


def test_bad_prompts_and_labels_are_one_sentence_before_the_model(tmp_path, capsys, no_model):
    image = make_image((6, 10, 12), np.eye(3))
    write(tmp_path / "img.nrrd", image)
    labels = sitk.GetImageFromArray(pyramid_label((6, 10, 12), 0)[0])
    labels.CopyInformation(image)
    write(tmp_path / "lab.nrrd", labels)
    far = sitk.Image(labels)
    far.SetOrigin((1000.0, 1000.0, 1000.0))
    write(tmp_path / "far.nrrd", far)
    (tmp_path / "outside.json").write_text(json.dumps(
        {"coordinates": "voxel", "objects": [{"name": "a", "points": [[3, 3, 40]], "labels": [1]}]}))
    (tmp_path / "bad.json").write_text("{not json")
    img = str(tmp_path / "img.nrrd")
    checks = [
        (["--prompts", str(tmp_path / "outside.json")], "outside the volume"),
        (["--prompts", str(tmp_path / "bad.json")], "not valid JSON"),
        (["--from-labels", str(tmp_path / "lab.nrrd"), "--label-values", "7"], "Label value(s) 7 are not in"),
        (["--from-labels", str(tmp_path / "far.nrrd")], "cannot be resampled"),
        (["--slice", "2", "--box", "5", "5", "2", "2"], "reversed"),
        (["--slice", "2", "--box", "1", "1", "40", "5"], "outside the slice"),
        (["--slice", "9"], "outside the image"),
    ]
    for extra, words in checks:
        assert main(["segment", img, "--random-weights", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and err.count("\n") == 1, (extra, err)


def test_no_model_named_says_which_options(tmp_path, capsys):
    write(tmp_path / "img.nrrd", make_image((6, 10, 12), np.eye(3)))
    assert main(["segment", str(tmp_path / "img.nrrd")]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "--random-weights" in err


@pytest.mark.parametrize("command", ["segment", "batch", "demo"])
def test_help_shows_defaults_and_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "example" in out and "medsam2-segment " + command in out
    assert "--test-engine" not in out
    if command != "demo":
        assert "default: 2.0 mm" in out and "closest to superior-inferior" in out


def test_dicom_folder_with_two_series_says_so_and_takes_the_option(tmp_path, capsys):
    import pydicom

    ct = sitk.Cast(sitk.ReadImage(slicerio.get_testdata_file("CTChest4.nrrd")), sitk.sitkInt16)
    write_dicom_series(ct[:, :, :12], tmp_path / "a")
    write_dicom_series(ct[:, :, 20:26], tmp_path / "b")
    folder = tmp_path / "both"
    shutil.copytree(tmp_path / "a", folder)
    for f in (tmp_path / "b").iterdir():
        shutil.copy(f, folder / f"b_{f.name}")
    small = pydicom.dcmread(str(tmp_path / "b" / "slice000.dcm")).SeriesInstanceUID
    assert main(["segment", str(folder), "--test-engine", "-o", str(tmp_path / "o1")]) == 0
    err = capsys.readouterr().err
    assert "holds 2 series" in err and small in err and "--series" in err
    assert json.loads((tmp_path / "o1" / "report.json").read_text(encoding="utf-8"))["image"]["size_ijk"] == [128, 128, 12]
    assert main(["segment", str(folder), "--test-engine", "--series", small, "-o", str(tmp_path / "o2")]) == 0
    assert json.loads((tmp_path / "o2" / "report.json").read_text(encoding="utf-8"))["image"]["size_ijk"] == [128, 128, 6]
    assert main(["segment", str(folder), "--test-engine", "--series", "1.2.3"]) == 2
    assert "has no series 1.2.3" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["segment", str(tmp_path / "empty"), "--test-engine"]) == 2
    assert "without a DICOM series" in capsys.readouterr().err
