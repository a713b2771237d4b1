"""ImageNet-style folders: ``root/train/<class>/*`` and ``root/val/<class>/*``.

The class index is built once from ``train`` and applied to ``val``, so a val folder with a class the
model never saw is reported instead of silently shifting every label after it.
"""
import os
from typing import Callable, Dict, List, Optional, Tuple

from PIL import Image
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS

EXPECTED_LAYOUT = 'ROOT/train/<class>/<image> and ROOT/val/<class>/<image>'


class DataLayoutError(Exception):
    """The data folder does not have the expected layout; the message names the path and the problem."""


def load_rgb(path: str, draft_size: Optional[int] = None) -> Image.Image:
    """Open an image as RGB (grayscale, palette, CMYK and RGBA all become 3 channels).

    ``draft_size`` lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale when the shorter side stays at
    least ``draft_size`` px: the decode cost drops with the pixel count and the result is identical to
    what a later downscale would see at that resolution.
    """
    with open(path, 'rb') as f:
        img = Image.open(f)
        if draft_size is not None and img.format == 'JPEG':
            img.draft('RGB', (draft_size, draft_size))
        return img.convert('RGB')


def class_index(train_dir: str) -> Dict[str, int]:
    """Sorted class folder names of ``train_dir`` mapped to 0..C-1."""
    if not os.path.isdir(train_dir):
        raise DataLayoutError(f'no training folder at {train_dir} (expected layout: {EXPECTED_LAYOUT})')
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith('.'))
    if not classes:
        raise DataLayoutError(f'{train_dir} has no class sub-folders (expected layout: {EXPECTED_LAYOUT})')
    return {name: i for i, name in enumerate(classes)}


class ImageFolderSplit(datasets.ImageFolder):
    """torchvision's ImageFolder with the class index fixed from outside and every image read as RGB."""

    def __init__(self, root: str, class_to_idx: Dict[str, int], transform: Optional[Callable] = None,
                 draft_size: Optional[int] = None, allow_empty: bool = False) -> None:
        self._given_class_to_idx = dict(class_to_idx)
        self.draft_size = draft_size
        if not os.path.isdir(root):
            raise DataLayoutError(f'no folder at {root} (expected layout: {EXPECTED_LAYOUT})')
        super().__init__(root, transform=transform, loader=self._load, allow_empty=allow_empty)

    def _load(self, path: str) -> Image.Image:
        return load_rgb(path, self.draft_size)

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        present = {e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith('.')}
        unknown = sorted(present - set(self._given_class_to_idx))
        if unknown:
            shown = ', '.join(unknown[:5]) + (' ...' if len(unknown) > 5 else '')
            raise DataLayoutError(
                f'{directory} has {len(unknown)} class folder(s) that the training folder does not have: {shown}'
            )
        classes = sorted(self._given_class_to_idx, key=self._given_class_to_idx.get)
        return classes, self._given_class_to_idx


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)
