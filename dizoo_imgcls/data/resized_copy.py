"""A pre-resized copy of an image folder, written once and reused by every later run.

    python -m dizoo_imgcls.prepare resize --root DIR --out COPY --short-side 256

Every train and val image of ``DIR`` is written to ``COPY`` under the same relative path, with its shorter side
scaled down to at most ``--short-side`` px (JPEG), so training on ``--data-root COPY`` sees the same classes,
files and labels and decodes far fewer pixels: for runs at 128-176 px from ImageNet-sized photos most of the
loader's CPU time goes into decoding pixels that the resize then averages away (docs/BENCHMARKS.md). Images
already small enough are hard-linked (copied where links fail), never re-encoded. The files that cannot be read
are listed and left out. Running again only writes what changed: files are written atomically, each copy carries
its source's modification time and is kept while the two match (a hard link is its source), and the settings
are recorded in ``resized_copy.json`` before the first image is written, so an interrupted build resumes where
it stopped.
"""
import json
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserError
from .check import list_splits
from .decode import UnreadableImageError, is_hidden, read_image_file
from .folder import entry_kind, is_image_file, is_within
from .layouts import SYNSET_WORD_FILES, search_folders
from .transforms import decode_factor

INFO_FILE = 'resized_copy.json'
FILES_PER_TASK = 64
SPLITS = ('train', 'val')


class ResizedCopyError(UserError):
    """The output folder cannot take this copy; the message names the folder and the reason."""


@dataclass
class ResizeReport:
    images: int = 0
    resized: int = 0
    linked: int = 0
    up_to_date: int = 0
    removed: int = 0
    unreadable: List[Tuple[str, str]] = field(default_factory=list)  # (source path, reason)
    seconds: float = 0.0

    def line(self) -> str:
        return (f'{self.images} images: {self.resized} resized, {self.linked} linked (already small enough), '
                f'{self.up_to_date} up to date, {len(self.unreadable)} unreadable (left out), {self.removed} stale '
                f'removed, in {self.seconds:.1f}s')


def target_size(width: int, height: int, short_side: int) -> Tuple[int, int]:
    """(width, height) with the shorter side scaled to ``short_side``, aspect ratio kept (each side >= 1)."""
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def is_up_to_date(src: str, dst: str) -> bool:
    """The copy carries its source's modification time (a hard link is the source itself). Equal, not newer:
    a source replaced by an older file (``tar -x``, ``rsync -a``, ``cp -p`` keep old times) is written again."""
    try:
        return os.stat(dst).st_mtime_ns == os.stat(src).st_mtime_ns
    except OSError:
        return False


def carry_mtime(src: str, path: str) -> None:
    """Give ``path`` (a new file, never a hard link to ``src``) the access and modification time of ``src``."""
    stat = os.stat(src)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def temporary_name(dst: str) -> str:
    """Where ``dst`` is written before its atomic rename (``remove_stale`` clears leftovers of killed builds)."""
    return f'{dst}.tmp{os.getpid()}'


def link_or_copy(src: str, dst: str) -> None:
    tmp = temporary_name(dst)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        carry_mtime(src, tmp)
    os.replace(tmp, dst)


def resize_file(src: str, dst: str, short_side: int, quality: int) -> Tuple[str, Optional[str]]:
    """('up to date' | 'linked' | 'resized' | 'unreadable', reason or None) for one image."""
    if is_up_to_date(src, dst):
        return 'up to date', None
    try:
        image = read_image_file(src)
        height, width = image.size_hw
        if min(height, width) <= short_side:
            image.decode(1)  # a damaged small file must be found here, not in training
            link_or_copy(src, dst)
            return 'linked', None
        size = target_size(width, height, short_side)
        # libjpeg's scaled decode down to the first scale that keeps the target size, then one antialiased resize
        pixels = image.decode(decode_factor(height, width, short_side))
    except UnreadableImageError as e:
        return 'unreadable', str(e)
    tmp = temporary_name(dst)
    # torch's uint8 antialiased bicubic: the same filter as Pillow's BICUBIC, ~5x faster
    resized = F.interpolate(torch.from_numpy(pixels).permute(2, 0, 1)[None], size=size[::-1], mode='bicubic',
                            antialias=True)[0]
    Image.fromarray(resized.permute(1, 2, 0).contiguous().numpy()).save(tmp, 'JPEG', quality=quality)
    carry_mtime(src, tmp)
    os.replace(tmp, dst)  # a killed build leaves a stray .tmp file, never a truncated image under the real name
    return 'resized', None


def _one_thread() -> None:
    torch.set_num_threads(1)  # one process per core already


def _resize_chunk(jobs: List[Tuple[str, str]], short_side: int, quality: int) -> List[Tuple[str, Optional[str]]]:
    return [resize_file(src, dst, short_side, quality) for src, dst in jobs]


