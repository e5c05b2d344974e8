"""The panel's settings as backend options: local server arguments, preprocessing fields, the display window."""

import numpy as np
import slicer

from medsam2_backend.engine import Preprocessing
from MedSAM2SlicerLib import panel_settings, scenarios

DEFAULTS = panel_settings.SETTINGS_DEFAULTS


def test_settings_read_back_as_strings_get_their_types():
    assert panel_settings.typed_setting("randomWeights", "true") is True
    assert panel_settings.typed_setting("randomWeights", "false") is False
    assert panel_settings.typed_setting("windowWidth", "1500") == 1500.0
    assert panel_settings.typed_setting("windowWidth", "wide") == 400.0
    assert panel_settings.typed_setting("serverUrl", None) == "http://127.0.0.1:8765"


def test_local_server_options():
    assert panel_settings.local_server_options(DEFAULTS) == {
        "checkpoint": "MedSAM2_latest", "random_weights": False, "device": None, "precision": None, "python": None}
    chosen = dict(DEFAULTS, checkpoint=" /data/MedSAM2_2411.pt ", device="cuda", precision="bf16", python="/opt/py")
    assert panel_settings.local_server_options(chosen) == {
        "checkpoint": "/data/MedSAM2_2411.pt", "random_weights": False, "device": "cuda", "precision": "bf16",
        "python": "/opt/py"}
    random = panel_settings.local_server_options(dict(DEFAULTS, randomWeights=True))
    assert random["checkpoint"] is None and random["random_weights"] is True


def test_every_intensity_mode_gives_valid_engine_preprocessing():
    cases = {"ct_preset": {"preset": "soft_tissue"}, "ct_window": {"level": 40.0, "width": 400.0},
             "percentiles": None}
    assert set(cases) == set(panel_settings.INTENSITY_MODES)
    for mode, expected in cases.items():
        fields = panel_settings.preprocessing_options(dict(DEFAULTS, intensityMode=mode))
        assert fields == expected
        Preprocessing(**(fields or {}))  # the engine accepts it
    fields = panel_settings.preprocessing_options(dict(DEFAULTS, intensityMode="percentiles", percentileLow=1.0))
    assert Preprocessing(**fields).percentiles[0] == 1.0


def test_display_window_is_read_without_touching_the_voxels(mrml):
    volume = scenarios.add_volume(shape_kji=(4, 8, 8), ijk_to_ras=np.eye(4))
    before = slicer.util.arrayFromVolume(volume).copy()
    display = volume.GetDisplayNode()
    if display is None:
        display = mrml.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
        volume.SetAndObserveDisplayNodeID(display.GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevel(1500.0, -600.0)
    assert panel_settings.display_window(volume) == (-600.0, 1500.0)
    assert np.array_equal(slicer.util.arrayFromVolume(volume), before)
    assert panel_settings.display_window(None) is None
