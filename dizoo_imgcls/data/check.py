"""``--check-data``: decode every train and val image once, in parallel, and list each file that is no usable
image with the reason, without training."""
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Tuple

from .decode import UnreadableImageError, is_hidden, load_rgb_array, resolve_decoder
from .folder import EXPECTED_LAYOUT, DataLayoutError, check_split_classes, class_index, is_image_file, scan_split
from .loader import num_workers

FILES_PER_TASK = 64


def check_file(path: str, decoder: str) -> Optional[str]:
    """None if ``path`` decodes to an RGB image with the training decoder, else the reason."""
    try:
        load_rgb_array(path, decoder)
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
    """Print every unreadable image of ``data.root`` and every empty class folder; 1 if any, 0 if none, 2 if the
    folder layout itself is wrong."""
    if data_cfg['type'] != 'image_folder':
        print(f"--check-data reads image folders; data.type '{data_cfg['type']}' has none to check")
        return 0
    start = time.time()
    root = data_cfg['root']
    try:
        decoder = resolve_decoder(data_cfg.get('decoder', 'auto'))
        files, empty_folders = list_splits(root)
    except (DataLayoutError, ValueError) as e:  # ValueError: an unknown or missing data.decoder
        print(f'error: {e}', file=sys.stderr)
        return 2
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
