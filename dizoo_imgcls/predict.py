"""Prediction from a checkpoint: the model, its eval transform and its class names, all read from the file.

Each image is read exactly as the validation split was read in training: the same file reader and decoder
(``data.decoder``), the same ``EvalPreset`` (``data.image_size``, ``data.eval_crop_ratio``, reduced JPEG decoding
per ``data.jpeg_draft``), so a prediction here and the val accuracy logged in training describe the same model
on the same pixels.
"""
import csv
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, TextIO, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .data.decode import UnreadableImageError, read_image_file, resolve_decoder
from .data.folder import DataLayoutError, list_image_files
from .data.loader import collate_images
from .data.transforms import EvalPreset, eval_image_size
from .errors import SettingError
from .inference import InferenceRunner


@dataclass
class Prediction:
    """The top classes of one image file, or why the file was skipped."""
    path: str
    top: List[Tuple[int, str, float]]  # (class index, class name, probability), most likely first
    error: Optional[str] = None  # why the file was skipped; ``top`` is empty then


class EvalReader:
    """Image file -> uint8 CHW tensor, read as the checkpoint's validation split was read in training.

    Raises ``ValueError`` at construction when the configured decoder is not installed here, and
    ``UnreadableImageError`` (its message is the reason) for a file that is no usable image."""

    def __init__(self, data_cfg: Dict[str, Any]) -> None:
        self.preset = EvalPreset(eval_image_size(data_cfg), data_cfg['eval_crop_ratio'],
                                 reduced_decode=data_cfg['jpeg_draft'])
        self.decoder = resolve_decoder(data_cfg['decoder'])

    def __call__(self, path: str) -> torch.Tensor:
        return self.preset(read_image_file(path, self.decoder))


def find_images(inputs: Sequence[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Files to predict, and ``(path, reason)`` for inputs that give none.

    A file is taken whatever its name (a bad one is reported when read); a folder gives its image files as
    the training data reader lists them: recursively, sorted, hidden files left out."""
    found, problems = [], []
    for path in inputs:
        if os.path.isfile(path):
            found.append(path)
        elif os.path.isdir(path):
            try:
                in_dir = [os.path.join(path, name) for name in list_image_files(path)]
            except (DataLayoutError, OSError) as e:  # a symlink loop, a folder that cannot be listed
                problems.append((path, str(e)))
                continue
            found.extend(in_dir)
            if not in_dir:
                problems.append((path, 'folder holds no image files (searched recursively)'))
        elif os.path.islink(path) and not os.path.exists(path):
            problems.append((path, f'broken symbolic link (to {os.readlink(path)})'))
        elif os.path.exists(path):  # a device (/dev/urandom), pipe or socket, or a link to one: reading could block
            problems.append((path, 'not a regular file (a device, pipe or socket)'))
        else:
            problems.append((path, 'no such file or folder'))
    return found, problems


# Characters that would break a line of the table or the skipped-file list (newline, carriage return, tab,
# other C0/C1 controls, the Unicode line and paragraph separators).
_LINE_BREAKING = {chr(c) for c in (*range(32), *range(127, 160), 0x2028, 0x2029)}


def printable_path(path: str) -> str:
    """``path`` as is, or ``repr(path)`` (quoted, ``\\n`` escaped) when it holds a line-breaking character, so one
    file is always one line of output."""
    return repr(path) if any(ch in _LINE_BREAKING for ch in path) else path


class _ImageFiles(Dataset):
    """Items are ``(index, image or None, error reason)``, so one bad file never stops a batch."""

    def __init__(self, paths: Sequence[str], reader: EvalReader) -> None:
        self.paths, self.reader = list(paths), reader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.reader(self.paths[index]), ''
        except UnreadableImageError as e:
            return index, None, str(e)


def _collate(items):
    good = [(i, img) for i, img, _ in items if img is not None]
    bad = [(i, reason) for i, img, reason in items if img is None]
    images = collate_images([(img, i) for i, img in good])[0] if good else None  # NHWC memory, as in training
    return [i for i, _ in good], images, bad


NON_FINITE = "the model's outputs are not finite numbers (weights of a diverged run?)"


def predict_files(runner: InferenceRunner, reader: EvalReader, class_names: Sequence[str], paths: Sequence[str],
                  topk: int = 5, batch_size: int = 32, num_workers: int = 0) -> Iterator[Prediction]:
    """One ``Prediction`` per path, in input order (with ``error`` set for a file that cannot be read),
    running ``batch_size`` images at a time through ``runner``, decoded in ``num_workers`` processes (0: this
    one)."""
    loader = DataLoader(_ImageFiles(paths, reader), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate)
    for indices, images, bad in loader:
        results = {i: Prediction(paths[i], [], reason) for i, reason in bad}
        if images is not None:
            probs, classes = runner.top_probabilities(images, topk)
            finite = torch.isfinite(probs).all(dim=1).tolist()
            for row, i in enumerate(indices):
                if not finite[row]:  # NaN weights (a diverged run) would print NaN, which is not JSON
                    results[i] = Prediction(paths[i], [], NON_FINITE)
                    continue
                top = [(c, class_names[c], p) for c, p in zip(classes[row].tolist(), probs[row].tolist())]
                results[i] = Prediction(paths[i], top)
        for i in sorted(results):
            yield results[i]


OUTPUT_FORMATS = ('table', 'json', 'csv')
CSV_HEADER = ('path', 'rank', 'class_index', 'class_name', 'probability')


def _table_lines(prediction: Prediction) -> List[str]:
    width = max(len(name) for _, name, _ in prediction.top)
    return [printable_path(prediction.path)] + [f'  {rank}. {name:<{width}}  {100.0 * prob:6.2f}%'
                                for rank, (_, name, prob) in enumerate(prediction.top, 1)]


def _json_record(prediction: Prediction) -> str:
    top = [{'rank': rank, 'class_index': index, 'class_name': name, 'probability': prob}
           for rank, (index, name, prob) in enumerate(prediction.top, 1)]
    return json.dumps({'path': prediction.path, 'predictions': top}, allow_nan=False)


def write_predictions(predictions: Iterable[Prediction], fmt: str, out: TextIO, err: TextIO) -> Tuple[int, int]:
    """Stream predictions to ``out`` as they come (json: one array, one image per line) and one
    ``skipped PATH: reason`` line per bad file to ``err``; returns ``(predicted, skipped)`` counts."""
    if fmt not in OUTPUT_FORMATS:
        raise SettingError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    writer = csv.writer(out, lineterminator='\n')
    if fmt == 'csv':
        writer.writerow(CSV_HEADER)
    done = skipped = 0
    for prediction in predictions:
        if prediction.error is not None:
            print(f'skipped {printable_path(prediction.path)}: {prediction.error}', file=err)
            skipped += 1
            continue
        if fmt == 'table':
            out.write('\n'.join(_table_lines(prediction)) + '\n')
        elif fmt == 'json':
            out.write(('[\n' if done == 0 else ',\n') + _json_record(prediction))
        else:
            writer.writerows([prediction.path, rank, index, name, prob]
                             for rank, (index, name, prob) in enumerate(prediction.top, 1))
        done += 1
    if fmt == 'json':
        out.write('\n]\n' if done else '[]\n')
    return done, skipped
