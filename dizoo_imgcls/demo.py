"""The ``--demo`` data set: scikit-learn's handwritten digits (shipped inside the wheel, nothing downloaded),
written once as an ImageFolder cache so the demo runs through exactly the same folder pipeline as ImageNet."""
import logging
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

logger = logging.getLogger('dizoo_imgcls')

DIGITS_CACHE_VERSION = 'digits_v1'
DIGITS_IMAGE_PX = 32
DIGITS_VAL_FRACTION = 0.2

def default_cache_dir() -> str:
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'dizoo_imgcls', DIGITS_CACHE_VERSION)


def prepare_digits(cache_dir: str = None) -> str:
    """Write the 1,797 digits as PNGs under ``cache_dir/{train,val}/<digit>/`` once; return the root.

    The split is stratified and fixed (every 5th image of each class goes to val). The folder is built
    in a temporary directory and renamed into place, so an interrupted first run leaves no half cache.
    """
    from sklearn.datasets import load_digits

    root = cache_dir or default_cache_dir()
    if _complete(root):
        return root
    digits = load_digits()
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix='.digits_tmp_', dir=parent)
    every = int(round(1 / DIGITS_VAL_FRACTION))
    seen_per_class = {}
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        rank_in_class = seen_per_class.get(label, 0)
        seen_per_class[label] = rank_in_class + 1
        split = 'val' if rank_in_class % every == every - 1 else 'train'
        folder = os.path.join(staging, split, str(label))
        os.makedirs(folder, exist_ok=True)
        gray = (255 - pixels * (255.0 / 16.0)).round().astype(np.uint8)  # dark ink on white paper
        image = Image.fromarray(gray, mode='L').resize((DIGITS_IMAGE_PX, DIGITS_IMAGE_PX), Image.BILINEAR)
        image.save(os.path.join(folder, f'{i:04d}.png'))
    try:
        os.rename(staging, root)
    except OSError:
        if _complete(root):  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
        else:  # a damaged cache (a split deleted by hand): replaced by the one just written
            logger.warning(f'the digits cache {root} was incomplete; rebuilt it')
            shutil.rmtree(root, ignore_errors=True)
            os.rename(staging, root)
    return root


def _complete(root: str) -> bool:
    return all(os.path.isdir(os.path.join(root, split)) and os.listdir(os.path.join(root, split))
               for split in ('train', 'val'))
