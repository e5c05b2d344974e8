"""The README's Python-console example, run verbatim after its headless preamble (the deterministic engine)."""

import pathlib
import re
import sys

import numpy as np
import slicer

ROOT = pathlib.Path(__file__).resolve().parents[2]


def readme_block(marker: str) -> str:
    """The ```python block that follows `<!-- README example: {marker} -->`."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- README example: {re.escape(marker)} -->\n```python\n(.*?)\n```", text, re.S)
    assert match, f"README has no block marked {marker!r}"
    return match.group(1)


def test_the_readme_console_example_runs_as_written(monkeypatch):
    from MedSAM2SlicerLib import logic as logic_module

    monkeypatch.chdir(ROOT)  # the preamble is run from the repository root
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(slicer, "mrmlScene", None, raising=False)  # restored afterwards; the preamble sets them
    monkeypatch.setattr(slicer, "modules", None, raising=False)
    monkeypatch.setattr(logic_module, "_shared_logic", None)
    preamble, example = readme_block("headless preamble"), readme_block("Slicer console")
    assert "headless_scene" not in example and "DiskEngine" not in example  # the example is the app's, unchanged
    namespace = {}
    try:
        exec(compile(preamble + "\n" + example, "README.md", "exec"), namespace)
        volume, segmentation, segment_id = namespace["volume"], namespace["segmentation"], namespace["segment_id"]
        assert volume.GetName() == "CTChest4"
        outcome = namespace["outcome"]
        assert outcome.slices_written == 34 and outcome.least_certain  # both ways through CTChest4's 34 slices
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume) > 0  # K, J, I
        # The ROI (60 x 50 mm, 1 mm thick, at the volume's centre) is the axial slice through the centre.
        center_ijk = np.linalg.inv(np.array(_ijk_to_ras(volume))) @ [*namespace["center"], 1.0]
        k = int(round(center_ijk[2]))
        rows, cols = np.nonzero(mask[k])
        spacing = volume.GetSpacing()
        assert abs((cols.max() - cols.min() + 1) * spacing[0] - 60) <= 2 * spacing[0]
        assert abs((rows.max() - rows.min() + 1) * spacing[1] - 50) <= 2 * spacing[1]
        # The deterministic engine's least certain slice is an empty one beyond the object, so the correction and
        # the re-propagation change no voxel; still, each action is its own undo step (issue 8 §3): the README's
        # Undo takes back the re-propagation only. Two more take back the correction, then the propagation.
        assert len(mask.any(axis=(1, 2)).nonzero()[0]) > 1 and mask[k].any()
        logic = namespace["logic"]
        logic.undo(segmentation)
        assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume) > 0, mask)
        logic.undo(segmentation)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume) > 0
        assert mask.any(axis=(1, 2)).nonzero()[0].tolist() == [k]
    finally:
        logic_module.shared_logic().close()


def _ijk_to_ras(volume):
    from MedSAM2SlicerLib import geometry

    return geometry.ijk_to_world_ras(volume)
