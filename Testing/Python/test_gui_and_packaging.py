"""The thin GUI imports and sets up against stand-ins for qt/ctk/slicer.app; packaging lists stay true."""

import ast
import pathlib
import re
import sys
import types
import xml.etree.ElementTree as ET

import pytest
import slicer

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "MedSAM2Slicer"


class Stub:
    """Any attribute, any call, any assignment: enough of a Qt widget / app for setup code to run."""

    def __init__(self, *args, **kwargs):
        self.calls = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Stub()

    def __call__(self, *args, **kwargs):
        self.calls.append(args)
        return Stub()


class RecordingApp(Stub):
    def __init__(self):
        super().__init__()
        self.connections = []

    def connect(self, signal, slot):
        self.connections.append((signal, slot))


def _stub_module(name, **attrs):
    module = types.ModuleType(name)
    module.__getattr__ = lambda attr: Stub
    module.__dict__.update(attrs)
    return module


@pytest.fixture
def gui_stubs(monkeypatch):
    """Fake `qt`, `ctk`, `slicer.app`, `slicer.ScriptedLoadableModule`, SegmentEditorEffects and the effects module."""
    registered = []

    class ScriptedEffect(Stub):
        def setPythonSource(self, path):
            """As qSlicerSegmentEditorScriptedEffect::setPythonSource: module = the file's folder name, class = its
            base name (+ "Effect"); `PyImport_AddModule(module)` (an empty module when none is imported), and
            `<module>.<class>` is instantiated when it exists, else the file is executed into that module. Executing
            it over an imported package with other content (e.g. MedSAM2SlicerLib) would clobber it: refused here."""
            folder, base = pathlib.PurePosixPath(path).parent.name, pathlib.PurePosixPath(path).stem
            class_name = base if base.endswith("Effect") else base + "Effect"
            module = sys.modules.setdefault(folder, types.ModuleType(folder))
            if not isinstance(getattr(module, class_name, None), type):
                assert set(vars(module)) <= {"__name__", "__doc__", "__package__", "__loader__", "__spec__"}, (
                    f"Slicer would execute {path} over the imported package {folder}")
                exec(compile(pathlib.Path(path).read_text(), path, "exec"), vars(module))
            assert isinstance(getattr(module, class_name, None), type), f"{folder}.{class_name} is not a class"
            registered.append(path)

        def self(self):
            return Stub()

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.layout = Stub()

        def setup(self):
            pass

        def resourcePath(self, relative):
            return str(MODULE_DIR / "Resources" / relative)

    class AbstractScriptedSegmentEditorEffect:
        def __init__(self, scriptedEffect):
            self.scriptedEffect = scriptedEffect

        def xyToRas(self, xy, viewWidget):  # the real one goes through scriptedEffect.xyToRas(QPoint, sliceWidget)
            return [float(xy[0]), float(xy[1]), 7.0]

    loadable = _stub_module(
        "slicer.ScriptedLoadableModule",
        ScriptedLoadableModule=type("ScriptedLoadableModule", (), {"__init__": lambda self, parent: None}),
        ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget,
        ScriptedLoadableModuleTest=type("ScriptedLoadableModuleTest", (), {}))
    i18n = types.ModuleType("slicer.i18n")  # strict: only what Slicer's i18n has that the code uses
    i18n.tr, i18n.translate = (lambda text: text), (lambda context, text: text)
    monkeypatch.setattr(slicer, "i18n", i18n, raising=False)  # slicer.i18n exists only in the app
    for name, module in {
        "qt": _stub_module("qt"), "ctk": _stub_module("ctk"), "slicer.i18n": i18n,
        "slicer.ScriptedLoadableModule": loadable,
        "SegmentEditorEffects": _stub_module(
            "SegmentEditorEffects", AbstractScriptedSegmentEditorEffect=AbstractScriptedSegmentEditorEffect),
        "qSlicerSegmentationsEditorEffectsPythonQt": _stub_module(
            "qSlicerSegmentationsEditorEffectsPythonQt", qSlicerSegmentEditorScriptedEffect=ScriptedEffect),
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", loadable, raising=False)
    monkeypatch.setattr(slicer, "app", RecordingApp(), raising=False)
    monkeypatch.delitem(sys.modules, "MedSAM2Slicer", raising=False)
    monkeypatch.delitem(sys.modules, "SegmentEditorMedSAM2Lib", raising=False)
    monkeypatch.delitem(sys.modules, "SegmentEditorMedSAM2Lib.SegmentEditorEffect", raising=False)
    yield registered


def _ui_names():
    return {w.get("name") for w in ET.parse(MODULE_DIR / "Resources/UI/MedSAM2Slicer.ui").iter("widget")}


def test_module_registers_the_effect_at_startup(gui_stubs):
    import MedSAM2Slicer

    module = MedSAM2Slicer.MedSAM2Slicer(Stub())
    assert module is not None
    assert slicer.app.connections == [("startupCompleted()", MedSAM2Slicer.register_effect)]
    MedSAM2Slicer.register_effect()
    path = pathlib.Path(gui_stubs[0])
    assert path == MODULE_DIR / "SegmentEditorMedSAM2Lib" / "SegmentEditorEffect.py" and path.is_file()
    classes = [n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)]
    assert path.stem in classes  # the Segment Editor instantiates the class named like the file


