"""Loader factory: datasets, shard samplers and DataLoaders from the ``data`` config section."""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
from ding.utils.registry import Registry
from torch.utils.data import DataLoader, default_collate

from ..errors import SettingError
from .folder import ImageFolderSplit, class_index
from .layouts import find_display_names
from .sampler import DistributedSampler, EpochSeededDataset, TrainBatchSampler
from .transforms import EvalPreset, ProgressiveResize, TrainPreset, eval_image_size

DATA_CONFIG = dict(
    # (str) Data source: 'image_folder' (ImageNet layout below) or another type registered in DATA_REGISTRY.
    type='image_folder',
    # (str) Folder holding train/<class>/* and val/<class>/*. --data-root or $IMAGENET_ROOT override it.
    root=None,
    # (int) Side of the square training and evaluation crops, in px.
    image_size=224,
    # (int) Evaluation crop side if it differs from image_size: a test resolution above the training one often
    # scores higher ("FixRes", Touvron et al. 2019), because RandomResizedCrop magnifies objects in training.
    eval_image_size=None,
    # (list) Area range of RandomResizedCrop, as fractions of the source image.
    train_crop_scale=[0.08, 1.0],
    # (list) Aspect-ratio (width / height) range of RandomResizedCrop. [1, 1] with train_crop_scale [s, 1] is
    # the light augmentation of fastai's Imagenette records: a random square of s..100% of a square image (on
    # other images a square crop too large to fit falls back to the central square), resized, and flipped.
    train_crop_ratio=[0.75, 1.3333333333333333],
    # (bool) Random horizontal flips in training (turn off where mirroring changes the class, e.g. digits).
    hflip=True,
    # (str) Extra training augmentation after crop and flip: None, 'randaugment' or 'trivialaugment'.
    auto_augment=None,
    # (int) RandAugment magnitude (0..30).
    randaugment_magnitude=9,
    # (dict) Progressive resizing: train at start_scale x image_size (rounded to 16 px) up to epoch ramp_epochs[0],
    # at image_size from ramp_epochs[1] on, and at linearly growing sizes in between. start_scale None: off.
    progressive_resize=dict(start_scale=None, ramp_epochs=[0, 0]),
    # (float) Eval resizes the shorter side to image_size / eval_crop_ratio, then takes the center crop.
    eval_crop_ratio=0.875,
    # (int) Loader worker processes per rank; None means one per CPU core available to this process.
    num_workers=None,
    # (bool) Decode a JPEG at 1/2, 1/4 or 1/8 scale when its train or eval crop keeps at least image_size px per
    # side at that scale (the crop is chosen first, on the full-size image, so augmentation is unchanged).
    jpeg_draft=True,
    # (bool) Training crops decoded at full JPEG size (too small for jpeg_draft's scaled decode) upsample the
    # subsampled chroma by repetition instead of libjpeg's smoothing filter (simplejpeg only): ~11% less decode
    # time, a mean pixel difference of ~0.25/255. Eval decodes always use the accurate filter.
    jpeg_fast_upsample=True,
    # (str) JPEG decoder: 'auto' picks the first available of 'region' (our C extension over libjpeg-turbo: decodes
    # only the crop's part of each JPEG, same pixels; built by pip install where libjpeg-turbo's headers are),
    # 'simplejpeg' (libjpeg-turbo's TurboJPEG API, whole images) and 'pil'. Other formats and JPEGs that
    # libjpeg-turbo refuses always go through Pillow.
    decoder='auto',
    # (dict) Settings read only by a non-folder data type (free-form), e.g. the OVERFIT demo's word and size.
    options=dict(),
)

DATA_REGISTRY = Registry()


@dataclass(frozen=True)
class DataCapabilities:
    """What a data source supports, declared by its builder and checked once, when the run's config is completed
    (``config.prepare_config``), so that no shared module has to look at the samples to find out."""
    # Samples are uint8 C x H x W images: test-time augmentation (flips, rescales), channels-last memory, and the
    # image panels in TensorBoard (augmented training images, most confident mistakes) apply.
    images: bool = True
    # The train transform takes a new image size each epoch (data.progressive_resize).
    progressive_resize: bool = True


@dataclass(frozen=True, eq=False)
class PixelMap:
    """A val set that is every pixel of one picture (the OVERFIT demo): after each evaluation the TensorBoard
    visuals draw the model's prediction at every pixel as a picture (``tb_visuals.PixelMapPanel``)."""
    coords: torch.Tensor  # (height * width, ...) model inputs, row by row
    classes: np.ndarray  # (height, width) int class of each pixel; class 0 is drawn white