def check_output_folder(out: str, info: Dict) -> None:
    """Refuse a folder that holds something else, or a copy made from another source or with other settings."""
    info_path = os.path.join(out, INFO_FILE)
    if os.path.isfile(info_path):
        try:
            with open(info_path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise ResizedCopyError(f'{info_path} cannot be read ({e}): delete it only if {out} is a resized copy '
                                   'made by this command, then run again') from e
        if not isinstance(old, dict):
            raise ResizedCopyError(f'{info_path} is not the settings file of a resized copy')
        changed = [f'{key} {old.get(key)!r} -> {info[key]!r}' for key in ('source', 'short_side', 'quality')
                   if old.get(key) != info[key]]
        if changed:
            raise ResizedCopyError(f'{out} holds a resized copy made with other settings ({", ".join(changed)}); '
                                   'mixing them would train on images of two sizes: choose a new --out folder')
    elif os.path.isdir(out) and [name for name in os.listdir(out) if not is_hidden(name)]:
        raise ResizedCopyError(f'{out} is not empty and holds no {INFO_FILE}: not a resized copy made by this '
                               'command; choose an empty or new --out folder')


def remove_stale(out: str, wanted: set, class_folders: set) -> int:
    """Delete class folders and image files under ``out/<split>/`` whose source is gone (and stray temporary
    files): a class left behind would shift the class index of every run on the copy."""
    removed = 0
    for split in SPLITS:
        if not os.path.isdir(os.path.join(out, split)):
            continue
        for entry in os.scandir(os.path.join(out, split)):
            if entry.is_dir() and not is_hidden(entry.name) and entry.path not in class_folders:
                removed += sum(len(files) for _, _, files in os.walk(entry.path))
                shutil.rmtree(entry.path)
        for folder, dirs, files in os.walk(os.path.join(out, split)):
            for name in files:
                path = os.path.join(folder, name)
                if (is_image_file(name) or '.tmp' in name) and path not in wanted:
                    os.remove(path)
                    removed += 1
    return removed


def copy_class_names(root: str, out: str) -> None:
    """The nearest synset-word file that training on ``root`` would read (in it or up to 3 folders above, e.g.
    Kaggle's layout), into the copy, so runs on the copy show ``tench``, not ``n01440764``."""
    for folder in search_folders(root):
        for name in SYNSET_WORD_FILES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(out, name))
                return


def write_info(out: str, info: Dict) -> None:
    """``resized_copy.json``, written atomically."""
    path = os.path.join(out, INFO_FILE)
    tmp = temporary_name(path)
    with open(tmp, 'w') as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, path)


def write_resized_copy(root: str, out: str, short_side: int, quality: int = 90, workers: int = 1,
                       dry_run: bool = False) -> ResizeReport:
    """Bring ``out`` up to date with ``root`` (layout ``root/{train,val}/<class>/<image>``)."""
    if short_side < 16 or not 1 <= quality <= 100:
        raise ResizedCopyError(f'--short-side must be >= 16 px and --quality in 1..100, got {short_side}, {quality}')
    root, out = os.path.abspath(root), os.path.abspath(out)
    # Resolved through symlinks: a copy written into its source would add a class folder to it (or, under a
    # link, overwrite its images), and a source inside an earlier copy would be deleted as stale.
    if is_within(out, root):
        raise ResizedCopyError(f'--out {out} must lie outside --root {root}: it is that folder or inside it (links '
                               'resolved), so the copy would be written into the images it is made from')
    if is_within(root, out):
        raise ResizedCopyError(f'--out {out} must not hold --root {root}: updating the copy would delete the source '
                               'images as stale; choose a folder outside --root')
    info = {'source': root, 'short_side': short_side, 'quality': quality}
    check_output_folder(out, info)
    files, _ = list_splits(root)  # DataLayoutError on a wrong layout
    jobs = [(src, os.path.join(out, os.path.relpath(src, root))) for split in SPLITS for src in files[split]]
    report = ResizeReport(images=len(jobs))
    if dry_run:
        report.up_to_date = sum(1 for src, dst in jobs if is_up_to_date(src, dst))
        return report
    start = time.time()
    # Every split and class folder, empty ones included, so the copy's class index is the source's.
    folders = {os.path.join(out, split, e.name) for split in SPLITS for e in os.scandir(os.path.join(root, split))
               if entry_kind(e) == 'dir' and not is_hidden(e.name)}
    for folder in folders | {os.path.dirname(dst) for _, dst in jobs} | {os.path.join(out, s) for s in SPLITS}:
        os.makedirs(folder, exist_ok=True)
    # The settings go first: a build killed half-way is then recognised as this command's and resumed.
    write_info(out, dict(info, complete=False))
    chunks = [jobs[i:i + FILES_PER_TASK] for i in range(0, len(jobs), FILES_PER_TASK)]
    with ProcessPoolExecutor(max_workers=max(1, workers), initializer=_one_thread) as pool:
        results = [r for chunk in pool.map(_resize_chunk, chunks, [short_side] * len(chunks),
                                           [quality] * len(chunks)) for r in chunk]
    counts = Counter(action for action, _ in results)
    report.resized, report.linked, report.up_to_date = counts['resized'], counts['linked'], counts['up to date']
    report.unreadable = [(src, reason) for (src, _), (action, reason) in zip(jobs, results) if action == 'unreadable']
    bad = {src for src, _ in report.unreadable}
    report.removed = remove_stale(out, {dst for src, dst in jobs if src not in bad}, folders)
    copy_class_names(root, out)
    report.seconds = time.time() - start
    write_info(out, dict(info, complete=True, images=report.images - len(bad),
                         unreadable=[list(item) for item in report.unreadable],
                         written_at=time.strftime('%Y-%m-%dT%H:%M:%S')))
    return report
