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
    assert len(result["montage_slices"]) == 12 and set(result["timings"]) >= {"start backend", "propagate both ways"}
