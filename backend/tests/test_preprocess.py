"""Preprocessing against hand-computed values (MedSAM2's steps), and bad volumes / settings."""

import numpy as np
import pytest

from medsam2_backend.engine import CT_PRESETS, EngineInputError, Preprocessing
from medsam2_backend.engine.preprocess import (IMAGENET_MEAN, IMAGENET_STD, SliceFrames, intensity_range, to_uint8,
                                               validate_volume)


@pytest.mark.parametrize("preset, level, width", [("soft_tissue", 40, 400), ("lung", -600, 1500),
                                                  ("bone", 400, 1800), ("brain", 40, 80)])
def test_ct_presets_map_window_to_0_255(preset, level, width):
    lo, hi = level - width / 2, level + width / 2
    hu = np.array([[lo - 100, lo, lo + width / 4, level, hi - 1e-3, hi, hi + 500]], np.float32)
    got = to_uint8(hu, *Preprocessing(preset=preset).window)
    # clip, scale by 255/width, truncate: 0, 0, 63 (63.75), 127 (127.5), 254, 255, 255
    assert got.tolist() == [[0, 0, 63, 127, 254, 255, 255]]
    assert CT_PRESETS[preset] == (level, width)


def test_explicit_window_equals_preset():
    assert Preprocessing(level=40, width=400).window == Preprocessing(preset="soft_tissue").window == (-160, 240)


def test_percentiles_use_nonzero_voxels_only():
    vol = np.zeros((2, 10, 10), np.int16)
    vol[0] = np.arange(100).reshape(10, 10) + 1  # 1..100; the 100 zeros of slice 1 must be ignored
    lo, hi = intensity_range(vol, Preprocessing(percentiles=(10, 90)))
    assert (lo, hi) == pytest.approx((10.9, 90.1))
    grey = SliceFrames(vol, 0, Preprocessing(percentiles=(10, 90)), 32).grey(0)
    assert grey[0, 0] == 0 and grey[-1, -1] == 255 and grey[5, 0] == int((51 - 10.9) * 255 / 79.2)


def test_model_input_is_imagenet_normalised_three_channels():
    vol = np.full((1, 20, 30), 40, np.int16)  # level of the soft-tissue window -> grey 127
    x = SliceFrames(vol, 0, Preprocessing(preset="soft_tissue"), 64)[0].numpy()
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    for c in range(3):
        assert np.allclose(x[c], (127 / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], atol=1e-6)


def test_pad_keeps_aspect_and_slice_coordinates():
    vol = np.full((1, 20, 40), -1000, np.int16)
    vol[0, :, :20] = 1000  # left half bright, right half dark; padding is dark too
    stretched = SliceFrames(vol, 0, Preprocessing(preset="soft_tissue"), 40)[0].numpy()[0]
    padded = SliceFrames(vol, 0, Preprocessing(preset="soft_tissue", resize="pad"), 40)[0].numpy()[0]
    bright = (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    dark = (0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    # stretch: the bright half covers the left half of every row; pad: the slice is the top half, unstretched
    assert np.isclose(stretched[30, 5], bright) and np.isclose(stretched[30, 35], dark)
    assert np.isclose(padded[5, 5], bright) and np.isclose(padded[5, 35], dark) and np.isclose(padded[30, 5], dark)


def test_volume_is_never_modified():
    vol = np.arange(2 * 8 * 8, dtype=np.int16).reshape(2, 8, 8)
    before = vol.copy()
    frames = SliceFrames(vol, 1, Preprocessing(), 16)
    frames[3], frames.grey(0)
    assert np.array_equal(vol, before)


@pytest.mark.parametrize("volume, message", [
    (np.zeros((0, 4, 4), np.int16), "empty"),
    (np.zeros((4, 4), np.int16), "must be 3D"),
    (np.full((2, 4, 4), np.nan, np.float32), "NaN"),
    (np.zeros((2, 4, 4), np.complex64), "not supported"),
    (np.zeros((2, 4, 4), bool), "not supported"),
    ([[[1]]], "numpy array"),
])
def test_bad_volumes_get_clear_errors(volume, message):
    with pytest.raises(EngineInputError, match=message):
        validate_volume(volume)


@pytest.mark.parametrize("kwargs, message", [
    ({"preset": "liver"}, "Unknown CT window preset 'liver'"),
    ({"level": 40}, "needs both a level and a width"),
    ({"level": 40, "width": -1}, "positive"),
    ({"preset": "lung", "level": 1, "width": 2}, "not both"),
    ({"percentiles": (99, 1)}, "Percentiles"),
    ({"resize": "crop"}, "Unknown resize mode"),
])
def test_bad_settings_get_clear_errors(kwargs, message):
    with pytest.raises(EngineInputError, match=message):
        Preprocessing(**kwargs)


def test_json_form_is_normalised_so_equal_settings_compare_equal():
    assert Preprocessing(percentiles=[1, 99]) == Preprocessing(percentiles=(1.0, 99.0))
    assert Preprocessing(level=40, width=400).window == (-160.0, 240.0)
    for bad in ({"percentiles": [1, 2, 3]}, {"level": "high", "width": 1}, {"percentiles": None}):
        with pytest.raises(EngineInputError, match="must be numbers"):
            Preprocessing(**bad)


def test_settings_come_from_none_an_object_or_their_json_form():
    assert Preprocessing.from_options(None) == Preprocessing()
    lung = Preprocessing(preset="lung")
    assert Preprocessing.from_options(lung) is lung
    assert Preprocessing.from_options({"level": 40, "width": 400}).window == (-160.0, 240.0)
    for bad in ({"gamma": 2}, ["lung"], "lung"):
        with pytest.raises(EngineInputError, match="fields preset, level, width, percentiles, resize only"):
            Preprocessing.from_options(bad)
