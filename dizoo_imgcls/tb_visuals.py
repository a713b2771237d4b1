"""TensorBoard pictures of a run, written by rank 0 through the run's writer.

At the start a grid of augmented training images; after each evaluation a confusion matrix, per-class
accuracy and the most confidently wrong val images (from ``DiagnosticMetric``, so the val set is not run
twice; only the few wrong images are read again, by index), and, where the val set is one picture's pixels
(``ClassificationData.pixel_map``, the OVERFIT demo), the model's prediction at every pixel as a picture;
at the end an hparams entry.
"""
import logging
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .metric import DiagnosticMetric

# Stable TensorBoard tags: dashboards and tests rely on these names.
IMAGE_TAGS = {'train_grid': 'train/augmented_images', 'confusion': 'eval/confusion_matrix',
              'mistakes': 'eval/most_confident_mistakes', 'pixel_target': 'overfit/target',
              'pixel_prediction': 'overfit/prediction'}
PER_CLASS_PREFIX = 'eval_per_class/'
PER_CLASS_HISTOGRAM = 'eval/per_class_acc1'

GRID_IMAGES = 16  # tiles in each image grid
TILE_PX = 128  # side of a grid tile: small crops are enlarged and big ones reduced, so captions stay legible
MAX_PER_CLASS_SCALARS = 100  # more classes: the per-class histogram only (1,000 tags would bury the dashboard)
MAX_LABELLED_CLASSES = 40  # confusion matrix: names and counts are drawn up to this many classes
PIXEL_MAP_CHUNK = 65536  # pixel coordinates per forward pass when drawing a pixel map (bounds memory)
PIXEL_MAP_PNG = 'prediction.png'  # the last pixel map, in the experiment folder

logger = logging.getLogger('dizoo_imgcls')


def _font(size_px: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size_px)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def as_hwc(image: Any) -> Optional[np.ndarray]:
    """A uint8 CHW tensor with 1 or 3 channels as an HWC RGB array; None for anything that is not an image."""
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3 \
            or image.shape[0] not in (1, 3):
        return None
    return image.expand(3, -1, -1).permute(1, 2, 0).contiguous().numpy()


def _fit_line(draw: ImageDraw.ImageDraw, text: str, font, width_px: int) -> str:
    if draw.textlength(text, font=font) <= width_px:
        return text
    while text and draw.textlength(text + '...', font=font) > width_px:
        text = text[:-1]
    return text + '...'


def caption_tile(image: np.ndarray, caption: str, tile_px: int = TILE_PX) -> Image.Image:
    """The image resized to ``tile_px`` square with ``caption`` (lines split on newlines) drawn below it."""
    font = _font(11)
    lines = caption.split('\n')
    line_px = 13
    tile = Image.new('RGB', (tile_px, tile_px + line_px * len(lines) + 4), (255, 255, 255))
    picture = Image.fromarray(image)
    resample = Image.NEAREST if max(picture.size) < tile_px else Image.BILINEAR
    tile.paste(picture.resize((tile_px, tile_px), resample), (0, 0))
    draw = ImageDraw.Draw(tile)
    for row, line in enumerate(lines):
        draw.text((2, tile_px + 2 + row * line_px), _fit_line(draw, line, font, tile_px - 4), fill=(0, 0, 0),
                  font=font)
    return tile


