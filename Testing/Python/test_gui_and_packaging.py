"""The thin GUI imports and sets up against stand-ins for qt/ctk/slicer.app; packaging lists stay true."""

import ast
import pathlib
import re
import sys
import types
import xml.etree.ElementTree as ET

import pytest
import slicer

import slicer_standins as standins  # this folder is on sys.path under pytest
from slicer_standins import MODULE_DIR, fire, gui_stubs  # noqa: F401  (gui_stubs: a fixture)

ROOT = MODULE_DIR.parent


def _ui_names():
    return {w.get("name") for w in ET.parse(MODULE_DIR / "Resources/UI/MedSAM2Slicer.ui").iter("widget")}


def test_module_registers_the_effect_at_startup(gui_stubs):
    import MedSAM2Slicer

    parent = ModuleParent()
    module = MedSAM2Slicer.MedSAM2Slicer(parent)
    assert module is not None and parent.title == "MedSAM2"
    assert slicer.app.connections[0] == ("startupCompleted()", MedSAM2Slicer.register_effect)
    MedSAM2Slicer.register_effect()
    path = pathlib.Path(gui_stubs[0])
    assert path == MODULE_DIR / "SegmentEditorMedSAM2Lib" / "SegmentEditorEffect.py" and path.is_file()
    classes = [n.name for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.ClassDef)]
    assert path.stem in classes  # the Segment Editor instantiates the class named like the file


class ModuleParent(standins.QObject):
    """qSlicerScriptedLoadableModule's `parent`: the properties a module sets."""

    PROPERTIES = {"title": "", "categories": [], "dependencies": [], "contributors": [], "helpText": "",
                  "acknowledgementText": ""}


def test_standins_refuse_names_qt_does_not_have(gui_stubs):
    import qt

    box = qt.QSpinBox()
    box.value = 3
    with pytest.raises(AttributeError):
        box.valu = 3  # a misspelled property fails instead of being swallowed
    with pytest.raises(AttributeError):
        box.setValueText("x")
    with pytest.raises(AttributeError):
        qt.QPushButton("x").connect("clickd()", print)
    with pytest.raises(AttributeError):
        qt.QWidgetThatDoesNotExist  # noqa: B018
    with pytest.raises(AttributeError):
        slicer.app.processEvent()  # noqa: B018


def test_widget_sets_up_and_every_ui_name_it_uses_exists(gui_stubs):
    import MedSAM2Slicer
    from MedSAM2SlicerLib import panel_settings

    names = _ui_names()
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE_DIR / "MedSAM2Slicer.py").read_text(encoding="utf-8")))
    used |= set(re.findall(r"\bui\.(\w+)", (MODULE_DIR / "MedSAM2Slicer.py").read_text(encoding="utf-8")))
    assert len(used) > 20 and used <= names, used - names

    def new_widget():  # QSettings' store survives the widget: a "restart" is a second widget reading it
        widget = MedSAM2Slicer.MedSAM2SlicerWidget()
        widget.setup()
        return widget

    widget = new_widget()
    assert widget.logic is MedSAM2Slicer.shared_logic()
    assert widget.panelSettings() == panel_settings.SETTINGS_DEFAULTS  # first start: the defaults
    assert widget.logic.preprocessing == {"preset": "soft_tissue"}
    assert widget.ui.localGroupBox.visible and not widget.ui.remoteGroupBox.visible
    widget.ui.intensityModeComboBox.currentIndex = 1  # CT window (level / width): the signal updates the logic
    widget.ui.windowLevelSpinBox.setRange(-2000, 2000)
    widget.ui.windowWidthSpinBox.setRange(1, 5000)
    widget.ui.windowLevelSpinBox.value, widget.ui.windowWidthSpinBox.value = -600.0, 1500.0
    assert widget.logic.preprocessing == {"level": -600.0, "width": 1500.0}
    assert not widget.ui.ctPresetComboBox.enabled and widget.ui.windowLevelSpinBox.enabled
    widget.ui.backendComboBox.currentIndex = 1
    from MedSAM2SlicerLib.local_backend import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    widget.ui.serverUrlLineEdit.text = url
    assert widget.ui.remoteGroupBox.visible and not widget.ui.localGroupBox.visible
    widget.saveSettings()
    assert set(standins.QSettings.store) == {f"MedSAM2/{key}" for key in panel_settings.SETTINGS_DEFAULTS}

    restarted = new_widget()
    settings = restarted.panelSettings()
    assert (settings["backend"], settings["serverUrl"], settings["intensityMode"], settings["windowLevel"]) == (
        "remote", url, "ct_window", -600.0)
    assert restarted.logic.preprocessing == {"level": -600.0, "width": 1500.0}
    restarted.ui.intensityModeComboBox.currentIndex = 2  # MR / other
    assert restarted.logic.preprocessing is None  # the backend's default 0.5-99.5 percentiles
    restarted.ui.percentileLowSpinBox.value = 1.0
    assert restarted.logic.preprocessing == {"percentiles": [1.0, 99.5]}
    fire(restarted.ui.testConnectionButton, "clicked()")  # remote, not connected: connects, refused: a sentence
    assert f"No MedSAM2 server answers at {url}" in restarted.ui.statusLabel.text
    restarted.cleanup()


