"""``--check-data``: decode every train and val image once, in parallel, and list each file that is no usable
image with the reason, without training. ``check_splits_readable``: the quick check that every run makes
before its first epoch."""
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Tuple

import numpy as np

from .decode import UnreadableImageError, is_hidden, load_rgb_array, read_image_file, resolve_decoder
from .folder import (EXPECTED_LAYOUT, DataLayoutError, ImageFolderSplit, UnreadableSplitError, check_split_classes,
                     class_index, is_image_file, scan_split)
from .loader import num_workers

FILES_PER_TASK = 64
SAMPLE_FILES = 64  # files of each split fully decoded before the first epoch (spread over the split)
logger = logging.getLogger('dizoo_imgcls')


def _spread(count: int, sample: int) -> List[int]:
    """Up to ``sample`` indices evenly spread over ``range(count)`` (every class of a class-sorted split)."""
    return sorted(set(np.linspace(0, count - 1, num=min(count, sample)).round().astype(int).tolist()))


def check_split_readable(split: ImageFolderSplit, name: str, all_headers: bool, sample: int = SAMPLE_FILES) -> None:
    """Raise ``UnreadableSplitError`` when no file of ``split`` is a usable image; log one warning when some of
    those checked are not. ``all_headers``: every file is opened and its header read (what an empty, missing or
    non-image file fails on; ~20 us per 224 px JPEG once read), not only the sample. ``sample`` files spread
    over the split are decoded fully; only when all of them fail are the others decoded, until one works."""
    count = len(split)
    bad: Dict[int, str] = {}
    if all_headers:
        for index in range(count):
            reason = check_file(split.path(index), split.decoder, decode=False)
            if reason is not None:
                bad[index] = reason
    sampled = [index for index in _spread(count, sample) if index not in bad]
    for index in sampled:
        reason = check_file(split.path(index), split.decoder)
        if reason is not None:
            bad[index] = reason
    checked = set(range(count)) if all_headers else set(sampled)
    if all(index in bad for index in sampled):  # nothing decoded: try the other files until one does
        for index in (i for i in range(count) if i not in bad and i not in sampled):
            checked.add(index)
            reason = check_file(split.path(index), split.decoder)
            if reason is None:
                break
            bad[index] = reason
    if not bad:
        return
    index, reason = min(bad.items())
    if len(bad) == count:
        raise UnreadableSplitError(f'no readable image in {split.root}: all {count} {name} files fail to decode, '
                                   f'e.g. {split.path(index)}: {reason} (list them all with --check-data)')
    fate = 'replaced by other samples' if split.replace_unreadable else 'left out of the metrics'
    logger.warning(f'{len(bad)} of {len(checked)} {name} files checked before training are unreadable '
                   f'({fate}), e.g. {split.path(index)}: {reason} (list them all with --check-data)')


def check_splits_readable(data) -> None:
    """Before the first epoch: the whole val split opened (its headers read) and a sample of it and of the
    train split decoded, so a split of unreadable files is one clear error in seconds, not a traceback or an
    empty evaluation after a training epoch. Data that is not image folders is not checked."""
    for loader, name, all_headers in ((data.train_loader, 'train', False), (data.val_loader, 'val', True)):
        split = getattr(loader, 'dataset', None) if loader is not None else None
        split = getattr(split, 'dataset', split)  # EpochSeededDataset wraps the train split
        if isinstance(split, ImageFolderSplit):
            check_split_readable(split, name, all_headers)


def check_file(path: str, decoder: str, decode: bool = True) -> Optional[str]:
    """None if ``path`` decodes to an RGB image with the training decoder (``decode=False``: if it opens as an
    image: file read, format identified, size under the pixel limit), else the reason."""
    try:
        (load_rgb_array if decode else read_image_file)(path, decoder)
    except UnreadableImageError as e:
        return str(e)
    return None


def _check_chunk(paths: List[str], decoder: str) -> List[Tuple[str, str]]:
    return [(p, reason) for p in paths for reason in [check_file(p, decoder)] if reason is not None]


def ignored_files(split_dir: str) -> int:
    """Hidden files and files without an image extension inside the class folders (never loaded)."""
    count = 0
    for folder, dirs, files in os.walk(split_dir):
        if folder != split_dir:
            count += sum(1 for f in files if is_hidden(f) or not is_image_file(f))
        dirs[:] = [d for d in dirs if not is_hidden(d)]
    return count


def list_splits(root: str) -> Tuple[Dict[str, List[str]], List[Tuple[str, str]]]:
    """({split: absolute image paths}, [(split, empty class folder)]); raises DataLayoutError on a bad layout."""
    class_to_idx = class_index(os.path.join(root, 'train'))
    files, empty_folders = {}, []
    for split in ('train', 'val'):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise DataLayoutError(f'no folder at {split_dir} (expected layout: {EXPECTED_LAYOUT})')
        check_split_classes(split_dir, class_to_idx)
        paths, _, empty = scan_split(split_dir, class_to_idx)
        files[split] = [os.path.join(split_dir, p) for p in paths]
        empty_folders.extend((split, folder) for folder in empty)
    if not files['train']:
        raise DataLayoutError(f"{os.path.join(root, 'train')} has no image files in its class folders")
    return files, empty_folders


def check_data_folders(data_cfg) -> int:
    """Print every unreadable image of ``data.root`` and every empty class folder; 1 if any, 0 if none. A wrong
    folder layout (``DataLayoutError``) or ``data.decoder`` (``SettingError``) is raised for the command line."""
    if data_cfg['type'] != 'image_folder':
        print(f"--check-data reads image folders; data.type '{data_cfg['type']}' has none to check")
        return 0
    start = time.time()
    root = data_cfg['root']
    decoder = resolve_decoder(data_cfg.get('decoder', 'auto'))
    files, empty_folders = list_splits(root)
    everything = files['train'] + files['val']
    chunks = [everything[i:i + FILES_PER_TASK] for i in range(0, len(everything), FILES_PER_TASK)]
    workers = num_workers(data_cfg)
    if workers == 0:  # data.num_workers=0: everything in this process, as the loaders would do
        bad = [item for chunk in chunks for item in _check_chunk(chunk, decoder)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            bad = [item for found in pool.map(_check_chunk, chunks, [decoder] * len(chunks)) for item in found]
    for path, reason in bad:
        print(f'unreadable: {path}: {reason}')
    for split, folder in empty_folders:
        what = 'training images' if split == 'train' else 'validation images: its accuracy is not measured'
        print(f'empty class folder: {folder} (the class gets no {what})')
    ignored = sum(ignored_files(os.path.join(root, split)) for split in ('train', 'val'))
    print(f"checked {len(files['train'])} train + {len(files['val'])} val images with {max(1, workers)} processes in "
          f'{time.time() - start:.1f}s: {len(bad)} unreadable, {len(empty_folders)} empty class folder(s), '
          f'{ignored} hidden or non-image file(s) ignored')
    return 1 if bad or empty_folders else 0
