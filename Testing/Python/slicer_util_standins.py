"""Strict stand-ins for `slicer.i18n`, slicer.util's dialogs and `slicer.qMRMLNodeComboBox`, installed by
`slicer_standins.gui_stubs`.

Checked against Slicer 5.10's Base/Python/slicer/i18n.py and util.py (confirmOkCancelDisplay, infoDisplay,
errorDisplay, createProgressDialog) and Qt 5.15's QProgressDialog. slicer-core ships slicer.util with the real
dialogs, which would build QMessageBoxes the Qt stand-ins do not have; its WaitCursor works on them as it is.
"""

from __future__ import annotations

import pathlib
import sys
import types

import slicer
from qt_standins import QWidget, fire


class QProgressDialog(QWidget):
    """Qt 5.15 QProgressDialog's Q_PROPERTYs that slicer.util.createProgressDialog and the panel use; `wasCanceled`
    is read-only (the user's Cancel is `cancel_progress(dialog)`); close() is QWidget's slot."""

    PROPERTIES = {"value": 0, "minimum": 0, "maximum": 100, "labelText": "", "windowTitle": "",
                  "minimumDuration": 4000}

    def __init__(self, parent=None):
        super().__init__()
        object.__setattr__(self, "_canceled", False)
        object.__setattr__(self, "_closed", False)

    def __getattr__(self, name):
        if name == "wasCanceled":
            return self._canceled
        return super().__getattr__(name)

    def close(self):
        object.__setattr__(self, "_closed", True)
        return True


class qMRMLNodeComboBox(QWidget):
    """The Q_PROPERTYs, slots and signal of Slicer 5.10's qMRMLNodeComboBox.h that the effect uses. The node
    list is the scene's nodes of `nodeTypes`; with `noneEnabled` nothing is selected until the user picks."""

    PROPERTIES = {**QWidget.PROPERTIES, "nodeTypes": (), "noneEnabled": False, "addEnabled": True,
                  "removeEnabled": True, "renameEnabled": False, "showHidden": False,
                  "selectNodeUponCreation": True, "baseName": ""}
    SIGNALS = ("currentNodeChanged(vtkMRMLNode*)",)

    def __init__(self, parent=None):
        super().__init__()
        object.__setattr__(self, "_scene", None)
        object.__setattr__(self, "_current", None)

    def setMRMLScene(self, scene):
        object.__setattr__(self, "_scene", scene)

    def mrmlScene(self):
        return self._scene

    def setCurrentNode(self, node):
        assert node is None or node.GetClassName() in self.nodeTypes, "the combo box does not list that node"
        object.__setattr__(self, "_current", node)
        fire(self, "currentNodeChanged(vtkMRMLNode*)", node)

    def currentNode(self):
        node = self._current
        return node if node is not None and self._scene is not None and self._scene.IsNodePresent(node) else None


def cancel_progress(dialog: QProgressDialog):
    """The user clicks the progress dialog's Cancel."""
    object.__setattr__(dialog, "_canceled", True)


def is_closed(widget) -> bool:
    return widget._closed


def i18n_module() -> types.ModuleType:
    """`slicer.i18n` (Base/Python/slicer/i18n.py, 5.10): translate(context, text) through slicer.app.translate;
    tr(text) with the context named after the caller's file ("<package>.<file>" inside a package)."""
    module = types.ModuleType("slicer.i18n")

    def translate(context, text):
        try:
            from slicer import app
        except ImportError:  # as Slicer's: no app, no translation
            return text
        return app.translate(context, text)

    def tr(text):
        path = pathlib.Path(sys._getframe(1).f_code.co_filename)
        package = path.parent.name + "." if (path.parent / "__init__.py").is_file() else ""
        return translate(package + path.stem, text)

    module.translate, module.tr = translate, tr
    return module


class Dialogs:
    """slicer.util's dialogs (Slicer 5.10 util.py signatures, without the QMessageBox **kwargs the code never
    passes): what they showed, and the user's answer to a confirmation. Reset for each test."""

    answer = True
    confirmations: list = []
    infos: list = []
    errors: list = []
    progress: list = []  # the progress dialogs created

    @staticmethod
    def confirmOkCancelDisplay(text, windowTitle=None, parent=None):
        Dialogs.confirmations.append(text)
        return Dialogs.answer

    @staticmethod
    def infoDisplay(text, windowTitle=None, parent=None, standardButtons=None):
        Dialogs.infos.append(text)

    @staticmethod
    def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None):
        Dialogs.errors.append(text)

    @staticmethod
    def createProgressDialog(parent=None, value=0, maximum=100, labelText="", windowTitle="Processing..."):
        """As slicer.util.createProgressDialog: a QProgressDialog with these properties set."""
        dialog = QProgressDialog(parent)
        dialog.minimumDuration, dialog.maximum, dialog.value = 0, maximum, value
        dialog.windowTitle, dialog.labelText = windowTitle, labelText
        Dialogs.progress.append(dialog)
        return dialog


def install(monkeypatch):
    i18n = i18n_module()  # slicer.i18n is the app's (slicer-core has none)
    monkeypatch.setitem(sys.modules, "slicer.i18n", i18n)
    monkeypatch.setattr(slicer, "i18n", i18n, raising=False)
    monkeypatch.setattr(slicer, "qMRMLNodeComboBox", qMRMLNodeComboBox, raising=False)
    for name in ("confirmOkCancelDisplay", "infoDisplay", "errorDisplay", "createProgressDialog"):
        monkeypatch.setattr(slicer.util, name, getattr(Dialogs, name))
    for name in ("confirmations", "infos", "errors", "progress"):
        monkeypatch.setattr(Dialogs, name, [])
    monkeypatch.setattr(Dialogs, "answer", True)
