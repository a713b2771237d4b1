"""Transform presets: an image file (or a Pillow image) to a uint8 CHW tensor of the output size.

Normalization happens in the model, on the device. Each preset picks its crop in source pixels first and
only then decodes, so a JPEG whose crop still has at least ``image_size`` px per side at 1/2, 1/4 or 1/8
scale is decoded at that scale (libjpeg's scaled IDCT), and where the region decoder is built only the crop's
part of the JPEG is decoded: the crop distribution stays exactly that of RandomResizedCrop / Resize +
CenterCrop, only pixels that the downscale would average away, or that lie outside the crop, are never made.
Crop and resize are one antialiased bilinear resample (torch's uint8 kernel, 2-4x faster than Pillow's).
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from ..errors import SettingError
from .decode import Box, DecodedImage

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


def resized_crop(crop, size: int) -> torch.Tensor:
    """``size``x``size`` uint8 CHW tensor from an HxWx3 uint8 array (antialiased bilinear).

    The tensor's memory stays HWC (channels_last strides), the layout the decoder writes and the model reads:
    a crop that is a view into a larger image is copied to contiguous HWC first (a region decode is already),
    which puts torch's resample on its fast uint8 path, and the result is not copied to CHW order
    (``collate_images`` stacks such tensors as NHWC). Both save ~40 us per image at 128 px on a 500x375 JPEG,
    identical pixels."""
    h, w = crop.shape[:2]
    crop = torch.from_numpy(crop).unsqueeze(0).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    if (h, w) != (size, size):
        crop = F.interpolate(crop, size=(size, size), mode='bilinear', antialias=True, align_corners=False)
    return crop[0]


AUTO_AUGMENTS = (None, 'randaugment', 'trivialaugment')


def build_auto_augment(name: Optional[str], magnitude: int = 9):
    """torchvision's RandAugment (2 ops of ``magnitude`` out of 31) or TrivialAugmentWide on uint8 CHW
    tensors; their random draws come from torch's RNG, which ``EpochSeededDataset`` seeds per sample."""
    if name not in AUTO_AUGMENTS:
        raise SettingError(f"data.auto_augment must be one of {AUTO_AUGMENTS}, got {name!r}")
    if name == 'randaugment':
        return v2.RandAugment(num_ops=2, magnitude=magnitude)
    if name == 'trivialaugment':
        return v2.TrivialAugmentWide()
    return None


class TrainPreset:
    """RandomResizedCrop (``crop_scale`` of the area, aspect ``crop_ratio``) + optional horizontal flip, then an
    optional RandAugment / TrivialAugment. ``image_size`` may change between epochs (progressive resizing).
    ``fast_upsample``: full-size JPEG decodes (crops too small for a scaled one) use TurboJPEG's fast chroma
    upsampling; the eval preset never does, so reported accuracy is always on accurately decoded pixels."""

    def __init__(self, image_size: int, crop_scale: Sequence[float] = (0.08, 1.0), hflip: bool = True,
                 reduced_decode: bool = True, auto_augment: Optional[str] = None, magnitude: int = 9,
                 fast_upsample: bool = False, crop_ratio: Sequence[float] = (3 / 4, 4 / 3)) -> None:
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise SettingError(f'data.train_crop_scale must be [min, max] with 0 < min <= max <= 1, got {crop_scale}')
        if not 0 < crop_ratio[0] <= crop_ratio[1]:
            raise SettingError(f'data.train_crop_ratio must be [min, max] with 0 < min <= max, got {crop_ratio}')
        self.image_size = image_size
        self.crop_scale = tuple(crop_scale)
        self.ratio = tuple(crop_ratio)
        self.hflip = hflip
        self.reduced_decode = reduced_decode
        self.fast_upsample = fast_upsample
        self.auto_augment = build_auto_augment(auto_augment, magnitude)

    def __call__(self, image) -> torch.Tensor:
        image = as_image(image)
        *crop_draw, flip_draw = torch.rand(5).tolist()  # one RNG call per sample: they cost ~5 us each
        box = sample_crop(*image.size_hw, self.crop_scale, self.ratio, crop_draw)
        factor = decode_factor(box[2], box[3], self.image_size) if self.reduced_decode else 1
        # At 1/2 scale and below libjpeg-turbo merges chroma upsampling into the scaled IDCT: the fast mode
        # saves nothing there (measured), so it only applies to full-size decodes.
        crop = image.decode_box(box, factor, fast_upsample=self.fast_upsample and factor == 1)
        out = resized_crop(crop, self.image_size)
        out = out.flip(-1) if self.hflip and flip_draw < 0.5 else out
        return self.auto_augment(out) if self.auto_augment is not None else out


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
        return resized_crop(image.decode_box(box, factor), self.image_size)


def eval_image_size(data_cfg) -> int:
    """The evaluation crop side: ``data.eval_image_size``, or ``data.image_size`` when that is unset."""
    return data_cfg.get('eval_image_size') or data_cfg['image_size']


def eval_resize_size(image_size: int, crop_ratio: float) -> int:
    if not 0 < crop_ratio <= 1:
        raise SettingError(f'data.eval_crop_ratio must be in (0, 1], got {crop_ratio}')
    return int(round(image_size / crop_ratio))


class ProgressiveResize:
    """Progressive resizing (fastai; FFCV ramps 160 -> 192 px): the training crop size of each epoch.

    ``start_size`` up to ``ramp_epochs[0]``, ``end_size`` from ``ramp_epochs[1]`` on, linear in between,
    rounded down to a multiple of ``multiple`` px. Epochs count from 1. Called by ``EpochSeededDataset`` in
    each loader worker with the epoch that the sample index encodes, so the size needs no messaging.
    """

    def __init__(self, preset: TrainPreset, start_size: int, end_size: int, ramp_epochs: Sequence[int],
                 multiple: int = 16) -> None:
        first, last = ramp_epochs
        if not (0 < start_size <= end_size and 0 <= first <= last and multiple > 0):
            raise SettingError(f'progressive resizing needs 0 < start size <= data.image_size ({end_size}) and '
                               f'ramp_epochs [first, last] with 0 <= first <= last, got start size {start_size}, '
                               f'ramp_epochs={list(ramp_epochs)}')
        self.preset, self.start_size, self.end_size = preset, start_size, end_size
        self.first, self.last, self.multiple = first, last, multiple

    @classmethod
    def from_scale(cls, preset: TrainPreset, start_scale: float, end_size: int, ramp_epochs: Sequence[int],
                   multiple: int = 16) -> 'ProgressiveResize':
        """Start at ``start_scale`` x ``end_size``, rounded to a multiple of ``multiple`` (0.75 x 128 = 96 px)."""
        if not 0 < start_scale <= 1:
            raise SettingError(f'data.progressive_resize.start_scale must be in (0, 1], got {start_scale}')
        start = max(multiple, int(round(start_scale * end_size / multiple)) * multiple)
        return cls(preset, min(start, end_size), end_size, ramp_epochs, multiple)

    def size_at(self, epoch: int) -> int:
        if epoch <= self.first:
            return self.start_size
        if epoch >= self.last:
            return self.end_size
        frac = (epoch - self.first) / (self.last - self.first)
        size = self.start_size + frac * (self.end_size - self.start_size)
        return max(self.multiple, int(size) // self.multiple * self.multiple)

    def __call__(self, epoch: int) -> None:
        self.preset.image_size = self.size_at(epoch)
