"""Around the user's work in the app: Close Scene and node removal (real slicer-core scenes), the client's copy."""

import ast
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import slicer
from slicer_standins import MODULE_DIR

from medsam2_backend.engine import DiskEngine
from MedSAM2SlicerLib.logic import InProcessBackend, MedSAM2SlicerLogic

SHAPE_KJI = (10, 24, 24)


class CountingBackend(InProcessBackend):
    def __init__(self):
        super().__init__(DiskEngine(radius=3, shrink=1))
        self.opened = 0

    def open_session(self, *args, **kwargs):
        self.opened += 1
        return super().open_session(*args, **kwargs)


def load_case(scene):
    """The same data, loaded the same way (as reopening a file would)."""
    volume = slicer.util.addVolumeFromArray(np.arange(np.prod(SHAPE_KJI), dtype=np.int16).reshape(SHAPE_KJI))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segment_id = segmentation.GetSegmentation().AddEmptySegment("liver", "liver")
    return volume, segmentation, segment_id


def prompt(logic, volume, segmentation, segment_id, x):
    logic.segment(volume, segmentation, segment_id, points_ras=[[x, 12.0, 4.0]], view="axial", propagate=False)


def watching_logic(scene):
    """A logic on a counting in-process backend that watches `scene` for closes and removals."""
    logic = MedSAM2SlicerLogic()
    backend = CountingBackend()
    logic.connect(engine=backend.engine)
    logic.controller.backend = backend
    logic.watch_scene(scene)
    return logic, backend


def test_close_scene_forgets_sessions_and_prompts_though_node_ids_are_reused(mrml):
    logic, backend = watching_logic(mrml)
    volume, segmentation, segment_id = load_case(mrml)
    ids = (volume.GetID(), segmentation.GetID())
    prompt(logic, volume, segmentation, segment_id, 6.0)
    mrml.Clear(0)  # File > Close Scene
    volume, segmentation, segment_id = load_case(mrml)
    assert (volume.GetID(), segmentation.GetID()) == ids  # MRML reuses the ids
    prompt(logic, volume, segmentation, segment_id, 18.0)
    assert len(logic.controller.prompts(volume, segment_id)) == 1  # the old point is not merged in
    assert backend.opened == 2
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)[4]
    assert mask[12, 18] and not mask[12, 6]  # only the new disk (an old object would add the old one too)


def test_removing_a_volume_forgets_its_sessions(mrml):
    logic, _backend = watching_logic(mrml)
    volume, segmentation, segment_id = load_case(mrml)
    prompt(logic, volume, segmentation, segment_id, 6.0)
    mrml.RemoveNode(segmentation)
    mrml.RemoveNode(volume)
    assert not logic.controller.prompts(volume, segment_id) and not logic.controller._sessions
    assert not logic._targets


# ---- two copies of the client (Slicer appends module folders to sys.path, after site-packages) -------------------
CLIENT = pathlib.Path(__file__).resolve().parents[2] / "backend" / "src" / "medsam2_client"


def _python(code: str, site: pathlib.Path) -> subprocess.CompletedProcess:
    """Run `code` with `site` (a stand-in site-packages) before the module folder on sys.path, as in Slicer; the
    source checkout's module folder only (Developer mode: add module path), not backend/src."""
    setup = f"import sys; sys.path[:0] = [{str(site)!r}]; sys.path.append({str(MODULE_DIR)!r})\n"
    return subprocess.run([sys.executable, "-c", setup + code], capture_output=True, encoding="utf-8", errors="replace", timeout=120)


@pytest.fixture
def other_site(tmp_path):
    """A site-packages with an older, different medsam2_client (no protocol.DIRECTIONS, say)."""
    (tmp_path / "medsam2_client").mkdir()
    (tmp_path / "medsam2_client" / "__init__.py").write_text("OLD = True\n")
    return tmp_path


def test_a_source_checkout_uses_its_own_client_not_an_older_one_first_on_the_path(other_site):
    done = _python("import MedSAM2SlicerLib.geometry, medsam2_client\n"
                   "from medsam2_client.protocol import DIRECTIONS\n"
                   "print(medsam2_client.__file__)", other_site)
    assert done.returncode == 0, done.stderr
    assert pathlib.Path(done.stdout.strip()).parent == CLIENT


def test_a_different_client_already_loaded_is_refused_with_a_sentence(other_site):
    done = _python("import medsam2_client\nimport MedSAM2SlicerLib", other_site)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("MedSAM2SlicerLib.client_copy.ClientCopyError: Another version of medsam2_client")
    assert "reinstall" in last


def test_the_same_client_already_loaded_is_fine(tmp_path):
    shutil.copytree(CLIENT, tmp_path / "medsam2_client", ignore=shutil.ignore_patterns("__pycache__"))
    done = _python("import medsam2_client\nimport MedSAM2SlicerLib.geometry\nprint('ok')", tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_effect_imports_the_library_before_the_client():
    tree = ast.parse((MODULE_DIR / "SegmentEditorMedSAM2Lib" / "SegmentEditorEffect.py").read_text(encoding="utf-8"))
    modules = [node.module for node in tree.body if isinstance(node, ast.ImportFrom)]
    first_client = min(i for i, m in enumerate(modules) if m.startswith("medsam2_client"))
    assert any(m.startswith("MedSAM2SlicerLib") for m in modules[:first_client])


def test_close_scene_cancels_a_propagation_running_in_the_background(mrml):
    logic = MedSAM2SlicerLogic()
    logic.connect(engine=DiskEngine())
    logic.watch_scene(mrml)
    cancelled = []
    logic.controller._run = type("Run", (), {"cancel": lambda self: cancelled.append(True)})()
    mrml.Clear(0)
    assert cancelled == [True]
