"""A real MRML scene with the Colors/Volumes/Segmentations logics, patched onto `slicer` for one test.

`slicer-core` gives the MRML and segmentation C++ without the app; `slicer.util`'s array helpers need
`slicer.mrmlScene` and `slicer.modules.<name>.logic()`, which the app would provide.
"""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
for path in (ROOT / "backend" / "src", ROOT / "MedSAM2Slicer"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import slicer  # noqa: E402  (after sys.path)


@pytest.fixture
def mrml(monkeypatch):
    """A fresh scene with module logics; yields the scene."""
    from MedSAM2SlicerLib.mrml_io import headless_scene

    scene, modules = headless_scene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "modules", modules, raising=False)
    yield scene
    scene.Clear(1)
