"""Strict stand-ins for the Qt layer of Slicer (`qt`, `slicer.app`, the scripted-effect and module bases; the
fixture also installs `slicer_util_standins`: slicer.i18n and slicer.util's dialogs).

Each class defines exactly the Qt properties, methods and signals the extension uses, with names and signatures
checked against Qt 5.15 / PythonQt (properties are attributes; signals are connected by signature string) and
Slicer 5.10's `qSlicerSegmentEditorAbstractEffect.h`, `AbstractScriptedSegmentEditorEffect.py` and
`qSlicerApplication`. Anything else raises AttributeError: a misspelled Qt or Slicer name fails the test.
MRML, VTK and segmentation objects are the real ones from slicer-core, never stand-ins.

Test helpers that Qt does not have are module functions (`fire`, `run_timers`), so code under test cannot
call them by mistake.
"""

from __future__ import annotations

import pathlib
import sys
import types

import pytest
import slicer

MODULE_DIR = pathlib.Path(__file__).resolve().parents[2] / "MedSAM2Slicer"


class QObject:
    """Properties are the only settable attributes; signals the only connectable names."""

    PROPERTIES: dict = {}
    SIGNALS: tuple = ()

    def __init__(self, *args):
        object.__setattr__(self, "_values", {})
        object.__setattr__(self, "_slots", {})
        object.__setattr__(self, "_blocked", False)

    @classmethod
    def _defaults(cls) -> dict:
        merged = {}
        for klass in reversed(cls.__mro__):
            merged.update(getattr(klass, "PROPERTIES", {}))
        return merged

    @classmethod
    def _signals(cls) -> set:
        return {s for klass in cls.__mro__ for s in getattr(klass, "SIGNALS", ())}

    def __getattr__(self, name):
        defaults = type(self)._defaults()
        if name in defaults:
            return self._values.get(name, defaults[name])
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (not a Qt property or method)")

    def __setattr__(self, name, value):
        if name not in type(self)._defaults():
            raise AttributeError(f"{type(self).__name__} has no property {name!r}")
        self._values[name] = value

    def connect(self, signal, slot):
        if signal not in type(self)._signals():
            raise AttributeError(f"{type(self).__name__} has no signal {signal!r}")
        self._slots.setdefault(signal, []).append(slot)

    def disconnect(self, signal, slot):
        if slot not in self._slots.get(signal, []):
            raise RuntimeError(f"{signal} was not connected to {slot}")
        self._slots[signal].remove(slot)

    def blockSignals(self, block):
        """QObject::blockSignals: no signal is emitted while blocked; returns the previous state."""
        previous = self._blocked
        object.__setattr__(self, "_blocked", bool(block))
        return previous


def fire(obj: QObject, signal: str, *args):
    """Emit a signal of a stand-in (what the user's click would do); nothing while its signals are blocked."""
    if obj._blocked:
        return
    for slot in list(obj._slots.get(signal, [])):
        slot(*args)


def signals_blocked(obj: QObject) -> bool:
    return obj._blocked


def connected(obj: QObject, signal: str) -> list:
    return list(obj._slots.get(signal, []))


class QWidget(QObject):
    PROPERTIES = {"enabled": True, "visible": True, "toolTip": ""}


class QLabel(QWidget):
    PROPERTIES = {"text": "", "wordWrap": False}

    def __init__(self, text=""):
        super().__init__()
        self.text = text


class QAbstractButton(QWidget):
    PROPERTIES = {"text": "", "checked": False, "checkable": False}
    SIGNALS = ("clicked()", "clicked(bool)", "toggled(bool)")

    def __init__(self, text=""):
        super().__init__()
        self.text = text


class QPushButton(QAbstractButton):
    pass


class QCheckBox(QAbstractButton):
    PROPERTIES = {"checkable": True}  # a check box is checkable; setting `checked` emits toggled(bool), as in Qt

    def __setattr__(self, name, value):
        changed = name == "checked" and bool(value) != bool(self.checked)
        super().__setattr__(name, value)
        if changed:
            fire(self, "toggled(bool)", bool(value))


