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


def test_engine_server_client_and_panel_take_their_lists_from_the_protocol():
    """One source each: the names the panel shows before connecting are the ones the backend accepts."""
    import numpy as np

    from medsam2_backend.engine import model, preprocess
    from medsam2_backend.engine.sam2_engine import Sam2Engine
    from medsam2_backend.server.app import make_app
    from medsam2_client import protocol, wire
    from MedSAM2SlicerLib import panel_settings

    assert preprocess.CT_PRESETS == protocol.CT_PRESETS and preprocess.Preprocessing(preset="lung").window == (
        -1350.0, 150.0)
    assert [np.dtype(t).name for t in preprocess.ALLOWED_DTYPES] == list(protocol.VOLUME_DTYPES)
    assert model.PRECISIONS == protocol.PRECISIONS and wire.STAGES == protocol.SLICE_STAGES
    assert Sam2Engine.__init__.__defaults__[-1] == protocol.DEFAULT_CACHE_BUDGET_BYTES
    assert panel_settings.CT_PRESETS == tuple(protocol.CT_PRESETS)
    assert panel_settings.PRECISIONS == ("auto", "fp32", "bf16")
    from fastapi.testclient import TestClient

    from medsam2_backend.engine import DiskEngine

    with TestClient(make_app(DiskEngine()), base_url="http://127.0.0.1") as http:  # a loopback Host
        capabilities = http.get(protocol.CAPABILITIES, headers={protocol.PROTOCOL_HEADER: str(protocol.PROTOCOL_VERSION)}).json()
    assert capabilities["preprocessing"]["ct_presets"] == list(protocol.CT_PRESETS)
    assert capabilities["volume"]["dtypes"] == list(protocol.VOLUME_DTYPES)
    assert panel_settings.choices_from_capabilities(capabilities) == {
        "ct_presets": tuple(protocol.CT_PRESETS), "precisions": ("auto",) + protocol.PRECISIONS,
        "directions": protocol.DIRECTIONS}


def test_the_panel_shows_what_a_server_reports_and_its_own_lists_without_one():
    from MedSAM2SlicerLib import panel_settings

    reported = {"preprocessing": {"ct_presets": ["soft_tissue", "liver"]}, "precisions": ["fp32"],
                "propagation": {"directions": ["both"]}}
    assert panel_settings.choices_from_capabilities(reported) == {"ct_presets": ("soft_tissue", "liver"),
                                                                  "precisions": ("auto", "fp32"),
                                                                  "directions": ("both",)}
    assert panel_settings.choices_from_capabilities({"engine": {}})["ct_presets"] == panel_settings.CT_PRESETS
