"""Prepare data folders: sort ImageNet's flat validation folder into class folders, as training expects, or
write a pre-resized copy of a folder for faster repeated runs.

    python -m dizoo_imgcls.prepare imagenet --root DIR [--dry-run] [--move] [--labels FILE] [--devkit DIR]
    python -m dizoo_imgcls.prepare resize --root DIR --out COPY --short-side 256 [--quality 90] [--dry-run]

DIR holds ``train/<synset>/`` and a flat ``val/ILSVRC2012_val_00000001.JPEG ...``. Labels come from Kaggle's
``LOC_val_solution.csv`` or from the devkit's ``ILSVRC2012_validation_ground_truth.txt`` with its
``meta.mat``, looked up near DIR unless given. Each image gets a hard link in ``val/<synset>/`` (a symlink where
hard links fail, a move where both fail, or with --move); running again does nothing new. A label file that
does not match the images is refused before anything changes.

``resize`` writes every train and val image of DIR to COPY with its shorter side at most --short-side px (same
relative paths, classes and labels; see ``dizoo_imgcls/data/resized_copy.py``); train with --data-root COPY.
Running it again updates only what changed.
"""
import argparse
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .data.decode import is_hidden
from .data.folder import entry_kind, is_image_file
from .data.layouts import (DEVKIT_LABELS, DEVKIT_META, KAGGLE_LABELS, SYNSET_WORD_FILES, LabelFileError,
                           find_devkit_data, find_file, read_devkit_labels, read_devkit_synsets, read_kaggle_labels,
                           search_folders)
from .data.loader import default_num_workers
from .data.resized_copy import write_resized_copy
from .errors import report_user_errors

EXAMPLES_SHOWN = 5


@dataclass
class SortPlan:
    val_dir: str
    label_file: str
    to_place: List[Tuple[str, str]] = field(default_factory=list)  # (flat file, its path in the class folder)
    already_sorted: int = 0
    classes: int = 0


def examples(items) -> str:
    items = sorted(items)
    return ', '.join(str(i) for i in items[:EXAMPLES_SHOWN]) + (' ...' if len(items) > EXAMPLES_SHOWN else '')


def load_labels(root: str, labels: Optional[str], devkit: Optional[str]) -> Tuple[Dict[str, str], str, Dict]:
    """(``{image stem: synset}``, the label file, ``{synset: words}`` where the devkit gives them).

    What is named wins over what is found: ``--labels`` over any file near the data, ``--devkit`` over a Kaggle
    CSV near it. A devkit ground-truth file is read with the ``meta.mat`` of ``--devkit``, else with the one
    beside it (the IDs are only meaningful with their own meta.mat), never with one found elsewhere."""
    if labels is None and devkit is None:
        labels = find_file(root, [KAGGLE_LABELS])
    if labels is not None and labels.endswith('.csv'):
        return read_kaggle_labels(labels), labels, {}
    if labels is not None:
        data_dir = devkit if devkit is not None else os.path.dirname(os.path.abspath(labels))
    else:
        data_dir = devkit if devkit is not None else find_devkit_data(root)
        if data_dir is None:
            raise LabelFileError(f'no validation labels found for {root}: expected {KAGGLE_LABELS} (Kaggle) or '
                                 f'ILSVRC2012_devkit_t12/data/{DEVKIT_LABELS} (devkit) in {root} or the '
                                 f'{len(search_folders(root)) - 1} folders above it; pass --labels FILE')
        labels = os.path.join(data_dir, DEVKIT_LABELS)
    meta = os.path.join(data_dir, DEVKIT_META)
    if not os.path.isfile(meta):
        raise LabelFileError(f'{labels} needs the devkit {DEVKIT_META} that gives its IDs their synsets; none at '
                             f'{meta} (pass --devkit DIR, the devkit data folder)')
    words = {wnid: text for wnid, text in read_devkit_synsets(meta).values()}
    return read_devkit_labels(labels, meta), labels, words


