"""Intensity preprocessing per volume: a CT and an MR in one scene each get their own.

Kept as an attribute on the volume node, so it is saved with the scene (MRML writes node attributes); a volume
without one uses the panel's default. The value is the `Preprocessing` fields as JSON ("null": the backend's
default percentiles), exactly what goes to the backend.
"""

from __future__ import annotations

import json

from . import panel_settings

ATTRIBUTE = "MedSAM2.Preprocessing"


def preprocessing_for(volume_node, default: dict | None) -> dict | None:
    """The volume's own preprocessing, else `default` (the panel's)."""
    stored = volume_node.GetAttribute(ATTRIBUTE) if volume_node is not None else None
    if not stored:
        return default
    try:
        value = json.loads(stored)
    except ValueError:
        return default  # written by hand and broken: the default rather than an error on every click
    return value if isinstance(value, dict) or value is None else default


def has_own(volume_node) -> bool:
    return bool(volume_node.GetAttribute(ATTRIBUTE))


def set_for_volume(volume_node, preprocessing: dict | None) -> None:
    volume_node.SetAttribute(ATTRIBUTE, json.dumps(preprocessing))


def use_default(volume_node) -> None:
    volume_node.RemoveAttribute(ATTRIBUTE)


def use_display_window(volume_node) -> dict | None:
    """Give the volume its *own* display window/level as CT level/width (its voxels are untouched); None when it
    has no display node."""
    window = panel_settings.display_window(volume_node)
    if window is None:
        return None
    preprocessing = {"level": window[0], "width": window[1]}
    set_for_volume(volume_node, preprocessing)
    return preprocessing


def describe(preprocessing: dict | None) -> str:
    """One line for the effect, e.g. "CT window 40 / 400"."""
    if preprocessing is None:
        return "MR / other: percentiles 0.5-99.5"
    if "preset" in preprocessing:
        return f"CT preset {preprocessing['preset']}"
    if "level" in preprocessing:
        return f"CT window {preprocessing['level']:g} / {preprocessing['width']:g}"
    low, high = preprocessing.get("percentiles", (0.5, 99.5))
    return f"MR / other: percentiles {low:g}-{high:g}"
