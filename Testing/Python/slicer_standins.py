"""Strict stand-ins for the Qt layer of Slicer: `slicer.app`, the scripted-effect and module bases and the
`gui_stubs` fixture, which installs them with `qt` (`qt_standins`) and `slicer_util_standins` (slicer.i18n,
slicer.util's dialogs, qMRMLNodeComboBox).

Names and signatures are checked against Slicer 5.10's `qSlicerSegmentEditorAbstractEffect.h`,
`AbstractScriptedSegmentEditorEffect.py` and `qSlicerApplication`. Anything else raises AttributeError: a misspelled
Qt or Slicer name fails the test. MRML, VTK and segmentation objects are the real ones from slicer-core, never
stand-ins. The Qt helpers tests use (`fire`, `run_timers`, `connected`, ...) are re-exported from `qt_standins`.
"""

from __future__ import annotations

import pathlib
import sys
import types

import pytest
import slicer
from qt_standins import (QApplication, QClipboard, QObject, QPoint, QSettings, QTimer,  # noqa: F401 (re-exported)
                         QVBoxLayout, QWidget, clipboard_text, connected, fire, qt_module, run_timers,
                         signals_blocked, ui_widgets)

MODULE_DIR = pathlib.Path(__file__).resolve().parents[2] / "MedSAM2Slicer"


class SlicerApp:
    """`slicer.app` (qSlicerApplication): the calls the extension makes, and nothing else."""

    def __init__(self, startup_environment=None):
        self.connections = []
        self.pending_events = []  # callables a test queues as "user events", delivered by processEvents
        self._startup_environment = dict(startup_environment or {})
        self.applicationVersion = "5.10.0"  # QCoreApplication's Q_PROPERTY (Slicer's WebServer module reads it)

    @staticmethod
    def translate(context, text):
        """QCoreApplication::translate, as slicer.i18n calls it: no translation is installed here."""
        return text

    def connect(self, signal, slot):
        if signal not in ("startupCompleted()", "aboutToQuit()"):
            raise AttributeError(f"qSlicerApplication has no signal {signal!r}")
        self.connections.append((signal, slot))

    def processEvents(self):
        events, self.pending_events = self.pending_events, []
        for event in events:
            event()

    def startupEnvironment(self):
        """A QProcessEnvironment: PythonQt gives it `keys()` and `value(name)` (slicer.util reads just those)."""
        env = self._startup_environment
        return types.SimpleNamespace(keys=lambda: list(env), value=lambda name: env[name])