def list_val(val_dir: str) -> Tuple[Dict[str, str], Dict[str, List[str]]]:
    """({image stem: flat file name}, {image stem: the class folders it already sits in})."""
    flat, placed = {}, {}
    for entry in os.scandir(val_dir):
        if is_hidden(entry.name):
            continue
        if entry_kind(entry) == 'dir':
            for name in os.listdir(entry.path):
                if not is_hidden(name):
                    placed.setdefault(os.path.splitext(name)[0], []).append(entry.name)
        elif is_image_file(entry.name):
            flat[os.path.splitext(entry.name)[0]] = entry.name
    return flat, {stem: sorted(folders) for stem, folders in placed.items()}


def plan_val_sort(root: str, labels: Dict[str, str], label_file: str) -> SortPlan:
    """What to link where; ``LabelFileError`` naming the mismatch if the labels do not fit the images."""
    val_dir = os.path.join(root, 'val')
    if not os.path.isdir(val_dir):
        raise LabelFileError(f'no validation folder at {val_dir} (expected ROOT/val/ILSVRC2012_val_*.JPEG)')
    flat, placed_stems = list_val(val_dir)
    if not flat and not placed_stems:
        raise LabelFileError(f'{val_dir} holds no images')
    mismatch = f'{label_file} does not match the images in {val_dir}'
    unlabelled = [flat[s] for s in flat if s not in labels]
    if unlabelled:
        raise LabelFileError(f'{mismatch}: {len(unlabelled)} image(s) have no label, e.g. {examples(unlabelled)}; '
                             'expected a label for every image in the folder')
    missing = [s for s in labels if s not in flat and s not in placed_stems]
    if missing:
        raise LabelFileError(f'{mismatch}: it labels {len(missing)} image(s) that are not there, e.g. '
                             f'{examples(missing)}')
    # An image in a wrong class folder, or in several (a stray copy), would be counted under a wrong label.
    moved = [f'{cls}/{s} (label {labels[s]})' for s, folders in placed_stems.items() if s in labels
             for cls in folders if cls != labels[s]]
    if moved:
        raise LabelFileError(f'{mismatch}: {len(moved)} image(s) already sit in another class folder, e.g. '
                             f'{examples(moved)}; was the folder sorted with a different label file?')
    check_known_classes(root, set(labels.values()), label_file)
    plan = SortPlan(val_dir, label_file, classes=len(set(labels.values())))
    for stem, name in sorted(flat.items()):
        if placed_stems.get(stem) == [labels[stem]]:
            plan.already_sorted += 1
        else:
            plan.to_place.append((os.path.join(val_dir, name), os.path.join(val_dir, labels[stem], name)))
    plan.already_sorted += sum(1 for s in placed_stems if s not in flat and s in labels)
    return plan


def check_known_classes(root: str, synsets: set, label_file: str) -> None:
    train_dir = os.path.join(root, 'train')
    if not os.path.isdir(train_dir):
        return
    train_classes = {e.name for e in os.scandir(train_dir) if e.is_dir() and not is_hidden(e.name)}
    unknown = synsets - train_classes
    if unknown:
        raise LabelFileError(f'{label_file} labels images with {len(unknown)} class(es) that {train_dir} does not '
                             f'have, e.g. {examples(unknown)}; expected the label file of this data set')


def place(src: str, dst: str, move: bool) -> str:
    """Hard link, else relative symlink, else move ``src`` to ``dst``; returns what was done."""
    if not move:
        try:
            os.link(src, dst)
            return 'hard link'
        except OSError:
            pass
        try:
            os.symlink(os.path.relpath(src, os.path.dirname(dst)), dst)
            return 'symlink'
        except OSError:
            pass
    shutil.move(src, dst)
    return 'move'


def write_synset_words(root: str, words: Dict[str, str]) -> Optional[str]:
    """Keep the devkit's class words next to the data (``synset_words.txt``) unless a word file exists."""
    if not words or any(os.path.isfile(os.path.join(d, n)) for d in search_folders(root) for n in SYNSET_WORD_FILES):
        return None
    path = os.path.join(root, 'synset_words.txt')
    with open(path, 'w', encoding='utf-8') as f:
        f.writelines(f'{wnid} {text}\n' for wnid, text in sorted(words.items()))
    return path


