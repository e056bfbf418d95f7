"""Image preprocessing shared by the VQA backbones.

The data pipeline hands a model ``uint8`` images in [0, 255] already resized to ``model.image_size``;
the model normalises them itself with ONE division by 255 (the reference code divided twice)::

    x = (images.float() / 255 - mean) / std

A grayscale batch ``(B, 1, H, W)`` is repeated to three channels (a documented conversion); any other
channel count, a wrong height/width or a non-uint8 tensor is an error naming the shape and what was
expected. ``load_image`` / ``resize_images`` produce such batches from files or tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ShapeError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # BLIP / MISS
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_images(images: torch.Tensor, image_size: int | tuple[int, int]) -> torch.Tensor:
    """Validate a uint8 batch (B, C, H, W) and return it with 3 channels (grayscale is repeated)."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if not isinstance(images, torch.Tensor):
        raise ShapeError(f"images must be a uint8 torch.Tensor (B, 3, {size[0]}, {size[1]}), got {type(images).__name__}")
    if images.dim() == 3:
        raise ShapeError(f"images have shape {tuple(images.shape)}; expected a batch (B, 3, {size[0]}, {size[1]}) "
                         f"- add the batch dimension with images.unsqueeze(0)")
    if images.dim() != 4:
        raise ShapeError(f"images have shape {tuple(images.shape)}; expected (B, 3, {size[0]}, {size[1]})")
    if images.dtype != torch.uint8:
        raise ShapeError(
            f"images have dtype {images.dtype}; expected uint8 values in [0, 255] (the model divides by 255 "
            f"itself, so pre-scaled floats would be scaled twice). Convert with (x * 255).round().to(torch.uint8)"
        )
    channels = images.shape[1]
    if channels == 1:
        images = images.expand(-1, 3, -1, -1)  # grayscale -> RGB by repetition (radiographs are often 1-channel)
    elif channels != 3:
        raise ShapeError(f"images have shape {tuple(images.shape)} with {channels} channels; expected 3 (RGB) "
                         f"or 1 (grayscale, repeated to 3)")
    if tuple(images.shape[-2:]) != size:
        raise ShapeError(
            f"images have shape {tuple(images.shape)}; expected height x width {size[0]} x {size[1]} "
            f"(the model's image_size). Resize with peftmed.backbones.images.resize_images(images, {size[0]})"
        )
    return images


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [0, 255] -> float ``(x / 255 - mean) / std`` per channel."""
    mean_t = torch.tensor(mean, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    return (images.to(dtype) / 255.0 - mean_t) / std_t


def prepare_images(images: torch.Tensor, image_size: int | tuple[int, int], mean: Sequence[float],
                   std: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """check_images + normalize_images: what a model's forward calls on ``batch["images"]``."""
    return normalize_images(check_images(images, image_size), mean, std, dtype)


def resize_images(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize a uint8 batch (B, C, H, W) or image (C, H, W) to image_size x image_size (bicubic, clamped)."""
    squeeze = images.dim() == 3
    x = images.unsqueeze(0) if squeeze else images
    if x.dim() != 4:
        raise ShapeError(f"resize_images takes (C, H, W) or (B, C, H, W), got {tuple(images.shape)}")
    out = F.interpolate(x.float(), size=(image_size, image_size), mode="bicubic", align_corners=False, antialias=True)
    out = out.round().clamp_(0, 255).to(torch.uint8)
    return out[0] if squeeze else out


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """Read an image file as RGB uint8 (3, image_size, image_size), resized with PIL's bicubic filter."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
        array = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