class ScriptedEffect(QObject):
    """`qSlicerSegmentEditorScriptedEffect` as the effect uses it, writing through a real editor logic.

    `parameterSetNode()` is a real vtkMRMLSegmentEditorNode; writes go to vtkSlicerSegmentEditorLogic, which
    Slicer >= 5.10's `modifySelectedSegmentByLabelmap` calls with the parameter node's selection.
    """

    PROPERTIES = {"name": "", "title": "", "perSegment": False, "requireSegments": True,
                  "showEffectCursorInSliceView": True}
    NotConfirmed, ConfirmedWithoutDialog, ConfirmedWithDialog = 0, 1, 2

    def __init__(self, editor_logic=None, confirm=1):
        super().__init__()
        object.__setattr__(self, "_logic", editor_logic)
        object.__setattr__(self, "_confirm", confirm)
        object.__setattr__(self, "_undo_states", 0)
        object.__setattr__(self, "_options", [])

    def parameterSetNode(self):
        return self._logic.GetSegmentEditorNode() if self._logic is not None else None

    def addOptionsWidget(self, widget):
        self._options.append(widget)

    def addLabeledOptionsWidget(self, label, widget):
        self._options.append((label, widget))
        return QWidget()

    def confirmCurrentSegmentVisible(self):
        return self._confirm

    def saveStateForUndo(self):
        self._logic.SaveStateForUndo()
        object.__setattr__(self, "_undo_states", self._undo_states + 1)

    def referenceGeometryImage(self):
        return self._logic.GetReferenceGeometryImage()

    def modifySelectedSegmentByLabelmap(self, labelmap, mode, extent, bypassMasking=False):
        assert isinstance(extent, list) and len(extent) == 6, "the QList<int> overload takes a list of 6"
        node = self.parameterSetNode()
        logic_modes = slicer.vtkSlicerSegmentEditorLogic  # the C++ static_casts the effect's enum to the logic's
        mode = {AbstractEffectEnums.ModificationModeAdd: logic_modes.ModificationModeAdd,
                AbstractEffectEnums.ModificationModeRemove: logic_modes.ModificationModeRemove}[mode]
        self._logic.ModifySegmentByLabelmap(node.GetSegmentationNode(), node.GetSelectedSegmentID(), labelmap,
                                            mode, extent, True, bypassMasking)

    def modifySegmentByLabelmap(self, segmentationNode, segmentID, labelmap, mode, bypassMasking=False):
        """The Q_INVOKABLE (node, segment id, labelmap, mode[, bypassMasking]) overload of
        qSlicerSegmentEditorAbstractEffect.h (5.10): any segment, over the labelmap's own extent."""
        logic_modes = slicer.vtkSlicerSegmentEditorLogic
        mode = {AbstractEffectEnums.ModificationModeAdd: logic_modes.ModificationModeAdd,
                AbstractEffectEnums.ModificationModeRemove: logic_modes.ModificationModeRemove}[mode]
        self._logic.ModifySegmentByLabelmap(segmentationNode, segmentID, labelmap, mode,
                                            list(labelmap.GetExtent()), True, bypassMasking)

    def xyToRas(self, point, viewWidget):
        """As qSlicerSegmentEditorAbstractEffect::xyToRas: XYToRAS of the view's slice node."""
        xy_to_ras = viewWidget.sliceLogic().GetSliceNode().GetXYToRAS()
        ras = [0.0, 0.0, 0.0, 1.0]
        xy_to_ras.MultiplyPoint([point.x(), point.y(), 0.0, 1.0], ras)
        return types.SimpleNamespace(x=lambda: ras[0], y=lambda: ras[1], z=lambda: ras[2])

    def cursorOff(self, viewWidget):
        pass

    # Effect parameters, as qSlicerSegmentEditorAbstractEffect.cxx (5.10): "<effect name>.<name>" attributes of the
    # parameter set node; the int overloads store QString::number(value); a getter falls back to the common name.
    def parameter(self, name):
        node = self.parameterSetNode()
        if node is None:
            return ""
        value = node.GetAttribute(f"{self.name}.{name}")
        value = node.GetAttribute(name) if value is None else value
        return "" if value is None else value

    def parameterDefined(self, name):
        node = self.parameterSetNode()
        return node is not None and bool(node.GetAttribute(f"{self.name}.{name}"))

    def setParameter(self, name, value):
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise TypeError(f"setParameter({name!r}, {value!r}): the code uses the QString and int overloads only")
        node = self.parameterSetNode()
        old, value = node.GetAttribute(f"{self.name}.{name}"), str(value)
        if (old is None and not value) or value == (old or ""):
            return
        disabled = node.GetDisableModifiedEvent()
        node.SetDisableModifiedEvent(1)
        node.SetAttribute(f"{self.name}.{name}", value)
        node.SetDisableModifiedEvent(disabled)
        node.InvokeCustomModifiedEvent(slicer.vtkMRMLSegmentEditorNode.EffectParameterModified)

    def setParameterDefault(self, name, value):
        if not self.parameterDefined(name):
            self.setParameter(name, value)

    def cursorOn(self, viewWidget):
        pass


class AbstractEffectEnums:
    """`slicer.qSlicerSegmentEditorAbstractEffect`: only its ModificationMode enum is used (as Slicer's effects)."""

    ModificationModeSet, ModificationModeAdd, ModificationModeRemove, ModificationModeRemoveAll = 0, 1, 2, 3


class SliceWidget:
    """A `qMRMLSliceWidget`: className() and sliceLogic() (a real vtkMRMLSliceLogic on a real slice node)."""

    def __init__(self, slice_logic):
        self._slice_logic = slice_logic

    def className(self):
        return "qMRMLSliceWidget"

    def sliceLogic(self):
        return self._slice_logic


