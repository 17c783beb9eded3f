"""Image arrays: resizing, model-range conversion, grids, PNG files and the image file suffixes.

Images are uint8 RGB arrays ``[..., H, W, 3]`` unless a function says otherwise; the networks take float
tensors ``[B, 3, H, W]`` in ``[-1, 1]`` (:func:`images_to_model`, :func:`model_to_uint8`).

**Resizing** has one interpolation everywhere: antialiased bilinear, ``torch.nn.functional.interpolate(x,
size, mode="bilinear", align_corners=False, antialias=True)`` (:func:`_interpolate`). The evaluation metrics
(pixel correlation and SSIM at the ground-truth size, the NSD-style metrics at 425 px, the inputs of the
feature networks and the classifier) and the stage B training images are resized this way, and the saved
metrics and their tests hold numbers computed with it; corpus loading and the grids use it too, so an image
resized anywhere in mindvis looks the same. Antialiasing matters when shrinking (a plain bilinear resize
aliases fine detail); when enlarging it is the usual bilinear interpolation. The entry points differ only in
what they take and return:

- :func:`resize_images`: uint8 ``[..., H, W, 3]`` -> uint8 (rounded, clamped to ``[0, 255]``);
- :func:`to_float_resized`: uint8 ``[B, H, W, 3]`` -> float32 tensor ``[B, 3, h, w]`` in ``[0, 1]``;
- :func:`resize_tensor`: float tensor ``[B, 3, H, W]`` (or ``[3, H, W]``) -> float tensor, values as they come.

torch and Pillow are imported inside the functions: this module is loaded by ``mindvis --help``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mindvis.errors import DataError
from mindvis.utils.io import atomic_write

if TYPE_CHECKING:
    import torch

#: Suffixes (lower case) of the image files read from image folders, e.g. a prior-training corpus.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: PNG and JPEG only: the files read from the image folders of an evaluation (reconstructions, ground truth).
PNG_JPEG_EXTENSIONS = (".png", ".jpg", ".jpeg")

_CHUNK = 64  # images per interpolation call in resize_images


# ----------------------------------------------------------------------------------------------------------
# Resizing
# ----------------------------------------------------------------------------------------------------------


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _interpolate(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The one resize of mindvis: antialiased bilinear (``align_corners=False``) of float ``[B, C, H, W]``."""
    import torch.nn.functional as F

    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def resize_images(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize uint8 images (antialiased bilinear, see the module docstring), rounding back to uint8.

    Args:
        images: ``[..., H, W, 3]`` uint8.
        size: target ``(height, width)`` or one int for a square.

    Returns:
        ``[..., h, w, 3]`` uint8; the input itself when it already has that size.
    """
    h, w = _size(size)
    if images.shape[-3:-1] == (h, w):
        return images
    import torch

    lead = images.shape[:-3]
    flat = images.reshape((-1,) + images.shape[-3:])
    out = np.empty((flat.shape[0], h, w, 3), dtype=np.uint8)
    for start in range(0, flat.shape[0], _CHUNK):
        x = torch.from_numpy(np.ascontiguousarray(flat[start : start + _CHUNK])).permute(0, 3, 1, 2).float()
        y = _interpolate(x, (h, w))
        out[start : start + _CHUNK] = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out.reshape(lead + (h, w, 3))


def to_float_resized(images: np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """``[B, H, W, 3]`` uint8 -> ``[B, 3, h, w]`` float32 torch tensor in ``[0, 1]`` (antialiased bilinear).

    Unlike :func:`resize_images` the result is not re-quantised to uint8 (used by the NSD-style metrics and
    the network inputs).
    """
    import torch

    h, w = _size(size)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (h, w):
        x = _interpolate(x, (h, w)).clamp_(0, 1)
    return x


def resize_tensor(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize float images ``x: [B, C, H, W]`` (or ``[C, H, W]``) to ``size`` (antialiased bilinear).

    The values are not clamped; ``x`` itself is returned when it already has that size.
    """
    h, w = _size(size)
    squeeze = x.ndim == 3
    if squeeze:
        x = x.unsqueeze(0)
    if x.shape[-2:] != (h, w):
        x = _interpolate(x, (h, w))
    return x.squeeze(0) if squeeze else x


def center_crop_square(image: np.ndarray) -> np.ndarray:
    """The largest centred square of ``image: [H, W, ...]`` (the image itself when it is square)."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


# ----------------------------------------------------------------------------------------------------------
# Model range
# ----------------------------------------------------------------------------------------------------------


def images_to_model(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in ``[-1, 1]``."""
    import torch

    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def model_to_uint8(x: torch.Tensor) -> np.ndarray:
    """float ``[B, 3, H, W]`` in ``[-1, 1]`` -> uint8 ``[B, H, W, 3]`` (rounded)."""
    import torch

    return (
        ((x.detach().float().clamp(-1, 1) + 1) * 127.5)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .cpu()
        .numpy()
    )


# ----------------------------------------------------------------------------------------------------------
# Grids
# ----------------------------------------------------------------------------------------------------------


def image_grid(
    images: np.ndarray,
    ground_truth: np.ndarray | None = None,
    *,
    size: int | None = None,
    pad: int = 2,
    gt_gap: int = 0,
    row_labels: Sequence[str] | None = None,
) -> np.ndarray:
    """Lay out ``images: [R, C, H, W, 3]`` uint8 as one picture on white, ``R`` rows of ``C`` tiles.

    Args:
        images: the tiles, one row per item.
        ground_truth: ``[R, h, w, 3]``: a first column (each row's reference), resized to the tiles' size.
        size: resize every tile (and the ground truth) to ``size x size``; ``None`` keeps ``H x W``.
        pad: white pixels around and between the tiles.
        gt_gap: white pixels added between the ground-truth column and the tiles.
        row_labels: names drawn in black in a strip on the left (``8 + 6 * longest name`` pixels wide), one
            per row.

    Returns:
        ``[R * (H + pad) + pad, left + C' * (W + pad) + pad + gt_gap, 3]`` uint8, ``C'`` the columns with the
        ground truth, ``left`` the label strip's width.
    """
    images = np.asarray(images)
    if images.ndim != 5 or images.shape[-1] != 3:
        raise DataError(f"expected [rows, cols, H, W, 3], got {images.shape}", field="images")
    if size is not None:
        images = resize_images(images, size)
    r, c, h, w, _ = images.shape
    columns = [images[:, j] for j in range(c)]
    gap = 0
    if ground_truth is not None:
        ground_truth = np.asarray(ground_truth)
        if len(ground_truth) != r:
            raise DataError(f"{len(ground_truth)} ground-truth images for {r} rows", field="ground_truth")
        columns.insert(0, resize_images(ground_truth, (h, w)))
        gap = gt_gap
    left = 8 + 6 * max(len(s) for s in row_labels) if row_labels else 0
    canvas = np.full((r * (h + pad) + pad, left + len(columns) * (w + pad) + pad + gap, 3), 255, np.uint8)
    for j, column in enumerate(columns):
        x = left + pad + j * (w + pad) + (gap if j > 0 else 0)
        for i in range(r):
            y = pad + i * (h + pad)
            canvas[y : y + h, x : x + w] = column[i]
    if row_labels:
        from PIL import Image, ImageDraw

        img = Image.fromarray(canvas)
        draw = ImageDraw.Draw(img)
        for i, name in enumerate(row_labels[:r]):
            draw.text((4, pad + i * (h + pad) + h // 2 - 5), str(name), fill=(0, 0, 0))
        canvas = np.asarray(img)
    return canvas


# ----------------------------------------------------------------------------------------------------------
# PNG files
# ----------------------------------------------------------------------------------------------------------


def png_bytes(image: np.ndarray) -> bytes:
    """``image: [H, W, 3]`` uint8 encoded as PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write ``image: [H, W, 3]`` uint8 as a PNG file, atomically (:func:`mindvis.utils.io.atomic_write`)."""
    from PIL import Image

    path = Path(path)
    with atomic_write(path) as fh:
        Image.fromarray(np.asarray(image)).save(fh, format="PNG")
    return path