def test_widget_sets_up_and_every_ui_name_it_uses_exists(gui_stubs, monkeypatch):
    import MedSAM2Slicer
    from MedSAM2SlicerLib import panel_settings

    names = _ui_names()
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE_DIR / "MedSAM2Slicer.py").read_text()))
    used |= set(re.findall(r"\bui\.(\w+)", (MODULE_DIR / "MedSAM2Slicer.py").read_text()))
    assert len(used) > 20 and used <= names, used - names
    store = {}  # QSettings survives the widget: a "restart" is a second widget reading the same store

    class FakeSettings:
        def value(self, key):
            return store.get(key)

        def setValue(self, key, value):
            store[key] = value

    monkeypatch.setattr(sys.modules["qt"], "QSettings", FakeSettings, raising=False)
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: Stub(), raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables",
                        lambda panel: types.SimpleNamespace(**{n: Stub() for n in names}), raising=False)

    def new_widget():
        widget = MedSAM2Slicer.MedSAM2SlicerWidget()
        widget.setup()
        return widget

    widget = new_widget()
    assert widget.logic is MedSAM2Slicer.shared_logic()
    assert widget.panelSettings() == panel_settings.SETTINGS_DEFAULTS  # first start: the defaults
    assert widget.logic.preprocessing == {"preset": "soft_tissue"}
    assert widget.ui.localGroupBox.visible and not widget.ui.remoteGroupBox.visible
    widget.ui.intensityModeComboBox.currentIndex = 1  # CT window (level / width)
    widget.ui.windowLevelSpinBox.value, widget.ui.windowWidthSpinBox.value = -600.0, 1500.0
    widget.onPreprocessingChanged()
    assert widget.logic.preprocessing == {"level": -600.0, "width": 1500.0}
    assert not widget.ui.ctPresetComboBox.enabled and widget.ui.windowLevelSpinBox.enabled
    widget.ui.backendComboBox.currentIndex = 1
    from MedSAM2SlicerLib.local_backend import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    widget.ui.serverUrlLineEdit.text = url
    widget.onBackendChanged()
    assert widget.ui.remoteGroupBox.visible and not widget.ui.localGroupBox.visible
    widget.saveSettings()
    assert set(store) == {f"MedSAM2/{key}" for key in panel_settings.SETTINGS_DEFAULTS}

    restarted = new_widget()
    settings = restarted.panelSettings()
    assert (settings["backend"], settings["serverUrl"], settings["intensityMode"], settings["windowLevel"]) == (
        "remote", url, "ct_window", -600.0)
    assert restarted.logic.preprocessing == {"level": -600.0, "width": 1500.0}
    restarted.ui.intensityModeComboBox.currentIndex = 2  # MR / other
    restarted.onPreprocessingChanged()
    assert restarted.logic.preprocessing is None  # the backend's default 0.5-99.5 percentiles
    restarted.ui.percentileLowSpinBox.value = 1.0
    restarted.onPreprocessingChanged()
    assert restarted.logic.preprocessing == {"percentiles": [1.0, 99.5]}
    restarted.onTestConnection()  # remote, not connected yet: connects, then the refused connection is a sentence
    assert f"No MedSAM2 server answers at {url}" in restarted.ui.statusLabel.text
    restarted.logic.close()


def test_effect_imports_and_builds_its_options(gui_stubs):
    from SegmentEditorMedSAM2Lib import SegmentEditorEffect

    scripted = Stub()
    effect = SegmentEditorEffect(scripted)
    assert scripted.name == "MedSAM2" and effect.scriptedEffect is scripted
    effect.setupOptionsFrame()
    for name in ("directionComboBox", "rangeStartSpinBox", "rangeStopSpinBox", "stopAfterEmptySpinBox",
                 "propagateButton", "cancelButton", "progressBar", "uncertainList"):
        assert isinstance(getattr(effect, name), Stub), name
    assert effect.rangeStartSpinBox.value == -1 and effect.rangeStopSpinBox.specialValueText == "last"
    assert "Propagate" in effect.helpText()
    effect.clone()
    assert gui_stubs[-1].endswith("SegmentEditorMedSAM2Lib/SegmentEditorEffect.py")



class FakeInteractor:
    """The vtkRenderWindowInteractor calls the effect makes (GetEventPosition, Get{Control,Shift,Alt}Key)."""

    def __init__(self, xy, control=False, shift=False, alt=False):
        self.xy, self.control, self.shift, self.alt = xy, control, shift, alt

    def GetEventPosition(self):
        return self.xy

    def GetControlKey(self):
        return int(self.control)

    def GetShiftKey(self):
        return int(self.shift)

    def GetAltKey(self):
        return int(self.alt)