def test_test_connection_shows_the_servers_lists_and_keeps_the_choice(gui_stubs):
    import MedSAM2Slicer

    from medsam2_backend.engine import DiskEngine
    from MedSAM2SlicerLib.logic import InProcessBackend

    class ReportingBackend(InProcessBackend):
        def capabilities(self):
            return {"engine": self.engine.describe(), "preprocessing": {"ct_presets": ["liver", "soft_tissue"]},
                    "precisions": ["fp32"]}

    widget = MedSAM2Slicer.MedSAM2SlicerWidget()
    widget.setup()
    combo = widget.ui.ctPresetComboBox
    assert combo.currentText == "soft_tissue" and combo.count == len(MedSAM2Slicer.panel_settings.CT_PRESETS)
    widget.logic.connect(engine=DiskEngine())
    widget.logic.controller.backend = ReportingBackend(DiskEngine())
    fire(widget.ui.testConnectionButton, "clicked()")
    assert [combo.itemText(i) for i in range(combo.count)] == ["liver", "soft_tissue"]
    assert combo.currentText == "soft_tissue" and widget.logic.preprocessing == {"preset": "soft_tissue"}
    assert [widget.ui.precisionComboBox.itemText(i) for i in range(widget.ui.precisionComboBox.count)] == [
        "auto", "fp32"]
    widget.cleanup()


def test_effect_imports_and_builds_its_options(gui_stubs, mrml):  # the app always has a scene
    import qt
    from SegmentEditorMedSAM2Lib import SegmentEditorEffect

    scripted = standins.ScriptedEffect()
    effect = SegmentEditorEffect(scripted)
    assert scripted.name == "MedSAM2" and effect.scriptedEffect is scripted
    effect.setupOptionsFrame()
    for name, kind in (("directionComboBox", qt.QComboBox), ("rangeStartSpinBox", qt.QSpinBox),
                       ("rangeStopSpinBox", qt.QSpinBox), ("stopAfterEmptySpinBox", qt.QSpinBox),
                       ("propagateButton", qt.QPushButton), ("cancelButton", qt.QPushButton),
                       ("progressBar", qt.QProgressBar), ("uncertainList", qt.QListWidget)):
        assert isinstance(getattr(effect, name), kind), name
    assert effect.rangeStartSpinBox.value == -1 and effect.rangeStopSpinBox.specialValueText == "last"
    assert "Propagate" in effect.helpText()
    effect.clone()
    assert gui_stubs[-1].endswith("SegmentEditorMedSAM2Lib/SegmentEditorEffect.py")
    effect.cleanup()  # disconnects without error
    assert not standins.connected(effect.propagateButton, "clicked()")
    SegmentEditorEffect(standins.ScriptedEffect()).cleanup()  # and is harmless before setupOptionsFrame


