"""The MedSAM2 Segment Editor effect, in its own package as Slicer's effect convention has it.

Slicer's `qSlicerSegmentEditorScriptedEffect.setPythonSource(path)` takes the module name from the file's folder
and the class name from its base name, and instantiates `SegmentEditorMedSAM2Lib.SegmentEditorEffect` when that
attribute is the class: this import makes it so (the same line as SegmentEditorExtraEffects' packages).
"""

from .SegmentEditorEffect import *  # noqa: F401,F403
