"""The ways ImageNet arrives besides class folders: label files for the flat validation folder, and synset
mappings that give the class folders (``n01440764``) their human names (``tench``).

- Kaggle (ImageNet Object Localization Challenge): ``LOC_val_solution.csv`` (``ImageId,PredictionString``;
  the first word of the prediction string is the synset) and ``LOC_synset_mapping.txt``
  (``n01440764 tench, Tinca tinca``, one line per class).
- The ILSVRC2012 devkit: ``data/ILSVRC2012_validation_ground_truth.txt`` holds one ILSVRC2012_ID (1..1000)
  per validation image in file-name order, and ``data/meta.mat`` maps those IDs to synsets. The ID order is
  *not* the sorted synset order, so the ground truth is only ever read together with its own meta.mat.
"""
import csv
import logging
import os
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

from ..errors import UserError

logger = logging.getLogger('dizoo_imgcls')

KAGGLE_LABELS = 'LOC_val_solution.csv'
DEVKIT_LABELS = 'ILSVRC2012_validation_ground_truth.txt'
DEVKIT_META = 'meta.mat'
# Files that map synset ids to words: Kaggle's, the Caffe/devkit-style one prepare writes, ImageNet's words.txt.
SYNSET_WORD_FILES = ('LOC_synset_mapping.txt', 'synset_words.txt', 'words.txt')
# Kaggle keeps its label files three levels above ILSVRC/Data/CLS-LOC, the folder that holds train/ and val/.
SEARCH_LEVELS_UP = 3


class LabelFileError(UserError, ValueError):
    """A label or mapping file is malformed or does not match the images; the message names the file."""


def read_synset_words(path: str) -> Dict[str, str]:
    """``{synset id: words}`` from lines ``<id> <words>`` or ``<id>\\t<words>``."""
    words = {}
    with open(path, encoding='utf-8-sig') as f:  # -sig: a byte-order mark (Windows editors) is not part of the id
        for line in f:
            parts = line.strip().split(None, 1)
            if parts:
                words[parts[0]] = parts[1].strip() if len(parts) > 1 else parts[0]
    return words


def display_names(class_names: List[str], words: Dict[str, str]) -> List[str]:
    """The first synonym of each class (``tench``); names that several classes share (ImageNet has two
    ``crane`` and two ``maillot``) get their folder name appended, so every display name stays unique."""
    first = [words[name].split(',')[0].strip() if name in words else name for name in class_names]
    shared = {n for n in first if first.count(n) > 1}
    return [f'{short} ({name})' if short in shared else short for short, name in zip(first, class_names)]


def search_folders(root: str, levels_up: int = SEARCH_LEVELS_UP) -> List[str]:
    """``root`` and its parents up to ``levels_up`` levels, nearest first."""
    folders = [os.path.abspath(root)]
    for _ in range(levels_up):
        parent = os.path.dirname(folders[-1])
        if parent == folders[-1]:
            break
        folders.append(parent)
    return folders


def find_display_names(root: str, class_names: List[str]) -> Optional[List[str]]:
    """Human class names from the nearest synset-word file that names every class, else ``None``."""
    for folder in search_folders(root):
        for file_name in SYNSET_WORD_FILES:
            path = os.path.join(folder, file_name)
            if not os.path.isfile(path):
                continue
            try:
                words = read_synset_words(path)
            except (OSError, UnicodeDecodeError) as e:
                logger.warning(f'cannot read class names from {path}: {e}')
                continue
            if all(name in words for name in class_names):
                logger.info(f'class display names from {path}')
                return display_names(class_names, words)
    return None


def find_file(root: str, names: List[str]) -> Optional[str]:
    """The first of ``names`` found in ``root``, ``root/val`` or a parent folder (nearest first)."""
    candidates = [os.path.join(root, 'val')] + search_folders(root)
    for folder in candidates:
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def find_devkit_data(root: str) -> Optional[str]:
    """The devkit's ``data`` folder (holding the ground truth and meta.mat) near ``root``."""
    for folder in search_folders(root):
        for sub in ('ILSVRC2012_devkit_t12/data', 'devkit/data', 'data', '.'):
            data_dir = os.path.normpath(os.path.join(folder, sub))
            if os.path.isfile(os.path.join(data_dir, DEVKIT_LABELS)):
                return data_dir
    return None


def read_kaggle_labels(path: str) -> Dict[str, str]:
    """``{image stem: synset}`` from Kaggle's ``LOC_val_solution.csv``."""
    labels = {}
    with open_label_text(path, newline='') as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ['ImageId', 'PredictionString']:
            raise LabelFileError(f'{path}: expected the header "ImageId,PredictionString" of {KAGGLE_LABELS}, '
                                 f'got {header}')
        for line_no, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue  # blank lines (a trailing newline too many)
            if len(row) < 2 or not row[1].split():
                raise LabelFileError(f'{path}:{line_no}: expected "<image id>,<synset> ...", got {row}')
            image_id, synset = row[0].strip(), row[1].split()[0]
            if labels.setdefault(image_id, synset) != synset:
                raise LabelFileError(f'{path}:{line_no}: {image_id} is labelled {synset} here and '
                                     f'{labels[image_id]} on an earlier line')
    return labels


@contextmanager
def open_label_text(path: str, **kwargs):
    """``open(path)`` for a UTF-8 label file, with or without a byte-order mark; a file in another encoding
    (Excel's "Unicode text" is UTF-16) or a binary file raises ``LabelFileError`` naming it."""
    with open(path, encoding='utf-8-sig', **kwargs) as f:
        try:
            yield f
        except UnicodeDecodeError as e:
            raise LabelFileError(f'{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 (or '
                                 'plain ASCII)') from e


def read_devkit_synsets(meta_path: str) -> Dict[int, Tuple[str, str]]:
    """``{ILSVRC2012_ID: (synset, words)}`` of the leaf classes (the 1000 labels) in the devkit's ``meta.mat``."""
    from scipy.io import loadmat  # scipy comes with scikit-learn; only the devkit route needs it

    try:
        synsets = loadmat(meta_path, squeeze_me=True)['synsets']
        return {int(s['ILSVRC2012_ID']): (str(s['WNID']), str(s['words']))
                for s in synsets if int(s['num_children']) == 0}
    except Exception as e:  # scipy's MatReadError, NotImplementedError for v7.3 files, missing fields, ...
        raise LabelFileError(f'{meta_path}: cannot read the devkit synset table, is it the ILSVRC2012 devkit\'s '
                             f'meta.mat? ({type(e).__name__}: {e})') from e


def read_devkit_labels(labels_path: str, meta_path: str) -> Dict[str, str]:
    """``{ILSVRC2012_val_%08d: synset}``: line i of the ground truth is the ID of validation image i."""
    id_to_synset = read_devkit_synsets(meta_path)
    labels = {}
    with open_label_text(labels_path) as f:
        lines = f.read().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # trailing blank lines; one inside would shift every label after it, and is refused below
    for line_no, line in enumerate(lines, start=1):
        text = line.strip()
        if not text.isdigit() or int(text) not in id_to_synset:
            raise LabelFileError(f'{labels_path}:{line_no}: expected an ILSVRC2012_ID that {meta_path} lists '
                                 f'(1..{len(id_to_synset)}), got {text!r}')
        labels[f'ILSVRC2012_val_{line_no:08d}'] = id_to_synset[int(text)][0]
    return labels
