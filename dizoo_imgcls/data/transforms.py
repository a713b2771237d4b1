"""Transform presets: an image file (or a Pillow image) to a uint8 CHW tensor of the output size.

Normalization happens in the model, on the device. Each preset picks its crop in source pixels first and
only then decodes, so a JPEG whose crop still has at least ``image_size`` px per side at 1/2, 1/4 or 1/8
scale is decoded at that scale (libjpeg's scaled IDCT): the crop distribution stays exactly that of
RandomResizedCrop / Resize + CenterCrop, only pixels that the downscale would average away are never made.
Crop and resize are one antialiased bilinear resample (torch's uint8 kernel, 2-4x faster than Pillow's).
"""
import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from .decode import DecodedImage

Box = Tuple[int, int, int, int]  # top, left, height, width
JPEG_SCALE_FACTORS = (8, 4, 2, 1)


def as_image(image):
    """Accept an ``EncodedImage`` as is, and a Pillow image or an HxWx3 uint8 array as decoded pixels."""
    return image if hasattr(image, 'size_hw') else DecodedImage(image)


def sample_crop(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                first_draw: Sequence[float] = None) -> Box:
    """RandomResizedCrop's box (torchvision's algorithm: 10 tries, then the central crop of the clamped
    aspect ratio), drawn from torch's RNG, which DataLoader seeds per worker. ``first_draw`` (4 uniforms)
    replaces the first try's draw, so a caller can take all of a sample's random numbers in one call."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(10):
        draw = first_draw if attempt == 0 and first_draw is not None else torch.rand(4).tolist()
        u_area, u_ratio, u_top, u_left = draw
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def decode_factor(crop_height: float, crop_width: float, output_px: int) -> int:
    """Largest JPEG scale-down (8, 4, 2 or 1) that leaves the crop at least ``output_px`` on its short side."""
    short = min(crop_height, crop_width)
    return next(k for k in JPEG_SCALE_FACTORS if k == 1 or short / k >= output_px)


def scale_box(box: Sequence[float], source_hw: Tuple[int, int], decoded_hw: Tuple[int, int]) -> Box:
    """A box in source pixels mapped to integer pixels of the decoded (possibly scaled-down) image."""
    top, left, h, w = box
    sy, sx = decoded_hw[0] / source_hw[0], decoded_hw[1] / source_hw[1]
    dh = min(decoded_hw[0], max(1, int(round(h * sy))))
    dw = min(decoded_hw[1], max(1, int(round(w * sx))))
    dtop = min(decoded_hw[0] - dh, int(round(top * sy)))
    dleft = min(decoded_hw[1] - dw, int(round(left * sx)))
    return dtop, dleft, dh, dw


def resized_crop(pixels, box: Box, size: int) -> torch.Tensor:
    """``size``x``size`` uint8 CHW tensor from an HxWx3 uint8 array's box (antialiased bilinear)."""
    top, left, h, w = box
    crop = torch.from_numpy(pixels[top:top + h, left:left + w]).permute(2, 0, 1)
    if (h, w) == (size, size):
        return crop.contiguous()
    resized = F.interpolate(crop.unsqueeze(0), size=(size, size), mode='bilinear', antialias=True,
                            align_corners=False)
    return resized[0].contiguous()


class TrainPreset:
    """RandomResizedCrop (``crop_scale`` of the area, aspect 3/4..4/3) + optional horizontal flip."""

    def __init__(self, image_size: int, crop_scale: Sequence[float] = (0.08, 1.0), hflip: bool = True,
                 reduced_decode: bool = True) -> None:
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f'data.train_crop_scale must be [min, max] with 0 < min <= max <= 1, got {crop_scale}')
        self.image_size = image_size
        self.crop_scale = tuple(crop_scale)
        self.ratio = (3 / 4, 4 / 3)
        self.hflip = hflip
        self.reduced_decode = reduced_decode

    def __call__(self, image) -> torch.Tensor:
        image = as_image(image)
        *crop_draw, flip_draw = torch.rand(5).tolist()  # one RNG call per sample: they cost ~5 us each
        box = sample_crop(*image.size_hw, self.crop_scale, self.ratio, crop_draw)
        factor = decode_factor(box[2], box[3], self.image_size) if self.reduced_decode else 1
        pixels = image.decode(factor)
        out = resized_crop(pixels, scale_box(box, image.size_hw, pixels.shape[:2]), self.image_size)
        return out.flip(-1) if self.hflip and flip_draw < 0.5 else out


class EvalPreset:
    """Resize the shorter side to ``image_size / crop_ratio``, then center-crop ``image_size`` (as one resample
    of the central box)."""

    def __init__(self, image_size: int, crop_ratio: float = 0.875, reduced_decode: bool = True) -> None:
        self.image_size = image_size
        self.resize_size = eval_resize_size(image_size, crop_ratio)
        self.reduced_decode = reduced_decode

    def __call__(self, image) -> torch.Tensor:
        image = as_image(image)
        height, width = image.size_hw
        side = self.image_size * min(height, width) / self.resize_size  # the crop in source px (<= short side)
        box = ((height - side) / 2, (width - side) / 2, side, side)
        factor = decode_factor(side, side, self.image_size) if self.reduced_decode else 1
        pixels = image.decode(factor)
        return resized_crop(pixels, scale_box(box, image.size_hw, pixels.shape[:2]), self.image_size)


def eval_resize_size(image_size: int, crop_ratio: float) -> int:
    if not 0 < crop_ratio <= 1:
        raise ValueError(f'data.eval_crop_ratio must be in (0, 1], got {crop_ratio}')
    return int(round(image_size / crop_ratio))
