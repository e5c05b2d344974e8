"""The SAM-2 engine on CPU with random weights: axes, resize modes, the feature cache, precision."""

import numpy as np
import pytest
import torch

from synthetic_volumes import blob_volume
from medsam2_backend.engine import Preprocessing
from medsam2_backend.engine.model import load_model
from medsam2_backend.engine.sam2_engine import FeatureCache, Sam2Engine

pytestmark = pytest.mark.sam2

PRE = Preprocessing(preset="soft_tissue")


@pytest.fixture(scope="module")
def volume():
    return blob_volume((4, 40, 56))


def test_any_axis_gives_the_same_masks_transposed(sam2_model, volume):
    engine = Sam2Engine(sam2_model)
    masks = {}
    for axis in (0, 2):
        s = engine.open_session(np.moveaxis(volume, 0, axis), axis=axis, preprocessing=PRE)
        s.add_prompt(1, 1, box=[10, 8, 40, 30])
        list(s.propagate(stop=2))
        masks[axis] = s.object_mask(1)
    assert masks[0][1:3].any()
    np.testing.assert_array_equal(masks[2], np.moveaxis(masks[0], 0, 2))


def test_pad_mode_returns_masks_at_the_slice_size(sam2_model, volume):
    s = Sam2Engine(sam2_model).open_session(volume, preprocessing=Preprocessing(preset="soft_tissue", resize="pad"))
    r = s.add_prompt(1, 0, box=[10, 8, 40, 30])
    assert r.mask.shape == r.logits.shape == (40, 56)
    assert s._square == (56, 56)
    m = np.zeros((40, 56), bool)
    m[5:20, 5:30] = True
    assert s.add_prompt(2, 0, mask=m).mask.shape == (40, 56)


def test_feature_cache_respects_its_budget_and_serves_repeats(sam2_model, volume):
    engine = Sam2Engine(sam2_model)
    s = engine.open_session(volume, preprocessing=PRE)
    s.add_prompt(1, 0, box=[10, 8, 40, 30])
    list(s.propagate())
    per_slice = s.cache.nbytes // len(s.cache)
    # the feature cache, one mask volume and the tracking states (SAM-2's memory of 4 slices, at least)
    assert s.working_bytes() == s.cache.nbytes + volume.size + s.tracking_bytes()
    assert s.tracking_bytes() > 4 * 64 * 32 * 32 * 2
    assert len(s.cache) == 4 and s.cache.misses == 4
    small = Sam2Engine(sam2_model, cache_budget_bytes=2 * per_slice + 1).open_session(volume, preprocessing=PRE)
    small.add_prompt(1, 0, box=[10, 8, 40, 30])
    list(small.propagate())
    assert len(small.cache) == 2 and small.cache.nbytes <= 2 * per_slice + 1
    # a changed preprocessing invalidates the features, keeps the prompts and needs a new propagation
    s.set_preprocessing(Preprocessing(preset="lung"))
    assert len(s.cache) == 1 and s.prompts(1)[0].box.tolist() == [10, 8, 40, 30]
    assert [p.direction for p in s.propagate().passes] == ["forward", "backward"]
    s.close()
    assert len(s.cache) == 0 and s.cache.nbytes == 0 and s.object_ids == []


def test_feature_cache_eviction_is_least_recently_used():
    c = FeatureCache(budget_bytes=3 * 400)
    fake = lambda: {"backbone_fpn": [torch.zeros(100)], "vision_pos_enc": [torch.zeros(1)]}
    for k in range(3):
        c.put(k, fake())
    c.get(0)
    c.put(3, fake())
    assert c.get(1) is None and c.get(0) is not None and c.get(3) is not None and c.nbytes == 1200


def test_bf16_cache_hit_gives_the_mask_a_fresh_encoding_gives_and_close_to_fp32(volume):
    """Object 1 encodes the slice, object 2 (same prompt) reads it from the cache: the same mask, bit for bit (a
    cache that cast the encoder's fp32 level to bf16 made masks depend on what was still cached)."""
    fp32, bf16 = load_model(random_weights=True, seed=0), load_model(random_weights=True, seed=0, precision="bf16")
    results = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        s = Sam2Engine(model).open_session(volume, preprocessing=PRE)
        results[name] = s.add_prompt(1, 0, box=[10, 8, 40, 30]).logits
        misses = s.cache.misses
        np.testing.assert_array_equal(s.add_prompt(2, 0, box=[10, 8, 40, 30]).logits, results[name])
        assert s.cache.misses == misses, "the second object must read the slice from the cache"
        dtypes = [f.dtype for f in s.cache._entries[0]]
        # under bf16 autocast the encoder gives its high-resolution levels in bf16: kept so, half the memory
        assert dtypes == ([torch.bfloat16, torch.bfloat16, torch.float32] if name == "bf16" else [torch.float32] * 3)
    assert np.abs(results["fp32"] - results["bf16"]).max() < 0.25


