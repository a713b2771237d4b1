"""Likely mislabeled images: out-of-sample predicted probabilities, ranked by cleanlab.

The probabilities come from models that never trained on the image they predict: either K-fold cross-training
(each fold is trained by the normal ``train(cfg)`` on the other folds, seen through a temporary ImageFolder of
symlinks, and then predicts its held-out fold), or a given checkpoint predicting a folder it was not trained on.
cleanlab then scores every image by how much the model believes its given label (``self_confidence``: the
predicted probability of the given class; low means suspicious) and flags the ones it estimates to be wrong.
"""
import copy
import gc
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from easydict import EasyDict

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from .data import DataLayoutError, class_index, find_display_names
from .data.folder import check_split_classes, scan_split
from .errors import SettingError
from .checkpoint import load_model_from_checkpoint
from .inference import InferenceRunner
from .predict import EvalReader, predict_files
from .runtime import setup_logging

logger = logging.getLogger('dizoo_imgcls')


@dataclass
class LabelledFiles:
    """The images of one split folder (``root/<class>/...``) with the labels their folders give them."""
    root: str
    paths: List[str]  # relative to root, '<class folder>/<file>'
    labels: np.ndarray  # int64 class indices
    class_names: List[str]  # class folder names in index order

    def absolute(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])


@dataclass
class LabelIssue:
    """One image of the ranking: its given label, the model's suggestion and cleanlab's label quality score."""
    path: str
    given: str
    suggested: str
    score: float  # predicted probability of the given label; lower is more likely mislabeled
    flagged: bool  # cleanlab estimates the given label to be wrong


def scan_labelled_folder(split_dir: str, class_names: Optional[Sequence[str]] = None) -> LabelledFiles:
    """Files and folder labels of ``split_dir``; the class index is its own sorted class folders, or
    ``class_names`` (then a folder naming no class of it is an error)."""
    if not os.path.isdir(split_dir):
        raise DataLayoutError(f'no folder at {split_dir} (expected class sub-folders of images)')
    names = list(class_names) if class_names is not None else list(class_index(split_dir))
    class_to_idx = {name: i for i, name in enumerate(names)}
    check_split_classes(split_dir, class_to_idx)
    paths, labels, _ = scan_split(split_dir, class_to_idx)
    if not paths:
        raise DataLayoutError(f'{split_dir} holds no image files in its class folders')
    return LabelledFiles(split_dir, paths, np.asarray(labels, dtype=np.int64), names)


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold number (0..folds-1) of every sample: each class is shuffled and dealt out in turn, so every fold
    holds about 1/folds of every class."""
    if folds < 2:
        raise SettingError(f'--folds must be at least 2 (each image needs a model that did not train on it), '
                           f'got {folds}')
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        fold_of[members] = (np.arange(len(members)) + rng.integers(folds)) % folds
    return fold_of


def write_fold_tree(files: LabelledFiles, fold_of: np.ndarray, fold: int, dst: str) -> str:
    """An ImageNet-layout folder of symlinks: ``train/`` holds every fold but ``fold``, ``val/`` holds ``fold``.
    Every class folder exists in ``train/`` (so the class index is the full one), ``val/`` only where it has
    images."""
    for name in files.class_names:
        os.makedirs(os.path.join(dst, 'train', name), exist_ok=True)
    for i, rel in enumerate(files.paths):
        link = os.path.join(dst, 'val' if fold_of[i] == fold else 'train', rel)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.abspath(files.absolute(i)), link)
    return dst


def predict_probabilities(checkpoint: str, paths: Sequence[str],
                          batch_size: int = 64) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """``(probabilities (N, classes), readable (N,) bool, class display names)`` of image files under the
    checkpoint's model, each read as its validation images were; rows of unreadable files are zero."""
    model, config, names = load_model_from_checkpoint(checkpoint)
    probs = np.zeros((len(paths), len(names)), dtype=np.float64)
    readable = np.zeros(len(paths), dtype=bool)
    predictions = predict_files(InferenceRunner(model), EvalReader(config['data']), names, paths,
                                topk=len(names), batch_size=batch_size)
    for i, prediction in enumerate(predictions):
        if prediction.error is None:
            for index, _, probability in prediction.top:
                probs[i, index] = probability
            readable[i] = True
    return probs, readable, names


def fold_config(cfg: EasyDict, data_root: str, fold: int, output_dir: str) -> EasyDict:
    """The run config of one fold: its symlink tree as data, its own experiment, one evaluation at the end."""
    fold_cfg = EasyDict(copy.deepcopy(cfg))
    fold_cfg.data.root = data_root
    fold_cfg.output_dir = output_dir
    fold_cfg.exp_name = f'fold_{fold}'
    fold_cfg.resume = None
    fold_cfg.eval_every = fold_cfg.policy.learn.train_epoch  # the held-out fold is predicted once, at the end
    return fold_cfg