def prepare_imagenet(root: str, dry_run: bool = False, move: bool = False, labels: Optional[str] = None,
                     devkit: Optional[str] = None) -> SortPlan:
    if not os.path.isdir(root):
        raise LabelFileError(f'no folder at {root} (expected ROOT/train/<synset>/ and ROOT/val/ILSVRC2012_val_*.JPEG)')
    label_map, label_file, words = load_labels(root, labels, devkit)
    plan = plan_val_sort(root, label_map, label_file)
    print(f'{plan.val_dir}: {len(plan.to_place) + plan.already_sorted} labelled images in {plan.classes} classes '
          f'(labels: {label_file}); {plan.already_sorted} already sorted, {len(plan.to_place)} to sort')
    if dry_run:
        for src, dst in plan.to_place[:EXAMPLES_SHOWN]:
            print(f'  would {"move" if move else "link"} {src} -> {dst}')
        print('dry run: nothing changed')
        return plan
    done: Dict[str, int] = {}
    for src, dst in plan.to_place:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        how = place(src, dst, move)
        done[how] = done.get(how, 0) + 1
    if done:
        print('sorted: ' + ', '.join(f'{n} by {how}' for how, n in sorted(done.items())))
    words_file = write_synset_words(root, words)
    if words_file:
        print(f'class names written to {words_file}')
    return plan


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m dizoo_imgcls.prepare', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='dataset', required=True)
    imagenet = sub.add_parser('imagenet', help='sort the flat ILSVRC2012 validation folder into class folders')
    imagenet.add_argument('--root', required=True, help='folder holding train/ and the flat val/')
    imagenet.add_argument('--dry-run', action='store_true', help='say what would be done, change nothing')
    imagenet.add_argument('--move', action='store_true', help='move the files instead of linking them')
    imagenet.add_argument('--labels', default=None, help=f'{KAGGLE_LABELS} or {DEVKIT_LABELS} (default: search)')
    imagenet.add_argument('--devkit', default=None,
                          help=f'devkit data folder with {DEVKIT_META} (default: the folder of --labels, else search)')
    resize = sub.add_parser('resize', help='write a copy with every image at most --short-side px on its shorter side')
    resize.add_argument('--root', required=True, help='folder holding train/<class>/ and val/<class>/')
    resize.add_argument('--out', required=True, help='folder for the copy (new, empty, or an earlier copy to update)')
    resize.add_argument('--short-side', type=int, required=True, help='shorter side in px, e.g. 256 for 128-192 '
                        'px training (crops of the copy must still hold the training size)')
    resize.add_argument('--quality', type=int, default=90, help='JPEG quality of resized images (default 90)')
    resize.add_argument('--workers', type=int, default=None, help='processes (default: one per core)')
    resize.add_argument('--dry-run', action='store_true', help='count what is up to date, write nothing')
    return parser.parse_args(argv)


def resize_folder(args: argparse.Namespace) -> int:
    report = write_resized_copy(args.root, args.out, args.short_side, args.quality,
                                args.workers or default_num_workers(), args.dry_run)
    if args.dry_run:
        print(f'{args.out}: {report.up_to_date} of {report.images} images up to date; dry run: nothing written')
        return 0
    for path, reason in report.unreadable:
        print(f'unreadable, left out: {path}: {reason}')
    print(f'{args.out}: {report.line()}')
    print(f'train on it with --data-root {args.out}')
    return 0


def main(argv=None) -> int:
    return report_user_errors(run, parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The command; a ``UserError`` it raises (label files, the copy's folder, the data layout) is reported by
    ``main`` as one line."""
    try:
        if args.dataset == 'resize':
            return resize_folder(args)
        prepare_imagenet(args.root, args.dry_run, args.move, args.labels, args.devkit)
    except OSError as e:  # a folder that cannot be read or written
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
