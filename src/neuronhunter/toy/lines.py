"""Synthetic "line" images for the mono-to-poly experiment.

Each image is a 32×32 RGB picture (values in ``[0, 1]``, black background) of one straight line with two binary
features:

* **Feature A, orientation**: ``0`` = vertical, ``1`` = horizontal.
* **Feature B, colour**: ``0`` = red (channel 0), ``1`` = blue (channel 2).

The line's thickness (across it) and length (along it) are drawn uniformly from inclusive integer ranges, and its
position is uniform over all placements that keep it inside the image. Gaussian pixel noise of a configurable
standard deviation is added to all three channels and the result is clipped to ``[0, 1]``. Orientation and colour
are drawn independently with probability 1/2 each, so every concept (vertical, horizontal, red, blue) covers about
half the images and the two features are uncorrelated.

Two labellings are used by :mod:`neuronhunter.toy.monopoly`:

* phase 1, ``orientation``: the label is the orientation (colour is random and irrelevant);
* phase 2, ``xor``: class ``0`` ("class 1" in the issue) = vertical+red or horizontal+blue, class ``1``
  ("class 2") = vertical+blue or horizontal+red, i.e. ``label = orientation XOR colour``.

Everything is drawn from a private :class:`torch.Generator` seeded with ``seed``, so the same arguments give
bit-identical tensors and the global RNG is left alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ConfigError
from ..io import atomic_path

SIZE = 32
CHANNELS = 3
ORIENTATIONS = ("vertical", "horizontal")
COLORS = ("red", "blue")
CONCEPTS = ("vertical", "horizontal", "red", "blue")
_COLOR_CHANNEL = (0, 2)  # red -> R channel, blue -> B channel


@dataclass(frozen=True)
class LinesData:
    """A set of line images with their generating parameters.

    Attributes:
        images: ``[n, 3, 32, 32]`` float32 in ``[0, 1]``.
        orientation: ``[n]`` int64, 0 = vertical, 1 = horizontal.
        color: ``[n]`` int64, 0 = red, 1 = blue.
        thickness: ``[n]`` int64, pixels across the line.
        length: ``[n]`` int64, pixels along the line.
        across_start: ``[n]`` int64, first column (vertical) or row (horizontal) covered by the line.
        along_start: ``[n]`` int64, first row (vertical) or column (horizontal) covered by the line.
    """

    images: Tensor
    orientation: Tensor
    color: Tensor
    thickness: Tensor
    length: Tensor
    across_start: Tensor
    along_start: Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def labels(self, task: str) -> Tensor:
        """Class labels for ``task``: ``"orientation"`` (phase 1) or ``"xor"`` (phase 2)."""
        if task == "orientation":
            return self.orientation.clone()
        if task == "xor":
            return self.orientation ^ self.color
        raise ConfigError(f"unknown task {task!r}; use 'orientation' or 'xor'")

    def concept_masks(self) -> Tensor:
        """Boolean membership ``[n, 4]`` in the concepts ``CONCEPTS`` (vertical, horizontal, red, blue)."""
        return torch.stack(
            [self.orientation == 0, self.orientation == 1, self.color == 0, self.color == 1], dim=1
        )

    def flat(self) -> Tensor:
        """Images flattened to ``[n, 3072]`` in channel-row-column order (the MLP's input layout)."""
        return self.images.reshape(len(self), -1)

    def to(self, device: str | torch.device) -> LinesData:
        """A copy with every tensor on ``device``."""
        return LinesData(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})


def _check_range(name: str, rng: tuple[int, int], lo: int, hi: int) -> None:
    if len(rng) != 2 or rng[0] > rng[1] or rng[0] < lo or rng[1] > hi:
        raise ConfigError(f"{name} must be (min, max) with {lo} <= min <= max <= {hi}, got {rng!r}")


def make_lines(
    n: int,
    seed: int,
    *,
    noise: float = 0.1,
    thickness: tuple[int, int] = (1, 3),
    length: tuple[int, int] = (16, 32),
) -> LinesData:
    """Draw ``n`` line images deterministically from ``seed``.

    Args:
        n: number of images.
        seed: seed of the private generator; the same seed and arguments give identical tensors.
        noise: standard deviation of the Gaussian pixel noise (0 for clean images).
        thickness: inclusive (min, max) line thickness in pixels.
        length: inclusive (min, max) line length in pixels (32 spans the image).

    Returns:
        The images and their generating parameters.
    """
    if n < 1:
        raise ConfigError(f"number of images must be >= 1, got {n}")
    if noise < 0:
        raise ConfigError(f"noise must be >= 0, got {noise}")
    _check_range("thickness", thickness, 1, SIZE)
    _check_range("length", length, 1, SIZE)
    g = torch.Generator().manual_seed(int(seed))
    orientation = torch.randint(0, 2, (n,), generator=g)
    color = torch.randint(0, 2, (n,), generator=g)
    thick = torch.randint(thickness[0], thickness[1] + 1, (n,), generator=g)
    ln = torch.randint(length[0], length[1] + 1, (n,), generator=g)
    # uniform placement: start in [0, SIZE - extent]
    across_start = (torch.rand(n, generator=g) * (SIZE - thick + 1)).floor().long()
    along_start = (torch.rand(n, generator=g) * (SIZE - ln + 1)).floor().long()

    idx = torch.arange(SIZE)
    across = (idx >= across_start[:, None]) & (idx < (across_start + thick)[:, None])  # [n, 32]
    along = (idx >= along_start[:, None]) & (idx < (along_start + ln)[:, None])  # [n, 32]
    vertical = along[:, :, None] & across[:, None, :]  # rows along, columns across: [n, 32, 32]
    horizontal = across[:, :, None] & along[:, None, :]
    mask = torch.where((orientation == 0)[:, None, None], vertical, horizontal).float()

    images = torch.zeros(n, CHANNELS, SIZE, SIZE)
    red = color == 0
    images[red, _COLOR_CHANNEL[0]] = mask[red]
    images[~red, _COLOR_CHANNEL[1]] = mask[~red]
    if noise > 0:
        images = (images + noise * torch.randn(images.shape, generator=g)).clamp(0.0, 1.0)
    return LinesData(images, orientation, color, thick, ln, across_start, along_start)


def describe(data: LinesData, i: int) -> str:
    """A short name for image ``i``, e.g. ``"vertical_red"``."""
    return f"{ORIENTATIONS[int(data.orientation[i])]}_{COLORS[int(data.color[i])]}"


def to_uint8(image: Tensor) -> Tensor:
    """``[3, H, W]`` floats in ``[0, 1]`` -> ``[H, W, 3]`` uint8."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def save_png_samples(
    data: LinesData, folder: str | os.PathLike[str], count: int, *, prefix: str = "train", scale: int = 4
) -> list[Path]:
    """Save the first ``count`` images as PNG files named like ``train_0003_vertical_red.png``.

    Args:
        data: the images.
        folder: destination folder (created if needed).
        count: how many images (capped at ``len(data)``).
        prefix: file name prefix (e.g. ``"train"``/``"test"``).
        scale: nearest-neighbour upscaling factor so the 32×32 pictures are visible.

    Returns:
        The written paths.
    """
    from PIL import Image

    folder = Path(folder)
    paths = []
    for i in range(min(count, len(data))):
        arr = to_uint8(data.images[i].cpu()).numpy()
        img = Image.fromarray(arr).resize((SIZE * scale, SIZE * scale), Image.NEAREST)
        path = folder / f"{prefix}_{i:04d}_{describe(data, i)}.png"
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG")
        paths.append(path)
    return paths
