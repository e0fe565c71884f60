"""The synthetic line dataset: images match their labels, generation is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuronhunter.errors import ConfigError
from neuronhunter.toy.lines import LinesData, make_lines, save_png_samples


def _bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


def test_clean_images_match_their_labels_and_parameters():
    data = make_lines(200, seed=3, noise=0.0, thickness=(1, 3), length=(16, 32))
    assert data.images.shape == (200, 3, 32, 32)
    assert data.images.dtype == torch.float32
    for i in range(len(data)):
        img = data.images[i]
        red, green, blue = img[0] > 0, img[1] > 0, img[2] > 0
        assert not green.any()
        if int(data.color[i]) == 0:  # red: only the R channel is lit
            assert red.any() and not blue.any()
            mask = red
        else:
            assert blue.any() and not red.any()
            mask = blue
        # the lit pixels form exactly the drawn rectangle
        r0, r1, c0, c1 = _bbox(mask)
        height, width = r1 - r0 + 1, c1 - c0 + 1
        assert int(mask.sum()) == height * width
        t, ln = int(data.thickness[i]), int(data.length[i])
        a0, l0 = int(data.across_start[i]), int(data.along_start[i])
        if int(data.orientation[i]) == 0:  # vertical: long in rows, thin in columns
            assert (height, width) == (ln, t) and (r0, c0) == (l0, a0)
            assert height > width
        else:
            assert (height, width) == (t, ln) and (r0, c0) == (a0, l0)
            assert width > height
        assert torch.all(img[:, mask] <= 1.0) and torch.all(img.max() == 1.0)


def test_a_vertical_red_line_lights_a_red_column():
    data = make_lines(300, seed=0, noise=0.0, thickness=(1, 1), length=(32, 32))
    i = next(k for k in range(len(data)) if data.orientation[k] == 0 and data.color[k] == 0)
    col = int(data.across_start[i])
    expected = torch.zeros(32, 32)
    expected[:, col] = 1.0
    assert torch.equal(data.images[i, 0], expected)
    assert torch.equal(data.images[i, 2], torch.zeros(32, 32))


def test_labels_for_both_tasks():
    data = make_lines(400, seed=1, noise=0.0)
    o, c = data.orientation, data.color
    assert torch.equal(data.labels("orientation"), o)
    xor = data.labels("xor")
    # class 0 ("class 1") = vertical+red or horizontal+blue; class 1 = vertical+blue or horizontal+red
    assert torch.all(xor[(o == 0) & (c == 0)] == 0)
    assert torch.all(xor[(o == 1) & (c == 1)] == 0)
    assert torch.all(xor[(o == 0) & (c == 1)] == 1)
    assert torch.all(xor[(o == 1) & (c == 0)] == 1)
    # both features are roughly balanced and uncorrelated
    assert 0.4 < o.float().mean() < 0.6 and 0.4 < c.float().mean() < 0.6
    masks = data.concept_masks()
    assert masks.shape == (400, 4)
    assert torch.all(masks[:, :2].sum(1) == 1) and torch.all(masks[:, 2:].sum(1) == 1)
    with pytest.raises(ConfigError):
        data.labels("colour")


def test_same_seed_same_tensors_and_different_seed_different():
    a = make_lines(64, seed=7, noise=0.2)
    b = make_lines(64, seed=7, noise=0.2)
    c = make_lines(64, seed=8, noise=0.2)
    for name in LinesData.__dataclass_fields__:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.images, c.images)
    # the global RNG is left alone
    torch.manual_seed(0)
    x = torch.rand(3)
    torch.manual_seed(0)
    make_lines(8, seed=1)
    assert torch.equal(torch.rand(3), x)


def test_noise_level_is_respected():
    clean = make_lines(50, seed=2, noise=0.0)
    noisy = make_lines(50, seed=2, noise=0.1)
    assert torch.equal(clean.orientation, noisy.orientation)
    assert noisy.images.min() >= 0 and noisy.images.max() <= 1
    background = (clean.images == 0) & (noisy.images > 0)
    assert background.float().mean() > 0.3  # clipped Gaussian: about half the background pixels are lit
    diff = (noisy.images - clean.images)[clean.images == 0]
    assert 0.02 < float(diff.mean()) < 0.06  # E[max(0, N(0, 0.1))] ≈ 0.04


def test_bad_ranges_raise_config_error():
    with pytest.raises(ConfigError):
        make_lines(10, seed=0, thickness=(3, 1))
    with pytest.raises(ConfigError):
        make_lines(10, seed=0, length=(10, 40))
    with pytest.raises(ConfigError):
        make_lines(10, seed=0, noise=-1)


def test_png_samples_round_trip(tmp_path):
    from PIL import Image

    data = make_lines(5, seed=4, noise=0.0)
    paths = save_png_samples(data, tmp_path / "samples", 3, scale=2)
    assert len(paths) == 3
    for i, path in enumerate(paths):
        o = "vertical" if int(data.orientation[i]) == 0 else "horizontal"
        c = "red" if int(data.color[i]) == 0 else "blue"
        assert path.name == f"train_{i:04d}_{o}_{c}.png"
        arr = np.asarray(Image.open(path))
        assert arr.shape == (64, 64, 3)
        expected = (data.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(arr[::2, ::2], expected)
    assert not list((tmp_path / "samples").glob("*.tmp"))