def image_grid(images: Sequence[np.ndarray], captions: Sequence[str], columns: int = 4,
               tile_px: int = TILE_PX) -> np.ndarray:
    """Captioned tiles in rows of ``columns``, 2 px apart, as one HWC uint8 array."""
    if not images:
        raise ValueError('image_grid needs at least one image')
    tiles = [caption_tile(img, cap, tile_px) for img, cap in zip(images, captions)]
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    width, height = tiles[0].size[0], max(t.size[1] for t in tiles)
    grid = Image.new('RGB', (columns * (width + 2) - 2, rows * (height + 2) - 2), (128, 128, 128))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * (width + 2), (i // columns) * (height + 2)))
    return np.asarray(grid)


def confusion_image(confusion: torch.Tensor, names: Sequence[str]) -> np.ndarray:
    """Row-normalized confusion matrix (rows: true class, columns: predicted) as an HWC uint8 heat map, white
    (0%) to blue (100%); up to ``MAX_LABELLED_CLASSES`` classes with names and counts, else one cell per pair."""
    counts = confusion.double()
    share = (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    heat = (255 * (1 - share)).astype(np.uint8)
    cells = np.stack([heat, heat, np.full_like(heat, 255)], axis=-1)
    if len(names) > MAX_LABELLED_CLASSES:
        scale = max(1, 512 // len(names))
        return np.ascontiguousarray(cells.repeat(scale, axis=0).repeat(scale, axis=1))
    return _labelled_confusion(cells, share, confusion, names)


def _labelled_confusion(cells: np.ndarray, share: np.ndarray, confusion: torch.Tensor,
                        names: Sequence[str]) -> np.ndarray:
    n, font = len(names), _font(11)
    cell, left, top = min(48, max(24, 480 // n)), 120, 34
    title = 'rows: true class, columns: predicted; colour: share of the row'
    width = max(left + n * cell + 1, int(font.getlength(title)) + 6)
    image = Image.new('RGB', (width, top + n * cell + 1), (255, 255, 255))
    image.paste(Image.fromarray(cells).resize((n * cell, n * cell), Image.NEAREST), (left, top))
    draw = ImageDraw.Draw(image)
    draw.text((2, 2), title, fill=(0, 0, 0), font=font)
    for k in range(n + 1):  # grid lines
        draw.line([(left, top + k * cell), (left + n * cell, top + k * cell)], fill=(160, 160, 160))
        draw.line([(left + k * cell, top), (left + k * cell, top + n * cell)], fill=(160, 160, 160))
    for i, name in enumerate(names):
        middle = top + i * cell + cell // 2
        draw.text((2, middle), _fit_line(draw, f'{i} {name}', font, left - 6), fill=(0, 0, 0), font=font,
                  anchor='lm')
        draw.text((left + i * cell + cell // 2, top - 2), str(i), fill=(0, 0, 0), font=font, anchor='mb')
        for j in range(n):
            colour = (255, 255, 255) if share[i, j] > 0.5 else (0, 0, 0)
            draw.text((left + j * cell + cell // 2, middle), str(int(confusion[i, j])), fill=colour, font=font,
                      anchor='mm')
    return np.asarray(image)


def per_class_tags(names: Sequence[str]) -> List[str]:
    """``eval_per_class/<name>``, made tag-safe and unique (ImageNet has two classes called 'crane')."""
    tags, used = [], set()
    for i, name in enumerate(names):
        tag = PER_CLASS_PREFIX + (re.sub(r'[^\w.-]+', '_', name).strip('_') or f'class_{i}')
        if tag in used:
            tag = f'{tag}_{i}'
        used.add(tag)
        tags.append(tag)
    return tags


def spread_indices(length: int, count: int) -> List[int]:
    """``count`` indices spread evenly over ``range(length)`` (class-sorted folders then show many classes)."""
    return sorted({int(i) for i in np.linspace(0, length - 1, num=min(count, length)).round()}) if length else []


class TensorBoardVisuals:
    """Image and per-class panels of one run: ``log_training_images`` once before training, ``after_eval`` after
    each evaluation (both write on rank 0 only)."""

    def __init__(self, tb, data, metric: DiagnosticMetric, rank: int = 0) -> None:
        self._tb = tb
        self._data = data
        self._metric = metric
        self._rank = rank
        names = list(getattr(data, 'display_names', None) or data.class_names)
        # The model may have more outputs than the folder has classes (policy.model.num_classes).
        self.names = names + [f'class_{i}' for i in range(len(names), metric.num_classes)]
        self._tags = per_class_tags(self.names)
        self._pixel_map = PixelMapPanel(tb, data.pixel_map, self.names) if data.pixel_map is not None else None

    def log_training_images(self, step: int = 0) -> None:
        """A grid of training images as the model gets them (augmented, epoch-0 draws), captioned by class."""
        if self._rank != 0 or not self._data.capabilities.images:  # e.g. the OVERFIT demo's pixel coordinates
            return
        dataset = self._data.train_loader.dataset
        pictures = [(as_hwc(image), label) for image, label in
                    (dataset[i] for i in spread_indices(len(dataset), GRID_IMAGES))]
        if not pictures:
            return
        grid = image_grid([image for image, _ in pictures], [self.names[label] for _, label in pictures])
        self._tb.add_image(IMAGE_TAGS['train_grid'], grid, step, dataformats='HWC')

    def after_eval(self, policy, step: int, exp_dir: str, final: bool) -> None:
        """The panels of the evaluation just done by ``policy`` (DI-engine eval mode) at iteration ``step``;
        ``final``: the run's last evaluation."""
        if self._rank != 0:
            return
        if self._pixel_map is not None:
            self._pixel_map.log(policy, step, exp_dir if final else None)
        diagnostics = self._metric.last_diagnostics
        if diagnostics is None:
            return
        self._tb.add_image(IMAGE_TAGS['confusion'], confusion_image(diagnostics.confusion, self.names), step,
                           dataformats='HWC')
        accuracy = diagnostics.per_class_accuracy()
        seen = accuracy[~accuracy.isnan()]
        if seen.numel():
            self._tb.add_histogram(PER_CLASS_HISTOGRAM, seen.numpy(), step)
        if len(self.names) <= MAX_PER_CLASS_SCALARS:
            for tag, value in zip(self._tags, accuracy.tolist()):
                if not math.isnan(value):  # a class with no val sample has no accuracy
                    self._tb.add_scalar(tag, value, step)
        self._log_mistakes(diagnostics.mistakes, step)
        self._tb.flush()

    def _log_mistakes(self, mistakes, step: int) -> None:
        if not self._data.capabilities.images:
            return
        dataset = self._data.val_loader.dataset
        images, captions = [], []
        for mistake in mistakes:
            images.append(as_hwc(dataset[mistake.index][0]))
            captions.append(f'{self.names[mistake.target]} /\n{self.names[mistake.predicted]} '
                            f'({mistake.confidence:.2f})')
        if images:
            self._tb.add_image(IMAGE_TAGS['mistakes'], image_grid(images, captions), step, dataformats='HWC')


class PixelMapPanel:
    """A val set that is one picture's pixels (``data.PixelMap``): the target once (``overfit/target``) and the
    model's P(class 0) at every pixel after each evaluation (``overfit/prediction``; class 0 white, as in the
    target), and ``prediction.png`` in the experiment folder after the last."""

    def __init__(self, tb, pixel_map, class_names: Sequence[str]) -> None:
        self._tb = tb
        self._map = pixel_map
        self._names = class_names
        self._logged_target = False

    def log(self, policy, step: int, png_dir: Optional[str] = None) -> None:
        classes = self._map.classes
        if not self._logged_target:
            counts = np.bincount(classes.reshape(-1), minlength=len(self._names))
            shares = ', '.join(f'{name} {100.0 * n / classes.size:.1f}%' for name, n in zip(self._names, counts))
            majority = int(counts.argmax())
            logger.info(f'pixel map: {classes.shape[0]}x{classes.shape[1]} px ({shares}); predicting '
                        f'{self._names[majority]} everywhere scores {100.0 * counts[majority] / classes.size:.1f}%')
            self._check_model_size(policy)
            self._tb.add_image(IMAGE_TAGS['pixel_target'], gray_image(classes == 0), step, dataformats='HW')
            self._logged_target = True
        image = gray_image(self.class0_probability(policy))
        self._tb.add_image(IMAGE_TAGS['pixel_prediction'], image, step, dataformats='HW')
        self._tb.flush()
        if png_dir is not None:
            path = os.path.join(png_dir, PIXEL_MAP_PNG)
            Image.fromarray(image, mode='L').save(path)
            logger.info(f'predicted image: {path}')

    def class0_probability(self, policy) -> np.ndarray:
        coords = self._map.coords
        chunks = [policy.forward(coords[i:i + PIXEL_MAP_CHUNK])['logit']
                  for i in range(0, len(coords), PIXEL_MAP_CHUNK)]
        return torch.softmax(torch.cat(chunks).float(), dim=1)[:, 0].reshape(self._map.classes.shape).numpy()

    def _check_model_size(self, policy) -> None:
        """A coordinate model scales its inputs by its ``coord_hw``: warn when that is not the picture's size."""
        coord_hw: Optional[Sequence[int]] = getattr(policy.get_attribute('eval_model'), 'coord_hw', None)
        if coord_hw is not None and tuple(coord_hw) != self._map.classes.shape:
            logger.warning(f'policy.model.coord_hw={list(coord_hw)} but the image is {list(self._map.classes.shape)} '
                           'px: the input scaling does not span the image; set both to the same [height, width]')


def gray_image(values01: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as a uint8 grayscale image (1 = white)."""
    return np.clip(np.rint(np.asarray(values01, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def hparams_of(cfg: Dict[str, Any], world_size: int) -> Dict[str, Any]:
    """The config values that most often explain a difference between two runs, as TensorBoard hparams."""
    learn, data = cfg['policy']['learn'], cfg['data']
    values = {
        'model': cfg['policy']['model']['name'], 'image_size': data['image_size'],
        'global_batch_size': learn['batch_size'] * world_size, 'lr_per_256': learn['lr_per_256'],
        'optimizer': learn['optimizer'], 'lr_schedule': learn['lr_schedule'], 'epochs': learn['train_epoch'],
        'warmup_epochs': learn['warmup_epochs'], 'weight_decay': learn['weight_decay'],
        'label_smoothing': learn['label_smoothing'], 'amp': learn['amp'],
        'train_crop_scale': str(list(data['train_crop_scale'])), 'seed': cfg['seed'], 'world_size': world_size,
        'eval_image_size': data.get('eval_image_size') or data['image_size'],
        'auto_augment': str(data.get('auto_augment')), 'mix': str(dict(learn.get('mix', {}))),
        'ema': str(dict(learn.get('ema', {}))), 'progressive_resize': str(dict(data.get('progressive_resize', {}))),
    }
    return {k: v if isinstance(v, (bool, str, int, float)) else str(v) for k, v in values.items()}


def log_hparams(tb, cfg: Dict[str, Any], summary: Dict[str, Any], world_size: int, step: int) -> None:
    """One hparams session (run ``hparams`` under the TensorBoard folder) linking config to final metrics."""
    metrics = {f'hparam/{key}': summary[key] for key in ('acc1', 'acc5', 'loss', 'best_acc1', 'train_img_per_sec', 'acc1_tta',
                                                  'acc1_ema')
               if summary.get(key) is not None}
    if metrics:
        tb.add_hparams(hparams_of(cfg, world_size), metrics, name='hparams', global_step=step)