class QComboBox(QWidget):
    SIGNALS = ("currentIndexChanged(int)", "currentTextChanged(QString)")

    def __init__(self):
        super().__init__()
        object.__setattr__(self, "_items", [])
        object.__setattr__(self, "_index", -1)

    def addItems(self, texts):
        for text in texts:
            self.addItem(text)

    def addItem(self, text):
        self._items.append(str(text))
        if self._index < 0:
            self.currentIndex = 0

    def clear(self):
        self._items.clear()
        self.currentIndex = -1

    def itemText(self, index):
        return self._items[index] if 0 <= index < len(self._items) else ""

    def __getattr__(self, name):
        if name == "count":  # a property in PythonQt, as QListWidget's
            return len(self._items)
        if name == "currentIndex":
            return self._index
        if name == "currentText":
            return self._items[self._index] if self._index >= 0 else ""
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name == "currentIndex":
            index = int(value) if -1 <= int(value) < len(self._items) else -1
            changed = index != self._index
            object.__setattr__(self, "_index", index)
            if changed:
                fire(self, "currentIndexChanged(int)", index)
        elif name == "currentText":  # Qt: selects the item with that text when there is one
            if value in self._items:
                self.currentIndex = self._items.index(value)
        else:
            super().__setattr__(name, value)


class QAbstractSpinBox(QWidget):
    PROPERTIES = {"minimum": 0, "maximum": 99, "specialValueText": "", "suffix": "", "singleStep": 1}

    def setRange(self, low, high):
        self.minimum, self.maximum = low, high

    def __getattr__(self, name):
        if name == "value":
            return self._values.get("value", self.minimum)
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name == "value":
            clamped = min(max(value, self.minimum), self.maximum)
            changed = clamped != self.value
            self._values["value"] = clamped
            if changed:
                fire(self, self.VALUE_CHANGED, clamped)
        else:
            super().__setattr__(name, value)


class QSpinBox(QAbstractSpinBox):
    SIGNALS = ("valueChanged(int)",)
    VALUE_CHANGED = "valueChanged(int)"


class QDoubleSpinBox(QAbstractSpinBox):
    PROPERTIES = {"decimals": 2}
    SIGNALS = ("valueChanged(double)",)
    VALUE_CHANGED = "valueChanged(double)"


class QLineEdit(QWidget):
    PROPERTIES = {"text": "", "placeholderText": ""}


class QPlainTextEdit(QWidget):
    PROPERTIES = {"plainText": ""}


class QGroupBox(QWidget):
    PROPERTIES = {"title": ""}


class QProgressBar(QWidget):
    PROPERTIES = {"minimum": 0, "maximum": 100, "value": 0, "format": "%p%"}


class QListWidgetItem:
    __slots__ = ("_text", "_data")

    def __init__(self, text=""):
        self._text, self._data = text, {}

    def text(self):
        return self._text

    def setData(self, role, value):
        self._data[role] = value

    def data(self, role):
        return self._data.get(role)


class QListWidget(QWidget):
    """Qt 5.15 qlistwidget.h: `count` (read-only) and `currentRow` are Q_PROPERTYs, and PythonQt looks a name up
    as a property before a method (PythonQtClassInfo::member), so they are attributes (`count()` fails, as there)."""

    SIGNALS = ("itemClicked(QListWidgetItem*)",)

    def __init__(self):
        super().__init__()
        object.__setattr__(self, "_items", [])
        object.__setattr__(self, "_row", -1)

    def addItem(self, item):
        """The QListWidgetItem* and the QString overloads."""
        self._items.append(QListWidgetItem(item) if isinstance(item, str) else item)

    def clear(self):
        self._items.clear()
        object.__setattr__(self, "_row", -1)

    def item(self, row):
        return self._items[row] if 0 <= row < len(self._items) else None

    def setCurrentRow(self, row):
        object.__setattr__(self, "_row", row if 0 <= row < len(self._items) else -1)

    def __getattr__(self, name):
        if name == "count":
            return len(self._items)
        if name == "currentRow":
            return self._row
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name == "currentRow":
            self.setCurrentRow(value)
        else:
            super().__setattr__(name, value)


class QLayout(QObject):
    def __init__(self, *args):
        super().__init__()
        object.__setattr__(self, "_children", [])

    def addWidget(self, widget, *stretch):
        self._children.append(widget)

    def addStretch(self, stretch=0):
        pass


class QHBoxLayout(QLayout):
    pass


class QVBoxLayout(QLayout):
    pass


class QIcon:
    __slots__ = ("path",)

    def __init__(self, path=""):
        self.path = path


class QPoint:
    __slots__ = ("_x", "_y")

    def __init__(self, x, y):
        self._x, self._y = x, y

    def x(self):
        return self._x

    def y(self):
        return self._y


