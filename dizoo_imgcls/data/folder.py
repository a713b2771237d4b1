"""ImageNet-style folders: ``root/train/<class>/*`` and ``root/val/<class>/*``.

The class index is built once from ``train`` and applied to ``val``, so a val folder with a class the
model never saw is reported instead of silently shifting every label after it. A file that turns out to be
no usable image (empty, truncated, not an image, unreadable, over the pixel limit) never stops a run: it is
logged once with its path, replaced by the next readable sample so batch shapes hold, and counted across
all loader worker processes (``skipped_files()``).
"""
import logging
import os
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import UserError
from .decode import UnreadableImageError, is_hidden, pil_to_rgb, read_image_file, resolve_decoder

# Label of a placeholder sample standing in for an unreadable eval file; metrics leave it out.
IGNORE_LABEL = -1
EXPECTED_LAYOUT = 'ROOT/train/<class>/<image> and ROOT/val/<class>/<image>'
logger = logging.getLogger('dizoo_imgcls')


class DataLayoutError(UserError):
    """The data folder does not have the expected layout; the message names the path and the problem."""


class UnreadableSplitError(UserError, ValueError):
    """No file of a split is a usable image; the message names the split folder and an example reason."""


def load_rgb(path: str, draft_size: Optional[int] = None) -> Image.Image:
    """Open an image as 8-bit RGB with Pillow (grayscale, palette, CMYK, RGBA and 16-bit all become RGB), turned
    upright by its EXIF orientation; Pillow's own exceptions pass through.

    ``draft_size`` lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale while the shorter side stays at
    least ``draft_size`` px.
    """
    with open(path, 'rb') as f:
        img = Image.open(f)
        if draft_size is not None and img.format == 'JPEG':
            img.draft('RGB', (draft_size, draft_size))
        img = pil_to_rgb(ImageOps.exif_transpose(img))  # upright, as the training reader sees it
        img.load()
        return img


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: the same path spelled differently, a symlink to it, a hard link."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they would be
        return os.path.realpath(a) == os.path.realpath(b)


def is_within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it, after resolving symlinks (of existing parents too)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)


def class_index(train_dir: str) -> Dict[str, int]:
    """Sorted class folder names of ``train_dir`` mapped to 0..C-1."""
    if not os.path.isdir(train_dir):
        raise DataLayoutError(f'no training folder at {train_dir} (expected layout: {EXPECTED_LAYOUT})')
    classes = sorted(e.name for e in os.scandir(train_dir) if entry_kind(e) == 'dir' and not is_hidden(e.name))
    if not classes:
        raise DataLayoutError(f'{train_dir} has no class sub-folders (expected layout: {EXPECTED_LAYOUT})')
    return {name: i for i, name in enumerate(classes)}


def entry_kind(entry: os.DirEntry) -> str:
    """'dir', 'file', 'dangling' (a symlink to nothing or to itself) or 'other' (pipes, sockets, devices, and
    symlinks to them: opening one for reading can block forever)."""
    try:
        if entry.is_dir():
            return 'dir'
        if entry.is_file():
            return 'file'
    except OSError:  # ELOOP: a symlink to itself, or a cycle of them
        return 'dangling'
    return 'dangling' if entry.is_symlink() and not os.path.exists(entry.path) else 'other'


def list_image_files(folder: str, _listed: Optional[set] = None) -> List[str]:
    """Image files under ``folder`` (recursively, sorted), relative to it. Hidden files and folders are left
    out, and so are pipes, sockets and devices and links to them (reading one would block); broken symlinks
    stay in, so the loader reports them. A folder reached twice (a symlink loop, or a link to a folder already
    listed; ``_listed`` carries the folders listed so far across calls) is a ``DataLayoutError``: its images
    would be listed forever, or twice."""
    listed = set() if _listed is None else _listed
    real = os.path.realpath(folder)
    if real in listed:
        raise DataLayoutError(f'{folder} is {real}, a folder already listed (a symlink loop or a second link to '
                              'it): its images would be read twice; remove the link')
    listed.add(real)
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if is_hidden(entry.name):
                continue
            kind = entry_kind(entry)
            if kind == 'dir':
                found.extend(os.path.join(entry.name, name) for name in list_image_files(entry.path, listed))
            elif kind in ('file', 'dangling') and is_image_file(entry.name):
                found.append(entry.name)
    return sorted(found)