def cross_validated_probabilities(cfg: EasyDict, files: LabelledFiles, folds: int,
                                  out_dir: str) -> Tuple[np.ndarray, np.ndarray]:
    """Out-of-sample probabilities of every file by K-fold cross-training through ``train(cfg)``; the fold
    runs are kept under ``out_dir/folds`` (their data folder, a temporary tree of symlinks, is removed)."""
    from .config import check_run_settings
    from .train import train  # the training stack is only needed here

    check_run_settings(cfg)  # a bad setting fails now, not after the first fold has trained
    classes = len(files.class_names)
    if cfg.policy.model.num_classes not in (None, classes):
        raise SettingError(f'policy.model.num_classes={cfg.policy.model.num_classes}, but label issues need one output '
                           f'per class of the folder ({classes}); leave it unset')
    if folds > len(files.paths):
        raise SettingError(f'--folds {folds} is more than the {len(files.paths)} images of {files.root}: some folds '
                           'would predict nothing')
    fold_of = stratified_folds(files.labels, folds, cfg.seed)
    probs = np.zeros((len(files.paths), len(files.class_names)), dtype=np.float64)
    readable = np.zeros(len(files.paths), dtype=bool)
    with tempfile.TemporaryDirectory(prefix='dizoo_imgcls_folds_') as tmp:
        for fold in range(folds):
            held_out = np.flatnonzero(fold_of == fold)
            if held_out.size == 0:  # tiny classes dealt out from random offsets can leave a fold empty
                logger.info(f'label issues: fold {fold + 1}/{folds} holds no image, nothing to train for it')
                continue
            logger.info(f'label issues: fold {fold + 1}/{folds}: training on {len(files.paths) - len(held_out)} '
                        f'images, predicting {len(held_out)}')
            root = write_fold_tree(files, fold_of, fold, os.path.join(tmp, f'fold_{fold}'))
            summary = train(fold_config(cfg, root, fold, os.path.join(out_dir, 'folds')))
            setup_logging(None)  # the fold's run pointed our log at its train.log: the next lines are not its
            checkpoint = latest_checkpoint(os.path.join(summary['exp_dir'], 'ckpt'))  # the last epoch, not the
            # best: choosing by accuracy on the held-out fold would let its labels leak into the model
            probs[held_out], readable[held_out], _ = predict_probabilities(
                checkpoint, [files.absolute(i) for i in held_out], cfg.policy.eval.batch_size)
            gc.collect()  # the finished run (model, loader workers) sits in reference cycles: free it now
    return probs, readable


def checkpoint_probabilities(checkpoint: str, split_dir: str):
    """``(files, probabilities, readable, class display names)`` of ``split_dir`` under a checkpoint, each file
    labelled by its folder in the checkpoint's class index."""
    state = load_checkpoint(checkpoint)
    if not isinstance(state, dict) or 'class_names' not in state:
        raise CheckpointError(f'{checkpoint} is not a dizoo_imgcls checkpoint (it stores no class names)')
    files = scan_labelled_folder(split_dir, state['class_names'])
    batch_size = state['config']['policy']['eval']['batch_size']
    return (files, *predict_probabilities(checkpoint, [files.absolute(i) for i in range(len(files.paths))],
                                          batch_size))


def rank_label_issues(labels: np.ndarray, probs: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, scores, flagged)``: sample indices most-likely-mislabeled first, cleanlab's label quality score
    of each sample, and whether cleanlab's filter flags it."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    scores = get_label_quality_scores(labels, probs, method='self_confidence')
    flagged = find_label_issues(labels, probs, filter_by='prune_by_noise_rate', n_jobs=1)
    order = np.argsort(scores, kind='stable')
    return order, scores, np.asarray(flagged, dtype=bool)


def label_issues(cfg: EasyDict, out_dir: str, split: str = 'train', folds: int = 5,
                 checkpoint: Optional[str] = None) -> List[LabelIssue]:
    """Every readable image of ``cfg.data.root/split`` as a ``LabelIssue`` (labels by display name where the data
    has them), most likely mislabeled first. K-fold runs (without ``checkpoint``) are kept under ``out_dir/folds``."""
    split_dir = os.path.join(cfg.data.root, split)
    if checkpoint is not None:
        files, probs, readable, names = checkpoint_probabilities(checkpoint, split_dir)
    else:
        files = scan_labelled_folder(split_dir)
        probs, readable = cross_validated_probabilities(cfg, files, folds, out_dir)
        names = find_display_names(cfg.data.root, files.class_names) or files.class_names
    if not readable.all():
        logger.warning(f'{int((~readable).sum())} unreadable image(s) of {split_dir} left out of the ranking')
    kept = np.flatnonzero(readable)
    if kept.size == 0:
        raise DataLayoutError(f'no readable image in {split_dir}: nothing to rank')
    order, scores, flagged = rank_label_issues(files.labels[kept], probs[kept])
    suggested = probs[kept].argmax(axis=1)
    issues = [LabelIssue(files.absolute(kept[i]), names[files.labels[kept[i]]], names[suggested[i]],
                         float(scores[i]), bool(flagged[i])) for i in order]
    logger.info(f'label issues: cleanlab flags {int(flagged.sum())} of {len(kept)} images of {split_dir}')
    return issues
