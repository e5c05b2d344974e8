"""Strict stand-ins for the Qt classes Slicer's Python sees through PythonQt (`qt`), used by `slicer_standins`.

Each class defines exactly the Qt properties, methods and signals the extension uses, with names and signatures
checked against Qt 5.15 / PythonQt (properties are attributes; signals are connected by signature string).
Anything else raises AttributeError: a misspelled Qt name fails the test.

Test helpers that Qt does not have are module functions (`fire`, `run_timers`), so code under test cannot
call them by mistake.
"""

from __future__ import annotations

import pathlib
import types


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