class QTimer(QObject):
    """A QTimer that fires only when the test calls `run_timers()` (there is no event loop)."""

    PROPERTIES = {"interval": 0, "singleShot": False}
    SIGNALS = ("timeout()",)
    started: list = []  # every QTimer started and not stopped

    def start(self, msec=None):
        if msec is not None:
            self.interval = msec
        if self not in QTimer.started:
            QTimer.started.append(self)

    def stop(self):
        if self in QTimer.started:
            QTimer.started.remove(self)

    def isActive(self):
        return self in QTimer.started


_in_event_loop = []


def run_timers(between=None, timeout_s: float = 30.0) -> int:
    """Fire started timers until none is left, as the event loop would; `between()` runs after each round (the
    user's events, or releasing a gated backend). Nested calls (from inside a timer) return at once, as the
    outer loop goes on. Returns how many timeouts fired."""
    import time

    if _in_event_loop:
        return 0
    _in_event_loop.append(True)
    count, deadline = 0, time.monotonic() + timeout_s
    try:
        while QTimer.started:
            assert time.monotonic() < deadline, "timers kept running"
            for timer in list(QTimer.started):
                if timer.singleShot:
                    timer.stop()
                fire(timer, "timeout()")
                count += 1
            if between is not None:
                between()
            time.sleep(0.001)
    finally:
        _in_event_loop.clear()
    return count


class _Qt:
    UserRole = 0x0100
    WaitCursor = 3


class QClipboard:
    """QClipboard::setText(const QString&, Mode = Clipboard); `clipboard_text()` reads it back for a test."""

    text_set = ""

    def setText(self, text, mode=0):
        QClipboard.text_set = str(text)


def clipboard_text() -> str:
    return QClipboard.text_set


class QApplication:
    """The static calls the extension makes: the override cursor (as Slicer's own effects,
    qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)) and QGuiApplication::clipboard()."""

    cursors: list = []

    @staticmethod
    def setOverrideCursor(cursor):
        QApplication.cursors.append(cursor)

    @staticmethod
    def restoreOverrideCursor():
        QApplication.cursors.pop()

    @staticmethod
    def clipboard():
        return QClipboard()


class QSettings:
    store: dict = {}  # survives widgets, as the settings file does

    def value(self, key, default=None):
        return QSettings.store.get(key, default)

    def setValue(self, key, value):
        QSettings.store[key] = value


class QFileDialog:
    @staticmethod
    def getOpenFileName(parent, caption, directory, file_filter):
        return ""


def qt_module() -> types.ModuleType:
    module = types.ModuleType("qt")
    for klass in (QObject, QWidget, QLabel, QPushButton, QCheckBox, QComboBox, QSpinBox, QDoubleSpinBox,
                  QLineEdit, QPlainTextEdit, QGroupBox, QProgressBar, QListWidget, QListWidgetItem, QHBoxLayout,
                  QVBoxLayout, QIcon, QPoint, QTimer, QApplication, QSettings, QFileDialog):
        setattr(module, klass.__name__, klass)
    module.Qt = _Qt
    return module


UI_CLASSES = {"QLabel": QLabel, "QComboBox": QComboBox, "QGroupBox": QGroupBox, "QLineEdit": QLineEdit,
              "QPushButton": QPushButton, "QCheckBox": QCheckBox, "QPlainTextEdit": QPlainTextEdit,
              "QDoubleSpinBox": QDoubleSpinBox, "ctkCollapsibleButton": QPushButton}


def ui_widgets(ui_path: pathlib.Path) -> types.SimpleNamespace:
    """What `slicer.util.childWidgetVariables(loadUI(path))` gives: one attribute per named widget of its class."""
    import xml.etree.ElementTree as ET

    widgets = {}
    for element in ET.parse(ui_path).iter("widget"):
        if element.get("class") not in UI_CLASSES:
            continue
        widget = widgets[element.get("name")] = UI_CLASSES[element.get("class")]()
        for prop in element.findall("property"):  # the ranges and texts the .ui file gives (as uic does)
            name, (value,) = prop.get("name"), list(prop)
            if name in ("minimum", "maximum", "decimals", "text", "toolTip", "placeholderText", "value"):
                setattr(widget, name, {"number": int, "double": float}.get(value.tag, str)(value.text or ""))
    return types.SimpleNamespace(**widgets)


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