class FakeSliceWidget(Stub):
    def className(self):
        return "qMRMLSliceWidget"

    def sliceLogic(self):
        import vtk

        return types.SimpleNamespace(GetSliceNode=lambda: types.SimpleNamespace(GetSliceToRAS=vtk.vtkMatrix4x4))


def test_effect_turns_clicks_and_drags_into_prompts(gui_stubs, mrml):  # mrml: the app always has a scene
    import vtk
    from SegmentEditorMedSAM2Lib import SegmentEditorEffect

    class ScriptedEffect(Stub):
        NotConfirmed, ConfirmedWithoutDialog, ConfirmedWithDialog = 0, 1, 2
        answer = 1

        def confirmCurrentSegmentVisible(self):
            return self.answer

    scripted = ScriptedEffect()
    effect = SegmentEditorEffect(scripted)
    effect.setupOptionsFrame()
    prompts = []

    def fake_run(action):
        controller = types.SimpleNamespace(add_prompt=lambda volume, target, segment, **kw: prompts.append(kw))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys.modules[SegmentEditorEffect.__module__], "EffectTarget", lambda scripted: None)
            action(controller, "volume", "segment")

    effect._run = fake_run
    view, press, release = FakeSliceWidget(), vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.LeftButtonReleaseEvent
    three_d = Stub()
    three_d.className = lambda: "qMRMLThreeDWidget"
    assert effect.processInteractionEvents(FakeInteractor((10, 20)), press, three_d) is False  # slice views only
    assert effect.processInteractionEvents(FakeInteractor((10, 20)), press, view) is True  # aborts window/level
    assert effect.processInteractionEvents(FakeInteractor((11, 21)), release, view) is True
    assert prompts[-1]["points_ras"] == [[11.0, 21.0, 7.0]] and prompts[-1]["labels"] == [1]
    assert prompts[-1]["slice_to_ras"].shape == (4, 4)
    effect.processInteractionEvents(FakeInteractor((10, 20), control=True), press, view)
    effect.processInteractionEvents(FakeInteractor((10, 20), control=True), release, view)
    assert prompts[-1]["labels"] == [0]  # Ctrl+click: a negative point
    effect.processInteractionEvents(FakeInteractor((10, 20)), press, view)
    effect.processInteractionEvents(FakeInteractor((40, 60)), release, view)
    assert prompts[-1]["box_corners_ras"] == [[10.0, 20.0, 7.0], [40.0, 60.0, 7.0]]
    count = len(prompts)
    assert effect.processInteractionEvents(FakeInteractor((10, 20), alt=True), press, view) is False
    assert effect.processInteractionEvents(FakeInteractor((10, 20)), release, view) is False
    scripted.answer = ScriptedEffect.NotConfirmed  # hidden segment, user said no
    assert effect.processInteractionEvents(FakeInteractor((10, 20)), press, view) is True
    assert effect.processInteractionEvents(FakeInteractor((10, 20)), release, view) is False
    assert len(prompts) == count
    effect.cleanup()  # disconnects without error
    SegmentEditorEffect(Stub()).cleanup()  # and is harmless before setupOptionsFrame

def test_library_never_imports_qt_ctk_or_the_app():
    for path in (MODULE_DIR / "MedSAM2SlicerLib").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"qt", "ctk", "SegmentEditorEffects"}, path
        assert "slicer.app" not in path.read_text(), path


def test_cmake_lists_every_python_file_and_resource():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "MedSAM2Slicer")
    listed = set(re.findall(r"^\s+(\S+\.(?:py|png|ui))\s*$", cmake, re.M))
    client_listed = {p for p in listed if p.startswith("medsam2_client/")}
    on_disk = {str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*")
               if p.suffix in (".py", ".png", ".ui") and "__pycache__" not in p.parts}
    assert listed - client_listed == on_disk
    # The client ships from its one copy in backend/src (no second copy in the module to keep in step).
    client_dir = ROOT / "backend" / "src"
    assert client_listed == {str(p.relative_to(client_dir)) for p in (client_dir / "medsam2_client").glob("*.py")}
    assert re.search(r"SOURCE_DIR \$\{PROJECT_SOURCE_DIR\}/backend/src\s", cmake)
    assert not list(MODULE_DIR.rglob("medsam2_client"))
    top = (ROOT / "CMakeLists.txt").read_text()
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', top), key
    assert "add_subdirectory(MedSAM2Slicer)" in top and "${Slicer_EXTENSION_CPACK}" in top


def test_extensions_index_entry_is_complete():
    import json

    entry = json.loads((ROOT / "MedSAM2Slicer.json").read_text())
    assert entry["category"] == "Segmentation"
    assert entry["scm_url"].endswith(".git") and entry["scm_revision"]
    assert entry["build_dependencies"] == ["PyTorch"]  # the PyTorch extension installs torch for the GPU driver