class PathTable:
    """Many relative paths packed into two numpy arrays (bytes + offsets).

    A Python list of a million strings is a million refcounted objects: every worker process that reads
    them writes their refcounts and so copies the pages, and RSS grows by the list's size per worker.
    """

    def __init__(self, paths: List[str]) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._blob = np.frombuffer(b''.join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        return os.fsdecode(self._blob[self._offsets[index]:self._offsets[index + 1]].tobytes())


def check_split_classes(split_dir: str, class_to_idx: Dict[str, int]) -> None:
    """A split may lack classes of the index, but must not have classes that the index lacks."""
    present = {e.name for e in os.scandir(split_dir) if entry_kind(e) == 'dir' and not is_hidden(e.name)}
    unknown = sorted(present - set(class_to_idx))
    if unknown:
        shown = ', '.join(unknown[:5]) + (' ...' if len(unknown) > 5 else '')
        raise DataLayoutError(
            f'{split_dir} has {len(unknown)} class folder(s) that the training folder does not have: {shown}')


def scan_split(split_dir: str, class_to_idx: Dict[str, int]) -> Tuple[List[str], List[int], List[str]]:
    """(relative paths, class indices, class folders with no image) of one split; sorted by class, then path."""
    paths, targets, empty = [], [], []
    listed = set()  # one set for all classes: a link into another class folder would give its images two labels
    for name, index in sorted(class_to_idx.items(), key=lambda item: item[1]):
        folder = os.path.join(split_dir, name)
        if not os.path.isdir(folder):
            continue  # a val split may lack classes; train cannot (its folders define them)
        files = list_image_files(folder, listed)
        if not files:
            empty.append(folder)
        paths.extend(os.path.join(name, f) for f in files)
        targets.extend([index] * len(files))
    return paths, targets, empty


class ImageFolderSplit(Dataset):
    """One split (``root/<class>/*``) with the class index fixed from outside.

    Items are ``(transform(image), class index)``; the transform receives an ``EncodedImage`` (see
    ``transforms.py``), or, with ``transform=None``, the item is the full image as a uint8 CHW tensor.
    With ``replace_unreadable=False`` (evaluation) an unreadable file is not replaced by its neighbour but
    yields a black image of the transform's size with label ``IGNORE_LABEL``, which the metric skips.
    """

    def __init__(self, root: str, class_to_idx: Dict[str, int], transform: Optional[Callable] = None,
                 decoder: str = 'auto', allow_empty: bool = False, replace_unreadable: bool = True) -> None:
        if not os.path.isdir(root):
            raise DataLayoutError(f'no folder at {root} (expected layout: {EXPECTED_LAYOUT})')
        self.root = root
        self.class_to_idx = dict(class_to_idx)
        check_split_classes(root, self.class_to_idx)
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.get)
        self.transform = transform
        self.replace_unreadable = replace_unreadable
        self.decoder = resolve_decoder(decoder)
        paths, targets, self.empty_class_folders = scan_split(root, self.class_to_idx)
        if not paths and not allow_empty:
            raise DataLayoutError(f'{root} has no image files in its class folders (expected layout: '
                                  f'{EXPECTED_LAYOUT}; extensions: {", ".join(IMG_EXTENSIONS)})')
        for folder in self.empty_class_folders:
            logger.warning(f'{folder} holds no image: its class keeps its index but gets no samples from {root}')
        self.paths = PathTable(paths)
        self.targets = np.asarray(targets, dtype=np.int64)
        # One flag per sample, in shared memory made here in the main process: loader workers set it when a
        # file turns out unreadable, so the file is skipped (and logged) once and counted once over all workers.
        self._unreadable = torch.zeros(len(paths), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.paths[index])

    def skipped_files(self) -> int:
        """How many files turned out unreadable so far, over all worker processes (each counted once)."""
        return int(self._unreadable.sum())

    def sync_skipped_files(self) -> int:
        """``skipped_files()`` over all DDP ranks: a collective (every rank calls it) after which each rank also
        knows the files the others found unreadable, and skips them without trying them again."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = 'cuda' if dist.get_backend() == 'nccl' else 'cpu'
            merged = self._unreadable.to(device, copy=True)
            dist.all_reduce(merged, op=dist.ReduceOp.MAX)
            self._unreadable.copy_(merged.cpu())
        return self.skipped_files()

    def __getitem__(self, index: int):
        if not self.replace_unreadable:
            return self._item_or_placeholder(index)
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if self._unreadable[candidate]:
                continue
            try:
                image = read_image_file(self.path(candidate), self.decoder)
                item = self.transform(image) if self.transform is not None else self._full_image(image)
            except UnreadableImageError as e:
                self._mark_unreadable(candidate, str(e))
                continue
            return item, int(self.targets[candidate])
        raise UnreadableSplitError(f'no readable image left in {self.root}: all {len(self)} files failed to decode '
                                   '(see the log for the reason of each)')

    def _item_or_placeholder(self, index: int):
        if not self._unreadable[index]:
            try:
                image = read_image_file(self.path(index), self.decoder)
                item = self.transform(image) if self.transform is not None else self._full_image(image)
                return item, int(self.targets[index])
            except UnreadableImageError as e:
                self._mark_unreadable(index, str(e))
        size = getattr(self.transform, 'image_size', None)
        if size is None:
            raise RuntimeError(f'{self.path(index)} is unreadable and the transform has no image_size for a '
                               'placeholder')
        return torch.zeros(3, size, size, dtype=torch.uint8), IGNORE_LABEL

    def _mark_unreadable(self, index: int, reason: str) -> None:
        if not self._unreadable[index]:
            self._unreadable[index] = 1
            action = 'replaced by another sample' if self.replace_unreadable else 'left out of the metrics'
            # every rank writes these to train.log (runtime.setup_logging): each sees its own shard's files
            logger.warning(f'skipping unreadable image {self.path(index)}: {reason} ({action})',
                           extra={'bad_file': True})

    @staticmethod
    def _full_image(image) -> torch.Tensor:
        return torch.from_numpy(image.decode(1)).permute(2, 0, 1).contiguous()