@dataclass
class ClassificationData:
    """What a data builder returns: loaders, the train sampler (for set_epoch), class names, and what the source
    supports (``capabilities``, and ``pixel_map`` where its val set is one picture's pixels)."""
    train_loader: Optional[DataLoader]  # None where only evaluation was asked for (build_eval_data)
    val_loader: DataLoader
    train_sampler: Optional[DistributedSampler]
    val_sampler: DistributedSampler
    class_names: List[str]
    # Human names in class order (``tench`` for ``n01440764``) where the data has a synset mapping, else None.
    display_names: Optional[List[str]] = None
    capabilities: DataCapabilities = DataCapabilities()
    pixel_map: Optional[PixelMap] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def default_num_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def num_workers(data_cfg: Dict) -> int:
    """``data.num_workers``, or one per available core when it is None."""
    workers = data_cfg.get('num_workers')
    return default_num_workers() if workers is None else workers


def collate_images(batch):
    """``default_collate``, except that the images of ``(image, label)`` items are stacked in NHWC memory.

    The batch is still an ``N x 3 x H x W`` tensor, with channels_last strides: the layout the presets
    produce and the model computes in, so neither the worker (per image) nor the training process (per
    batch) copies pixels between layouts. Any other item structure goes to ``default_collate`` as is."""
    first = batch[0]
    if not (isinstance(first, (tuple, list)) and len(first) == 2 and isinstance(first[0], torch.Tensor)
            and first[0].dim() == 3):
        return default_collate(batch)
    images = default_collate([image.permute(1, 2, 0) for image, _ in batch])  # in shared memory in a worker
    return [images.permute(0, 3, 1, 2), default_collate([label for _, label in batch])]


def shutdown_workers(*loaders: DataLoader) -> None:
    """Stop the persistent worker processes of ``loaders`` now, while the interpreter is fully alive.

    Left to garbage collection at interpreter exit, the workers' stop signal can stay unsent (the queue's
    feeder thread no longer runs), and DataLoader then waits 5 s per worker before killing it: measured
    as 160 s after a finished run with 16 workers per loader (H100 machine, Python 3.12)."""
    for loader in loaders:
        iterator = getattr(loader, '_iterator', None)
        if iterator is not None and hasattr(iterator, '_shutdown_workers'):
            iterator._shutdown_workers()
        loader._iterator = None


def build_datasets(data_cfg: Dict):
    """Train and val ``ImageFolderSplit`` of ``data.root`` with the train / eval presets of the config."""
    root = data_cfg['root']
    class_to_idx = class_index(os.path.join(root, 'train'))
    draft = data_cfg['jpeg_draft']
    train = ImageFolderSplit(
        os.path.join(root, 'train'), class_to_idx,
        TrainPreset(data_cfg['image_size'], data_cfg['train_crop_scale'], data_cfg['hflip'], reduced_decode=draft,
                    crop_ratio=data_cfg['train_crop_ratio'],
                    auto_augment=data_cfg['auto_augment'], magnitude=data_cfg['randaugment_magnitude'],
                    fast_upsample=data_cfg['jpeg_fast_upsample']),
        decoder=data_cfg['decoder'],
    )
    return train, val_split(data_cfg, class_to_idx, allow_empty=True)


def val_split(data_cfg: Dict, class_to_idx: Dict[str, int], allow_empty: bool) -> ImageFolderSplit:
    """``data.root/val`` with the eval preset. An unreadable val file is not replaced (that would count another
    image twice) but marked: its sample gets label -1, which the metric leaves out, so every readable val image
    counts exactly once."""
    return ImageFolderSplit(
        os.path.join(data_cfg['root'], 'val'), class_to_idx,
        EvalPreset(eval_image_size(data_cfg), data_cfg['eval_crop_ratio'], reduced_decode=data_cfg['jpeg_draft']),
        decoder=data_cfg['decoder'], allow_empty=allow_empty, replace_unreadable=False,
    )


def progressive_resize_hook(train_set, data_cfg: Dict) -> Optional[ProgressiveResize]:
    """The per-epoch size hook for ``EpochSeededDataset`` when ``data.progressive_resize`` is on, else None. Only
    sources whose train set has a ``TrainPreset`` declare the capability (``DataCapabilities.progressive_resize``)."""
    spec = data_cfg.get('progressive_resize') or {}
    preset = getattr(train_set, 'transform', None)
    if not spec.get('start_scale') or not isinstance(preset, TrainPreset):
        return None
    return ProgressiveResize.from_scale(preset, spec['start_scale'], data_cfg['image_size'], spec['ramp_epochs'])


