"""The OVERFIT demo's data (``data.type='overfit'``): classify pixel coordinates of a black-and-white image.

The image is the word OVERFIT rendered with PIL (no file needed) or any picture given by
``data.options.image_path``. A sample is a raw ``(y, x)`` pixel coordinate (float32) and its label:
0 = background (light), 1 = ink (dark). Training draws pixels uniformly at random; the val set is every
pixel, so eval acc1 is the pixel accuracy of the whole predicted image. The source hands the run that pixel grid
(``ClassificationData.pixel_map``), and the TensorBoard visuals draw the model's prediction for every pixel after
each evaluation (and a PNG at the end).
"""
import difflib
import os
from typing import Dict

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import SettingError, UserError
from .loader import DATA_REGISTRY, ClassificationData, DataCapabilities, PixelMap, wrap_loaders

CLASS_NAMES = ['background', 'ink']

OVERFIT_OPTIONS = dict(
    # (str) Word rendered black on white and then fitted; ignored when image_path is set.
    text='OVERFIT',
    # (str) Your own image to fit instead of the word: pixels darker than ink_threshold are ink.
    image_path=None,
    # (list) [height, width] in px of the rendered word, or the size the image_path picture is resized to.
    # The val set is every pixel of it; keep policy.model.coord_hw equal to it.
    image_hw=[300, 1000],
    # (int) Grayscale level (0..255) below which a pixel counts as ink.
    ink_threshold=128,
    # (int) Pixels drawn uniformly at random (with replacement, once, seeded by the run's seed) as the training
    # set; one epoch is one pass over them, so this also sets how often the evaluator draws the prediction map.
    samples_per_epoch=153_600,
)


def overfit_options(options: Dict) -> Dict:
    """``data.options`` merged over ``OVERFIT_OPTIONS``; an unknown key is an error naming the closest ones."""
    for key in options:
        if key not in OVERFIT_OPTIONS:
            close = difflib.get_close_matches(key, list(OVERFIT_OPTIONS), n=3, cutoff=0.5)
            hint = f"; closest: {', '.join('data.options.' + c for c in close)}" if close else ''
            raise SettingError(f"unknown key 'data.options.{key}' for data.type 'overfit'{hint}")
    merged = dict(OVERFIT_OPTIONS, **options)
    hw = merged['image_hw']
    if len(hw) != 2 or any(not isinstance(s, int) or s < 2 for s in hw):
        raise SettingError(f'data.options.image_hw must be [height, width] in px (each >= 2), got {hw!r}')
    if not isinstance(merged['samples_per_epoch'], int) or merged['samples_per_epoch'] < 2:
        raise SettingError(f"data.options.samples_per_epoch must be an integer >= 2, got "
                           f"{merged['samples_per_epoch']!r}")
    return merged


def render_text(text: str, height_px: int, width_px: int, margin: float = 0.08) -> np.ndarray:
    """``text`` in black on white, scaled to fill the canvas less a margin and centred; grayscale uint8."""
    if not text:
        raise SettingError('data.options.text is empty: give a word to render or set data.options.image_path')
    canvas = Image.new('L', (width_px, height_px), 255)
    draw = ImageDraw.Draw(canvas)
    box_w, box_h = width_px * (1 - 2 * margin), height_px * (1 - 2 * margin)
    try:
        font = ImageFont.load_default(size=100)
    except TypeError as e:  # Pillow < 10.1 ships only a fixed 11 px bitmap font
        raise UserError('rendering data.options.text needs Pillow >= 10.1 (a scalable default font); '
                        'upgrade Pillow or set data.options.image_path') from e
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    size = max(1, int(100 * min(box_w / (right - left), box_h / (bottom - top))))
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    origin = ((width_px - (right - left)) / 2 - left, (height_px - (bottom - top)) / 2 - top)
    draw.text(origin, text, fill=0, font=font)
    return np.asarray(canvas)


def load_grayscale(path: str, height_px: int, width_px: int) -> np.ndarray:
    """The picture at ``path`` as grayscale uint8, resized to height x width px when it differs."""
    if not os.path.isfile(path):
        raise SettingError(f'data.options.image_path: no such file: {path}')
    try:
        with Image.open(path) as image:
            gray = image.convert('L')
    except (UnidentifiedImageError, OSError) as e:
        raise SettingError(f'data.options.image_path: cannot read {path} as an image ({e})') from e
    if gray.size != (width_px, height_px):
        gray = gray.resize((width_px, height_px), Image.BILINEAR)
    return np.asarray(gray)


def ink_mask(options: Dict) -> np.ndarray:
    """(H, W) bool array, True where the image is ink; both classes must be present."""
    height, width = options['image_hw']
    path = options['image_path']
    gray = load_grayscale(path, height, width) if path else render_text(options['text'], height, width)
    mask = gray < options['ink_threshold']
    if mask.all() or not mask.any():
        source = f"image {path}" if path else f"text '{options['text']}'"
        raise SettingError(f"{source} has {'only' if mask.all() else 'no'} pixels darker than "
                           f"data.options.ink_threshold={options['ink_threshold']}: both classes are needed")
    return mask


class PixelCoordinates(Dataset):
    """(coordinate, label) pairs: float32 ``[y, x]`` in raw pixel units and an int64 class index."""

    def __init__(self, coords: torch.Tensor, labels: torch.Tensor) -> None:
        self.coords = coords
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.coords[index], self.labels[index]

    @classmethod
    def full_grid(cls, mask: np.ndarray) -> 'PixelCoordinates':
        """Every pixel once, row by row (so predictions reshape straight back to (H, W))."""
        height, width = mask.shape
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing='ij')
        coords = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1).float()
        return cls(coords, torch.from_numpy(mask.reshape(-1)).long())

    @classmethod
    def uniform_sample(cls, mask: np.ndarray, num_samples: int, seed: int) -> 'PixelCoordinates':
        """``num_samples`` pixels drawn uniformly with replacement."""
        height, width = mask.shape
        generator = torch.Generator().manual_seed(seed)
        flat = torch.randint(0, height * width, (num_samples, ), generator=generator)
        coords = torch.stack([flat // width, flat % width], dim=1).float()
        return cls(coords, torch.from_numpy(mask.reshape(-1))[flat].long())


@DATA_REGISTRY.register('overfit')
def build_overfit_loaders(data_cfg: Dict, batch_size: int, eval_batch_size: int, rank: int, world_size: int,
                          seed: int) -> ClassificationData:
    options = overfit_options(data_cfg['options'])
    mask = ink_mask(options)
    train_set = PixelCoordinates.uniform_sample(mask, options['samples_per_epoch'], seed)
    val_set = PixelCoordinates.full_grid(mask)
    data = wrap_loaders(train_set, val_set, data_cfg, batch_size, eval_batch_size, rank, world_size, seed,
                        CLASS_NAMES, capabilities=DataCapabilities(images=False, progressive_resize=False))
    data.pixel_map = PixelMap(val_set.coords, mask.astype(np.int64))  # class 1 (ink) where the mask is set
    return data
