"""The command line with SAM-2 (random weights): a NRRD in, a .seg.nrrd on the same grid out; bad input is one
sentence, no traceback. Every format and prompt kind is tested with the test engine in test_batch_formats."""

import json

import nrrd
import numpy as np
import slicerio

from synthetic_volumes import blob_volume
from medsam2_backend.cli import main


def test_segment_writes_seg_nrrd_on_the_volume_grid(tmp_path, capsys):
    vol = np.moveaxis(blob_volume((4, 32, 40)), 0, 2)  # I, J, K with K the slice axis
    header = {"space": "left-posterior-superior", "space directions": np.diag([-0.8, -0.8, 2.5]),
              "space origin": np.array([10.0, 20.0, -30.0])}
    nrrd.write(str(tmp_path / "ct.nrrd"), vol, header)
    code = main(["segment", str(tmp_path / "ct.nrrd"), "--out", str(tmp_path / "out"), "--random-weights",
                 "--preset", "soft_tissue", "--slice", "1", "--box", "5", "5", "30", "25"])
    assert code == 0
    seg = slicerio.read_segmentation(str(tmp_path / "out" / "ct.seg.nrrd"))
    assert seg["voxels"].shape == (32, 40, 4)
    np.testing.assert_allclose(seg["ijkToLPS"][:3, :3], np.diag([-0.8, -0.8, 2.5]))
    np.testing.assert_allclose(seg["ijkToLPS"][:3, 3], [10, 20, -30])
    assert seg["segments"][0]["name"] == "MedSAM2 (random weights)"
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    obj = report["objects"][0]
    assert obj["axis"] == "k" and obj["steps"] == [{"slice_index": 1, "box": [5, 5, 30, 25]}]
    assert obj["voxels"] == int((seg["voxels"] > 0).sum())
    assert "RANDOM WEIGHTS" in capsys.readouterr().err


def test_bad_input_is_one_sentence(tmp_path, capsys):
    assert main(["segment", str(tmp_path / "missing.nrrd"), "--random-weights"]) == 2
    err = capsys.readouterr().err
    assert "missing.nrrd" in err and "Traceback" not in err
    vol = np.zeros((8, 8, 3), np.int16)
    nrrd.write(str(tmp_path / "v.nrrd"), vol, {"space": "left-posterior-superior",
                                               "space directions": np.eye(3), "space origin": np.zeros(3)})
    assert main(["segment", str(tmp_path / "v.nrrd"), "--random-weights", "--box", "5", "5", "2", "2"]) == 2
    assert "reversed" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "v.nrrd")]) == 2
    assert "--random-weights" in capsys.readouterr().err