def test_random_weights_must_be_asked_for():
    from medsam2_backend.engine import EngineInputError

    with pytest.raises(EngineInputError, match="random weights"):
        load_model()
    m = load_model(random_weights=True)
    assert m.random_weights and m.describe()["checkpoint"] == "random weights"


def test_prompt_on_the_first_slice_propagates_and_reports_it_once(sam2_model, volume):
    """SAM-2 skips a reverse pass that starts on frame 0; the engine still reports slice 0, exactly once."""
    s = Sam2Engine(sam2_model).open_session(volume, preprocessing=PRE)
    first = s.add_prompt(1, 0, box=[10, 8, 40, 30])
    run = s.propagate()
    results = list(run)
    assert [r.slice_index for r in results] == [0, 1, 2, 3] and run.planned == 4
    np.testing.assert_array_equal(results[0].mask, first.mask)
    backward_only = list(s.propagate(direction="backward"))
    assert [r.slice_index for r in backward_only] == [0]
    np.testing.assert_array_equal(backward_only[0].mask, first.mask)


def count_encoder_calls(monkeypatch, model) -> list:
    calls = []
    encode = model.predictor.forward_image

    def counted(image):
        calls.append(1)
        return encode(image)

    monkeypatch.setattr(model.predictor, "forward_image", counted)
    return calls


MULTI_PROMPTS = {1: dict(box=[10, 8, 40, 30]), 2: dict(points=[[30, 20]], labels=[1]), 3: dict(box=[4, 4, 30, 24])}


@pytest.mark.parametrize("anchors, budget_slices", [({1: 2, 2: 2, 3: 2}, 0), ({1: 1, 2: 1, 3: 3}, 3)])
def test_several_objects_propagate_together_encoding_each_slice_once(sam2_model, monkeypatch, anchors,
                                                                     budget_slices):
    """One propagation of three objects encodes each slice once however small the feature cache (objects on
    different slices: as long as it holds the slices from the lowest anchor to the highest) and gives each object what a propagation of
    that object alone gives."""
    volume = blob_volume((6, 40, 56))
    alone = Sam2Engine(sam2_model).open_session(volume, preprocessing=PRE)
    expected = {}
    for obj_id, prompt in MULTI_PROMPTS.items():
        alone.add_prompt(obj_id, anchors[obj_id], **prompt)
        expected.update({(r.obj_id, r.slice_index): r.logits for r in alone.propagate([obj_id])})
    per_slice = alone.cache.nbytes // len(alone.cache)

    calls = count_encoder_calls(monkeypatch, sam2_model)
    together = Sam2Engine(sam2_model, cache_budget_bytes=budget_slices * per_slice).open_session(
        volume, preprocessing=PRE)
    for obj_id, prompt in MULTI_PROMPTS.items():
        together.add_prompt(obj_id, anchors[obj_id], **prompt)
    run = together.propagate([1, 2, 3])
    results = list(run)
    assert len(calls) <= volume.shape[0], f"{len(calls)} encoder calls for {volume.shape[0]} slices"
    assert run.planned == len(results) == 3 * volume.shape[0] == len(expected)
    for r in results:
        np.testing.assert_allclose(r.logits, expected[(r.obj_id, r.slice_index)], atol=1e-4)


def test_reused_position_embedding_changes_no_bit_and_follows_new_weights():
    model = load_model(random_weights=True, seed=0)
    trunk = model.predictor.image_encoder.trunk
    image = torch.randn(1, 3, 512, 512)
    with torch.inference_mode():
        first = model.predictor.forward_image(image)["vision_features"]
        again = model.predictor.forward_image(image)["vision_features"]
        fresh = trunk.__class__._get_pos_embed(trunk, (128, 128))
        assert torch.equal(trunk._get_pos_embed((128, 128)), fresh)
    assert torch.equal(first, again)
    with torch.no_grad():
        trunk.pos_embed.add_(1.0)  # what loading a checkpoint does to the parameter
    with torch.inference_mode():
        assert torch.equal(trunk._get_pos_embed((128, 128)), trunk.__class__._get_pos_embed(trunk, (128, 128)))
