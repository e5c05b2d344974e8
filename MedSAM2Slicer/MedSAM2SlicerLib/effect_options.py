"""The MedSAM2 effect's options and keyboard shortcuts, Qt-free (the effect stores and binds them).

Options live in the Segment Editor's parameter node (`scriptedEffect.setParameter`, which stores them under the
effect's name, "MedSAM2.<name>"), so they are saved with the scene and restored when it is loaded. A stored value
that does not parse (an older or hand-edited scene) falls back to its default rather than failing.

Shortcuts act while the effect is active and the mouse is over a view (the view forwards key presses to the effect,
as for Draw's "a"/"x"). None takes a key Slicer already binds there, which are listed below from Slicer 5.10's
source, so the Segment Editor's own shortcuts (Ctrl+Z/z undo, Escape, Space, digits, q/w, i, ...) keep working.
"""

from __future__ import annotations

from medsam2_client.geometry import DEFAULT_BOX_MARGIN_MM
from medsam2_client.protocol import DIRECTIONS

DEFAULTS = {"Direction": "both", "RangeStart": -1, "RangeStop": -1, "StopAfterEmpty": 0, "AllSegments": 0,
            "RoiMarginMm": int(DEFAULT_BOX_MARGIN_MM)}

# KeySym (as vtkRenderWindowInteractor::GetKeySym reports it) -> effect action.
SHORTCUTS = {"p": "propagate", "Return": "propagate", "KP_Enter": "propagate", "c": "cancel",
             "n": "toggle_sign", "x": "remove_latest_prompt", "j": "next_least_certain"}

# Keys Slicer 5.10 binds while a slice view has the focus, none of which may be taken:
# qMRMLSegmentEditorWidget::installKeyboardShortcuts (QShortcuts on the main window): 0-9 and Shift+0-9 (select
# effect), Escape (deselect), Space (toggle last effect), z / Ctrl+Z (undo), y / Ctrl+Y / Ctrl+Shift+Z (redo),
# q w / * , . > < (previous/next segment), i (intensity mask);
# vtkMRMLSliceIntersectionWidget (slice views): g t (opacities), arrows f b (slice), v V (slice visibility),
# [ ] { } (volumes), r (reset field of view).
TAKEN_BY_SLICER = frozenset(
    [str(d) for d in range(10)] + ["Escape", "space", "z", "y", "q", "w", "slash", "asterisk", "comma", "period",
                                   "greater", "less", "i", "g", "t", "Right", "Left", "Up", "Down", "f", "b", "v",
                                   "V", "bracketleft", "bracketright", "braceleft", "braceright", "r"])


def tr(text: str) -> str:
    """Translation hook: the identity here; the effect rebinds `effect_options.tr` to `slicer.i18n.tr`."""
    return text


def typed(name: str, raw):
    """A parameter's stored text as its option's type; the default when missing or not parseable."""
    default = DEFAULTS[name]
    if raw in (None, ""):
        return default
    if isinstance(default, int):
        try:
            value = int(float(raw))
        except (TypeError, ValueError):
            return default
        return value if value >= -1 else default
    return raw if name != "Direction" or raw in DIRECTIONS else default


def help_text() -> str:
    """The effect's help, with every mouse action and shortcut."""
    return "<html>" + tr(
        "Segment with MedSAM2 (SAM-2): prompt on one slice, then <b>Propagate</b> through the volume."
        "<p><b>Mouse</b> (in a slice view): click = positive point; Ctrl+click = negative point (on macOS "
        "Ctrl means the Command key: ⌘+click); drag = box."
        "<p><b>Keys</b> (mouse over a view): <b>p</b> or <b>Enter</b> = propagate; <b>c</b> = cancel the "
        "propagation; <b>n</b> = the next click is negative (press again: positive); <b>x</b> = remove the "
        "segment's latest prompt (one undo step; Ctrl+Z / z stays the editor's Undo); <b>j</b> = jump to the next "
        "least certain slice."
        "<p><b>ROI</b>: <b>Use ROI as box</b> prompts the picked ROI's centre slice with its outline; propagation "
        "then stays within the ROI's slices plus the margin."
        "<p>Connect to a server or model in the MedSAM2 module first.") + "</html>"
