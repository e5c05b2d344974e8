"""`make demo`'s code path, with the server's deterministic test engine instead of SAM-2 (fast, exact voxels)."""

import numpy as np
import slicer
import slicerio

from MedSAM2SlicerLib import demo, geometry


def test_demo_writes_a_segmentation_on_the_volume_geometry_and_a_montage(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(slicer, "mrmlScene", None, raising=False)  # the demo sets its own headless scene
    monkeypatch.setattr(slicer, "modules", None, raising=False)
    result = demo.run_demo(tmp_path, test_engine=True, log=lambda text: None)
    assert not result["random_weights"] and result["model"]["checkpoint"] == "none"

    volume = slicerio.read_segmentation(slicerio.get_testdata_file("CTChest4.nrrd"))  # I, J, K with LPS geometry
    segmentation = slicerio.read_segmentation(str(result["segmentation"]))
    np.testing.assert_allclose(segmentation["ijkToLPS"], volume["ijkToLPS"], atol=1e-6)
    voxels = segmentation["voxels"]
    assert voxels.shape == volume["voxels"].shape == (128, 128, 34)
    assert [s["name"] for s in segmentation["segments"]] == ["MedSAM2"]

    # The box slice holds exactly the box: the corners' voxels (I, J 38..90) on K = 17, nothing else there.
    k = result["prompt_slice"]
    assert k == 17
    expected = np.zeros((128, 128), bool)
    expected[38:91, 38:91] = True
    assert np.array_equal(voxels[:, :, k] > 0, expected)
    corners_ijk = geometry.ras_to_ijk(result["box_ras"], np.diag([-1, -1, 1, 1]) @ np.asarray(volume["ijkToLPS"]))
    np.testing.assert_allclose(corners_ijk, [[38, 38, 17], [90, 90, 17]], atol=1e-6)
    assert result["slices_written"] == 34 and 0 < (voxels > 0).any(axis=(0, 1)).sum() <= 34

    with Image.open(result["montage"]) as montage:
        assert montage.size == (4 * 128 * 2, 3 * 128 * 2)
        sheet = np.asarray(montage.convert("RGB")).astype(int)
    shown = result["montage_slices"]
    assert len(shown) == 12 and k in shown and set(result["timings"]) >= {"start backend", "propagate both ways"}
    scale = demo.MONTAGE_SCALE

    def tile(n):
        row, col = divmod(n, demo.MONTAGE_COLUMNS)
        return sheet[row * 128 * scale:(row + 1) * 128 * scale, col * 128 * scale:(col + 1) * 128 * scale]

    def colour(image, rgb):
        return (image == np.array(rgb)).all(axis=-1)

    for n, slice_index in enumerate(shown):
        # Each tile: the slice as a view shows it (row J up), the mask's outline in red, its inside the plain CT.
        mask = np.kron(voxels[:, :, slice_index].T > 0, np.ones((scale, scale), bool))[::-1]
        image = tile(n)
        red = colour(image, demo.MASK_OUTLINE_RGB)
        assert np.array_equal(red & ~colour(image, demo.LABEL_RGB), red)
        if mask.any():
            inside = mask & ~demo.outline(mask)
            assert red[demo.outline(mask)].mean() > 0.9 and not red[inside].any()
            grey = image[inside]
            assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()  # not tinted
        assert colour(image[:20, :80], demo.LABEL_RGB).sum() > 10  # "slice N", top left
        assert colour(image, demo.PROMPT_RGB).any() == (slice_index == k)
    # The box prompt on its own tile: a green rectangle one pixel outside voxels 38..90 (I and J).
    green = colour(tile(shown.index(k)), demo.PROMPT_RGB)
    rows, cols = np.nonzero(green)
    lo, hi = 38 * scale - 1, 91 * scale
    top, bottom = (128 - 91) * scale - 1, (128 - 38) * scale
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (lo, hi, top, bottom)
    assert green[top, lo:hi + 1].all() and green[top:bottom + 1, hi].all()


def test_the_montage_says_so_when_the_masks_come_from_random_weights(tmp_path):
    from PIL import Image

    voxels = np.zeros((3, 40, 200), np.int16)
    mask = np.zeros_like(voxels)
    for note, path in ((None, tmp_path / "plain.png"), (demo.RANDOM_WEIGHTS_NOTE, tmp_path / "random.png")):
        demo.save_montage(voxels, mask, path, note=note)
    with Image.open(tmp_path / "plain.png") as plain, Image.open(tmp_path / "random.png") as random_weights:
        bottom = [np.asarray(image.convert("RGB"))[-20:].astype(int) for image in (plain, random_weights)]
    yellow = [(strip == np.array(demo.LABEL_RGB)).all(axis=-1).sum() for strip in bottom]
    assert yellow[0] == 0 and yellow[1] > 100
