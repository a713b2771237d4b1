"""Evaluate a checkpoint on a data folder: top-1/top-5/loss, per-class accuracy and a confusion matrix."""
import csv
import logging
import math
import os
import shutil
import tempfile
from typing import Dict, Iterable, List

import torch
from easydict import EasyDict

from .checkpoint import CheckpointError, load_checkpoint, rebuild_checkpoint_model, require_key
from .config import ConfigError, apply_override, build_config, check_image_sizes
from .data import build_eval_data, shutdown_workers
from .errors import SettingError
from .ding_adapter import evaluator_config, make_evaluator, make_policy
from .metric import DiagnosticMetric
from .runtime import init_distributed, setup_logging

logger = logging.getLogger('dizoo_imgcls')


# What an evaluation may change with --set; the model and its training settings come from the checkpoint.
EVAL_OVERRIDABLE = ('data.', 'policy.eval.', 'policy.cuda=')


def config_from_checkpoint(state: Dict, path: str, data_root: str, overrides: Iterable[str] = ()) -> EasyDict:
    """The checkpoint's data and eval settings on ``data_root``, then the ``--set`` overrides of ``data.*`` and
    ``policy.eval.*`` (e.g. a test resolution above the training one: ``data.eval_image_size=160``)."""
    stored = state['config']
    # The weights come from the checkpoint: the file a fine-tuned run started from is not needed (nor read).
    model = dict(stored['policy']['model'], pretrained=None)
    cfg = build_config({'data': stored['data'], 'policy': {'model': model}})
    cfg.data.root = data_root
    cfg.policy.eval.batch_size = stored['policy']['eval']['batch_size']
    # A run trained in fp16 on a GPU is evaluated in the best precision this machine has.
    amp = stored['policy']['learn']['amp']
    cfg.policy.learn.amp = 'auto' if amp == 'fp16' and not torch.cuda.is_available() else amp
    cfg.policy.learn.channels_last = stored['policy']['learn']['channels_last']
    if 'tta' in stored['policy']['eval']:  # the run's test-time augmentation: reported as acc1_tta again
        cfg.policy.eval.tta.update(stored['policy']['eval']['tta'])
    for assignment in overrides:
        if not assignment.strip().startswith(EVAL_OVERRIDABLE):
            raise ConfigError(f"--eval-only --set {assignment}: only data.* and policy.eval.* keys apply to an "
                              f"evaluation; the model and its training settings come from {path}")
        apply_override(cfg, assignment)
    if cfg.data.root != data_root:
        raise ConfigError('--eval-only: give the data folder as --data-root, not as --set data.root')
    check_image_sizes(cfg)  # the overrides too: eval_image_size=0 or 100000 is one line, not a traceback
    return cfg


def evaluate_pass(eval_mode, loader, metric: DiagnosticMetric, log_dir: str):
    """One pass over ``loader`` by DI-engine's evaluator, as in training: (metrics, confusion[true, predicted])
    summed over all ranks. DI-engine writes its text log under ``log_dir/log``."""
    evaluator = make_evaluator(evaluator_config({'multi_gpu': False, 'stop_value': None}), loader, metric, eval_mode,
                               os.path.relpath(log_dir))
    try:
        _, metrics = evaluator.eval(None, train_iter=0)
    finally:
        evaluator.close()
    return metrics, metric.last_diagnostics.confusion


def write_reports(out_dir: str, names: List[str], confusion: torch.Tensor) -> None:
    os.makedirs(out_dir, exist_ok=True)
    totals = confusion.sum(dim=1)
    with open(os.path.join(out_dir, 'per_class_accuracy.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['class_index', 'class', 'samples', 'correct', 'acc1'])
        for i, name in enumerate(names):
            n, right = int(totals[i]), int(confusion[i, i])
            writer.writerow([i, name, n, right, f'{100.0 * right / n:.4f}' if n else ''])
    with open(os.path.join(out_dir, 'confusion_matrix.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['true \\ predicted'] + names)
        for i, name in enumerate(names):
            writer.writerow([name] + [int(v) for v in confusion[i]])


def report_dir(checkpoint: str) -> str:
    """``EXP/eval`` for a checkpoint in an experiment's ``EXP/ckpt/``, else an ``eval`` folder beside the file."""
    folder = os.path.dirname(os.path.abspath(checkpoint))
    if os.path.basename(folder) == 'ckpt':
        folder = os.path.dirname(folder)
    return os.path.join(folder, 'eval')


def evaluate_checkpoint(path: str, data_root: str, overrides: Iterable[str] = ()) -> Dict:
    """Evaluate ``path`` on ``data_root/val`` (no ``train/`` needed: the checkpoint holds the class index);
    reports go to ``report_dir(path)``.
    ``overrides`` are ``--set`` assignments of ``data.*`` / ``policy.eval.*`` keys."""
    state = load_checkpoint(path)
    # Every part of the file checked (each problem one clear line), and the model the policy evaluates.
    model, _, names = rebuild_checkpoint_model(path, state=state)  # display names, one per model output
    for key in ('data.type', 'policy.eval.batch_size', 'policy.learn.amp', 'policy.learn.channels_last'):
        require_key(state['config'], key, path)
    cfg = config_from_checkpoint(state, path, data_root, overrides)
    rank, world_size = init_distributed(cfg.policy.cuda)
    try:
        data = build_eval_data(cfg.data, require_key(state, 'class_names', path), cfg.policy.eval.batch_size, rank,
                               world_size)
    except SettingError as e:  # the classes differ
        raise CheckpointError(f'{path}: {e}') from None
    cfg.policy.learn.iters_per_epoch = 1
    policy = make_policy(cfg.policy, model=model, enable_field=['eval'])
    metric = DiagnosticMetric('acc1', len(names), data.val_sampler)  # a head may be larger than the class list
    out_dir = report_dir(path)
    # Only rank 0 writes into the report folder; the other ranks' DI-engine logs go to a folder removed after.
    log_dir = out_dir if rank == 0 else tempfile.mkdtemp(prefix=f'dizoo_imgcls_eval_rank{rank}_')
    try:
        metrics, confusion = evaluate_pass(policy.eval_mode, data.val_loader, metric, log_dir)
    finally:
        shutdown_workers(data.val_loader)
        if rank != 0:
            shutil.rmtree(log_dir, ignore_errors=True)
    if not math.isfinite(metrics['loss']):
        logger.warning(f'{path}: the loss is {metrics["loss"]}: the weights give non-finite outputs (a diverged '
                       'run?), so the accuracies mean little')
    if rank == 0:
        setup_logging(None, rank)
        write_reports(out_dir, names, confusion)
        tta = f' acc1_tta {metrics["acc1_tta"]:.2f}' if 'acc1_tta' in metrics else ''
        size = f'{cfg.data.eval_image_size or cfg.data.image_size} px'
        logger.info(f'{path} on {data_root} at {size}: acc1 {metrics["acc1"]:.2f} acc5 {metrics["acc5"]:.2f} '
                    f'loss {metrics["loss"]:.4f}{tta} ({metrics["samples"]} images)')
        logger.info(f'per-class accuracy and confusion matrix: {out_dir}')
    return dict(metrics, report_dir=out_dir)