def test_library_never_imports_qt_ctk_or_the_app():
    for path in (MODULE_DIR / "MedSAM2SlicerLib").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"qt", "ctk", "SegmentEditorEffects"}, path
        assert "slicer.app" not in path.read_text(encoding="utf-8"), path


def test_cmake_lists_every_python_file_and_resource():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "MedSAM2Slicer")
    listed = set(re.findall(r"^\s+(\S+\.(?:py|png|ui))\s*$", cmake, re.M))
    client_listed = {p for p in listed if p.startswith("medsam2_client/")}
    engine_listed = {p for p in listed if p.startswith("medsam2_backend/")}  # the self-test's engine (below)
    on_disk = {str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*")
               if p.suffix in (".py", ".png", ".ui") and "__pycache__" not in p.parts}
    assert listed - client_listed - engine_listed == on_disk
    # The client ships from its one copy in backend/src (no second copy in the module to keep in step).
    client_dir = ROOT / "backend" / "src"
    assert client_listed == {str(p.relative_to(client_dir)) for p in (client_dir / "medsam2_client").glob("*.py")}
    assert re.search(r"SOURCE_DIR \$\{PROJECT_SOURCE_DIR\}/backend/src\s", cmake)
    assert not list(MODULE_DIR.rglob("medsam2_client"))
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', top), key
    assert "add_subdirectory(MedSAM2Slicer)" in top and "${Slicer_EXTENSION_CPACK}" in top


def test_extensions_index_entry_is_complete():
    import json

    entry = json.loads((ROOT / "MedSAM2Slicer.json").read_text(encoding="utf-8"))
    assert entry["category"] == "Segmentation"
    assert entry["scm_url"].endswith(".git") and entry["scm_revision"]
    assert entry["build_dependencies"] == ["PyTorch"]  # the PyTorch extension installs torch for the GPU driver


def test_the_self_test_engine_ships_with_everything_it_imports_at_load_and_nothing_slicer_lacks():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    block = re.search(r"set\(MEDSAM2_TEST_ENGINE_PYTHON_SCRIPTS\n(.*?)\)", cmake, re.S).group(1)
    shipped = set(block.split())
    src = ROOT / "backend" / "src"
    # Slicer's Python, and medsam2_client: the extension always ships it (MEDSAM2_CLIENT_PYTHON_SCRIPTS).
    slicers_python = {"numpy", "scipy", "PIL", "__future__", "abc", "dataclasses", "threading", "typing",
                      "medsam2_client"}
    for relative in shipped:
        path = src / relative
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # module level: what runs at import (load_engine imports SAM-2 lazily, inside)
            if isinstance(node, ast.Import):
                assert {a.name.split(".")[0] for a in node.names} <= slicers_python, (relative, ast.dump(node))
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in slicers_python, (relative, node.module)
            elif isinstance(node, ast.ImportFrom):
                target = f"{pathlib.PurePosixPath(relative).parent}/{node.module}.py"
                assert target in shipped, (relative, target)
    assert re.search(r"DESTINATION_DIR .*/MedSAM2SlicerTesting\n", cmake)
    module = (MODULE_DIR / "MedSAM2Slicer.py").read_text(encoding="utf-8")
    assert '"MedSAM2SlicerTesting"' in module and "sys.path.append(TEST_ENGINE_DIR)" in module


def test_the_in_app_self_test_runs_its_scenarios_headless(gui_stubs, mrml):
    import MedSAM2Slicer

    engine_class = MedSAM2Slicer.self_test_engine_class()
    MedSAM2Slicer.MedSAM2SlicerTest().test_scenarios(engine_class)  # the effect part needs the app's widgets
