"""What the module panel stores and how its choices become backend options (Qt-free, so it is tested headless).

The panel keeps its settings in `qt.QSettings` under these keys, so the backend and preprocessing choices survive
a restart; everything here is plain values. The access token is stored like the other settings (in the user's
Slicer settings file): prefer a server token file on shared computers.
"""

from __future__ import annotations

from medsam2_client import protocol

SETTINGS_GROUP = "MedSAM2"
# key -> default, for every setting the panel persists
SETTINGS_DEFAULTS = {
    "backend": "local",  # "local" or "remote"
    "checkpoint": "MedSAM2_latest",  # a file path or a known checkpoint name
    "randomWeights": False,
    "device": "auto",
    "precision": "auto",
    "python": "",  # empty: medsam2-server on PATH, else Slicer's own Python
    "serverUrl": "http://127.0.0.1:8765",
    "token": "",
    "intensityMode": "ct_preset",
    "ctPreset": "soft_tissue",
    "windowLevel": 40.0,
    "windowWidth": 400.0,
    "percentileLow": 0.5,
    "percentileHigh": 99.5,
}

DEVICES = ("auto", "cuda", "mps", "cpu")
PRECISIONS = ("auto",) + tuple(protocol.PRECISIONS)
CT_PRESETS = tuple(protocol.CT_PRESETS)
# mode -> label in the panel
INTENSITY_MODES = {
    "ct_preset": "CT window preset",
    "ct_window": "CT window (level / width)",
    "percentiles": "MR / other (percentiles)",
}


def choices_from_capabilities(capabilities: dict) -> dict:
    """The lists the panel and effect show, as a connected server reports them (this extension's protocol lists
    where the server says nothing, e.g. an older one or an in-process engine)."""
    preprocessing = capabilities.get("preprocessing") or {}
    propagation = capabilities.get("propagation") or {}
    return {"ct_presets": tuple(preprocessing.get("ct_presets") or CT_PRESETS),
            "precisions": ("auto",) + tuple(capabilities.get("precisions") or protocol.PRECISIONS),
            "directions": tuple(propagation.get("directions") or protocol.DIRECTIONS)}


def refill_choices(combo, items) -> None:
    """Refill a combo box (any object with Qt's QComboBox API) with `items`, keeping its current choice where it
    still exists, without a change signal for the refill itself."""
    items = list(items)
    current = combo.currentText
    combo.blockSignals(True)
    try:
        combo.clear()
        combo.addItems(items)
        combo.currentText = current if current in items else items[0]
    finally:
        combo.blockSignals(False)


def typed_setting(key: str, value):
    """A value read back from QSettings (often a string) as the type of its default."""
    default = SETTINGS_DEFAULTS[key]
    if value is None or value == "":
        return default
    if isinstance(default, bool):
        return value if isinstance(value, bool) else str(value).lower() in ("true", "1")
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            return default
    return str(value)


def local_server_options(settings: dict) -> dict:
    """`MedSAM2SlicerLogic.start_local_server` keywords from the panel's settings."""
    options = {"checkpoint": None if settings["randomWeights"] else (settings["checkpoint"].strip() or None),
               "random_weights": bool(settings["randomWeights"]),
               "device": None if settings["device"] == "auto" else settings["device"],
               "precision": None if settings["precision"] == "auto" else settings["precision"],
               "python": settings["python"].strip() or None}
    if options["checkpoint"] is None and not options["random_weights"]:
        options["checkpoint"] = SETTINGS_DEFAULTS["checkpoint"]
    return options


def preprocessing_options(settings: dict) -> dict | None:
    """The `Preprocessing` fields for the chosen intensity mode (None: the backend's default percentiles).

    Only the model's input changes: the volume's voxels never do. ("Use current display window" copies the
    shown volume's `display_window` into level/width and picks "ct_window".)
    """
    mode = settings["intensityMode"]
    if mode == "ct_preset":
        return {"preset": settings["ctPreset"]}
    if mode == "ct_window":
        return {"level": float(settings["windowLevel"]), "width": float(settings["windowWidth"])}
    low, high = float(settings["percentileLow"]), float(settings["percentileHigh"])
    return None if (low, high) == (0.5, 99.5) else {"percentiles": [low, high]}


def display_window(volume_node) -> tuple[float, float] | None:
    """The (level, width) a scalar volume is displayed with, or None without a display node."""
    display = volume_node.GetDisplayNode() if volume_node is not None else None
    if display is None or not hasattr(display, "GetWindow"):
        return None
    return float(display.GetLevel()), float(display.GetWindow())