def build_loaders(data_cfg: Dict, batch_size: int, eval_batch_size: int, rank: int = 0, world_size: int = 1,
                  seed: int = 0) -> ClassificationData:
    """Train and val loaders for this rank from the ``data`` config, by ``data.type``.

    Batch sizes are per rank; the global batch is ``batch_size * world_size``."""
    if data_cfg['type'] not in DATA_REGISTRY:
        raise SettingError(f"data.type '{data_cfg['type']}' is not one of: {', '.join(sorted(DATA_REGISTRY))}")
    return DATA_REGISTRY[data_cfg['type']](data_cfg, batch_size, eval_batch_size, rank, world_size, seed)


def wrap_loaders(train_set, val_set, data_cfg: Dict, batch_size: int, eval_batch_size: int, rank: int,
                 world_size: int, seed: int, class_names: List[str], display_names: Optional[List[str]] = None,
                 capabilities: DataCapabilities = DataCapabilities()) -> ClassificationData:
    """Shard samplers and DataLoaders around any pair of map-style datasets, with what the source supports."""
    workers = num_workers(data_cfg)
    common = dict(
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        collate_fn=collate_images,
    )
    train_sampler = DistributedSampler(len(train_set), world_size, rank, shuffle=True, seed=seed, encode_epoch=True)
    val_sampler = DistributedSampler(len(val_set), world_size, rank, shuffle=False)
    # Augmentation randomness is a function of (seed, epoch, sample index): independent of worker count and
    # batch order, different on every rank (disjoint indices), and exactly reproduced by a resumed run.
    epoch_hook = progressive_resize_hook(train_set, data_cfg)
    # Each loader draws its workers' base seed from a generator of its own, not from torch's global one, which
    # Mixup/CutMix draw from: otherwise a resumed run (one iterator for all epochs with persistent workers, one
    # per epoch without) would shift the mixing stream, and results would depend on the worker count.
    train_loader = DataLoader(EpochSeededDataset(train_set, seed, epoch_hook),
                              batch_sampler=TrainBatchSampler(train_sampler, batch_size),
                              generator=torch.Generator().manual_seed(seed), **common)
    val_loader = DataLoader(val_set, batch_size=eval_batch_size, sampler=val_sampler,
                            generator=torch.Generator().manual_seed(seed), **common)
    return ClassificationData(train_loader, val_loader, train_sampler, val_sampler, list(class_names),
                              display_names=display_names, capabilities=capabilities)


def build_eval_data(data_cfg: Dict, class_names: List[str], eval_batch_size: int, rank: int = 0,
                    world_size: int = 1) -> ClassificationData:
    """What evaluating a checkpoint needs: the val loader alone, labelled by the checkpoint's class index. For
    image folders no ``train/`` is read (a held-out test folder may have none, and ImageNet's would take minutes
    to list); other data types build their loaders as training does and must have the same classes."""
    if data_cfg['type'] != 'image_folder':
        data = build_loaders(data_cfg, eval_batch_size, eval_batch_size, rank, world_size)
        if list(data.class_names) != list(class_names):
            raise SettingError(f'the checkpoint was trained on {len(class_names)} classes {list(class_names)[:3]}..., '
                               f'but the data has {data.class_names[:3]}...')
        return data
    val = val_split(data_cfg, {name: i for i, name in enumerate(class_names)}, allow_empty=False)
    workers = num_workers(data_cfg)
    sampler = DistributedSampler(len(val), world_size, rank, shuffle=False)
    loader = DataLoader(val, batch_size=eval_batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), collate_fn=collate_images)
    return ClassificationData(None, loader, None, sampler, list(class_names),
                              display_names=find_display_names(data_cfg['root'], list(class_names)))


@DATA_REGISTRY.register('image_folder')
def build_image_folder_loaders(data_cfg: Dict, batch_size: int, eval_batch_size: int, rank: int, world_size: int,
                               seed: int) -> ClassificationData:
    train_set, val_set = build_datasets(data_cfg)
    return wrap_loaders(train_set, val_set, data_cfg, batch_size, eval_batch_size, rank, world_size, seed,
                        train_set.classes, find_display_names(data_cfg['root'], train_set.classes))