class ThreeDWidget:
    def className(self):
        return "qMRMLThreeDWidget"


class AbstractScriptedSegmentEditorEffect:
    """SegmentEditorEffects.AbstractScriptedSegmentEditorEffect (Slicer 5.10): the members effects inherit."""

    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

    def register(self):
        pass

    def cleanup(self):
        pass

    def xyToRas(self, xy, viewWidget):
        ras = self.scriptedEffect.xyToRas(sys.modules["qt"].QPoint(xy[0], xy[1]), viewWidget)
        return [ras.x(), ras.y(), ras.z()]


class ModuleParent(QObject):
    """qSlicerScriptedLoadableModule's `parent`: the properties a module sets."""

    PROPERTIES = {"title": "", "categories": [], "dependencies": [], "contributors": [], "helpText": "",
                  "acknowledgementText": ""}


class ScriptedLoadableModuleWidget:
    """slicer.ScriptedLoadableModule.ScriptedLoadableModuleWidget: what the panel uses of it."""

    def __init__(self, parent=None):
        self.parent = parent
        self.layout = QVBoxLayout()

    def setup(self):
        pass

    def resourcePath(self, relative):
        return str(MODULE_DIR / "Resources" / relative)


class ScriptedLoadableModuleTest:
    def delayDisplay(self, message, msec=None):
        print(message)


@pytest.fixture
def gui_stubs(monkeypatch):
    """Strict `qt`, `slicer.app`, `slicer.ScriptedLoadableModule`, SegmentEditorEffects and the effects module;
    yields the paths registered as effects."""
    registered = []

    class RegisteringScriptedEffect(ScriptedEffect):
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
                exec(compile(pathlib.Path(path).read_text(encoding="utf-8"), path, "exec"), vars(module))
            assert isinstance(getattr(module, class_name, None), type), f"{folder}.{class_name} is not a class"
            object.__setattr__(self, "_python_self", getattr(module, class_name)(self))
            registered.append(path)

        def self(self):
            return self._python_self

    loadable = types.ModuleType("slicer.ScriptedLoadableModule")
    loadable.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {"__init__": lambda self, parent: None})
    loadable.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    loadable.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    effects_base = types.ModuleType("SegmentEditorEffects")
    effects_base.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
    effects_module = types.ModuleType("qSlicerSegmentationsEditorEffectsPythonQt")
    effects_module.qSlicerSegmentEditorScriptedEffect = RegisteringScriptedEffect
    for name, module in {"qt": qt_module(), "slicer.ScriptedLoadableModule": loadable,
                         "SegmentEditorEffects": effects_base,
                         "qSlicerSegmentationsEditorEffectsPythonQt": effects_module}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", loadable, raising=False)
    monkeypatch.setattr(slicer, "qSlicerSegmentEditorAbstractEffect", AbstractEffectEnums, raising=False)
    monkeypatch.setattr(slicer, "app", SlicerApp(), raising=False)
    import slicer_util_standins

    slicer_util_standins.install(monkeypatch)  # slicer.i18n and slicer.util's dialogs
    monkeypatch.setattr(QClipboard, "text_set", "")
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: QWidget(), raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables",
                        lambda panel: ui_widgets(MODULE_DIR / "Resources/UI/MedSAM2Slicer.ui"),
                        raising=False)
    monkeypatch.setattr(QTimer, "started", [])
    monkeypatch.setattr(QSettings, "store", {})
    monkeypatch.setattr(QApplication, "cursors", [])
    from MedSAM2SlicerLib import effect_options, install, logic, prompt_list

    monkeypatch.setattr(logic, "_shared_logic", None)
    for hooked in (effect_options, install, prompt_list):  # the GUI rebinds their `tr` to slicer.i18n's: restored
        monkeypatch.setattr(hooked, "tr", hooked.tr)
    for name in ("MedSAM2Slicer", "SegmentEditorMedSAM2Lib", "SegmentEditorMedSAM2Lib.SegmentEditorEffect"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield registered
    logic.shared_logic().close()
