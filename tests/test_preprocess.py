"""The preprocessing geometry reproduces torchvision's Resize + CenterCrop exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from fasteval.errors import FastevalError
from fasteval.data.preprocess import PRESETS, check_batchable, get_spec

SIZES = [(378, 564), (375, 500), (500, 375), (257, 256), (256, 256), (333, 1000), (1001, 299), (300, 301)]


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("preset", ["imagenet", "seed"])
def test_geometry_matches_torchvision(hw, preset):
    spec = PRESETS[preset]
    h, w = hw
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    resized = TF.resize(img, spec.resize, antialias=True)
    assert (resized.height, resized.width) == spec.resized_hw(h, w)
    out = spec.torchvision_transform()(img)
    assert tuple(out.shape[1:]) == spec.output_hw(h, w)
    if spec.crop is not None:
        top, left = spec.crop_offsets(h, w)
        by_hand = TF.crop(resized, top, left, spec.crop, spec.crop)
        assert np.array_equal(np.asarray(by_hand), np.asarray(TF.center_crop(resized, spec.crop)))


def test_long_side_is_floored_not_rounded():
    # 564x378 -> torchvision gives 381x256 (DALI would round to 382).
    assert PRESETS["imagenet"].resized_hw(378, 564) == (256, 381)


def test_crop_offset_rounds_half_to_even():
    spec = get_spec("imagenet", resize=5, crop=2)
    # resized 5x5, (5-2)/2 = 1.5 -> round() gives 2; half-up would also give 2. Use 7-2=5 -> 2.5 -> 2.
    assert get_spec("imagenet", resize=7, crop=2).crop_offsets(7, 7) == (2, 2)
    assert spec.crop_offsets(5, 5) == (2, 2)


def test_normalisation_uses_imagenet_stats():
    spec = PRESETS["imagenet"]
    img = Image.new("RGB", (300, 300), (255, 0, 128))
    out = spec.torchvision_transform()(img)
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    assert torch.allclose(out[:, 100, 100], expected, atol=1e-6)


def test_seed_preset_refuses_mixed_aspect_ratios(tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    Image.new("RGB", (100, 100)).save(a)
    Image.new("RGB", (120, 100)).save(b)
    with pytest.raises(FastevalError, match=r"share one aspect ratio: .*b\.jpg becomes 268x224"):
        check_batchable(PRESETS["seed"], [str(a), str(b)])
    check_batchable(PRESETS["imagenet"], [str(a), str(b)])  # cropping makes any mix batchable


def test_seed_preset_accepts_one_aspect_ratio(tmp_path):
    paths = []
    for i, size in enumerate([(100, 100), (50, 50), (300, 300)]):
        paths.append(str(tmp_path / f"{i}.jpg"))
        Image.new("RGB", size).save(paths[-1])
    check_batchable(PRESETS["seed"], paths)


def test_bad_overrides():
    with pytest.raises(FastevalError, match="--crop 300 is larger than --resize 256"):
        get_spec("imagenet", crop=300)
    with pytest.raises(FastevalError, match="unknown --preset 'foo'"):
        get_spec("foo")
