"""The training run: data -> policy -> DI-engine BaseLearner + MetricSerialEvaluator -> experiment folder."""
import json
import logging
import os
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from typing import Dict, Tuple

import torch
import torch.distributed as dist
from ding.config import save_config_py
from ding.utils import set_pkg_seed
from ding.worker import BaseLearner, MetricSerialEvaluator
from easydict import EasyDict
from tensorboardX import SummaryWriter

from .data import EvalEvent, build_loaders
from .hooks import TrainLoggerHook
from .metric import ImageClassificationMetric
from .policy import ImageClassificationPolicy

logger = logging.getLogger('dizoo_imgcls')


class NullWriter:
    """Stands in for the TensorBoard writer on ranks other than 0, so exactly one process writes events."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def init_distributed(use_cuda: bool) -> Tuple[int, int]:
    """Join the process group torchrun describes in the environment; (rank, world_size)."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size > 1 and not dist.is_initialized():
        cuda = use_cuda and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
        dist.init_process_group(backend='nccl' if cuda else 'gloo')
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_logging(exp_dir: str = None, rank: int = 0) -> None:
    log = logging.getLogger('dizoo_imgcls')
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter('[%(asctime)s] %(message)s', datefmt='%m-%d %H:%M:%S')
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in log.handlers):
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(fmt)
        log.addHandler(console)
    if exp_dir is not None and rank == 0:
        file_handler = logging.FileHandler(os.path.join(exp_dir, 'train.log'))
        file_handler.setFormatter(fmt)
        log.addHandler(file_handler)


def make_exp_dir(cfg: EasyDict, rank: int) -> str:
    """``output_dir/exp_name``, or ``..._YYmmdd_HHMMSS`` if that exists; the same path on every rank."""
    path = os.path.abspath(os.path.join(cfg.output_dir, cfg.exp_name))
    if os.path.exists(path) and os.listdir(path):
        path = f"{path}_{datetime.now().strftime('%y%m%d_%H%M%S')}"
    if dist.is_initialized():
        holder = [path]
        dist.broadcast_object_list(holder, src=0)
        path = holder[0]
    if rank == 0:
        os.makedirs(path, exist_ok=True)
    return path


def write_json(path: str, payload: Dict) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def log_skipped_files(dataset, tb, epoch: int) -> None:
    """Datasets that replace unreadable files expose ``skipped_files()`` (a count over all workers)."""
    if hasattr(dataset, 'skipped_files'):
        skipped = dataset.skipped_files()
        tb.add_scalar('data/skipped', skipped, epoch)
        if skipped:
            logger.warning(f'epoch {epoch}: {skipped} unreadable training file(s) skipped so far (see train.log)')


def train(cfg: EasyDict) -> Dict:
    """Train and evaluate as ``cfg`` says; returns the summary that is also written to summary.json."""
    start = time.time()
    rank, world_size = init_distributed(cfg.policy.cuda)
    cfg.policy.learn.multi_gpu = world_size > 1
    set_pkg_seed(cfg.seed + rank, use_cuda=cfg.policy.cuda and torch.cuda.is_available())
    data = build_loaders(cfg.data, cfg.policy.learn.batch_size, cfg.policy.eval.batch_size, rank, world_size,
                         cfg.seed)
    if cfg.policy.model.num_classes is None:
        cfg.policy.model.num_classes = data.num_classes
    elif cfg.policy.model.num_classes < data.num_classes:
        raise ValueError(f'policy.model.num_classes={cfg.policy.model.num_classes} but the training folder '
                         f'has {data.num_classes} classes')
    cfg.policy.learn.iters_per_epoch = len(data.train_loader)
    metric = ImageClassificationMetric(cfg.policy.eval.metric_key)
    if cfg.policy.eval.evaluator.stop_value is None:
        cfg.policy.eval.evaluator.stop_value = float('-inf') if metric.lower_is_better else float('inf')

    exp_dir = make_exp_dir(cfg, rank)
    setup_logging(exp_dir, rank)
    if rank == 0:
        save_config_py(cfg, os.path.join(exp_dir, 'total_config.py'))
        write_json(os.path.join(exp_dir, 'classes.json'), data.class_names)
    exp_name = os.path.relpath(exp_dir)  # DI-engine writes under './{exp_name}/...'
    tb = SummaryWriter(os.path.join(exp_dir, 'tb')) if rank == 0 else NullWriter()

    policy = ImageClassificationPolicy(cfg.policy, enable_field=['learn', 'eval'])
    learner = BaseLearner(cfg.policy.learn.learner, policy.learn_mode, tb, exp_name=exp_name)
    epochs = cfg.policy.learn.train_epoch
    log_hook = TrainLoggerHook(tb, cfg.log_every, epochs * cfg.policy.learn.iters_per_epoch,
                               cfg.policy.learn.iters_per_epoch, world_size, rank)
    learner.register_hook(log_hook)
    evaluator = MetricSerialEvaluator(cfg.policy.eval.evaluator, [data.val_loader, metric], policy.eval_mode, tb,
                                      exp_name=exp_name)
    for ding_logger in ('learner_logger', 'evaluator_logger'):
        # DI-engine's tables stay in exp_dir/log/*; the console gets our one-line summaries instead.
        logging.getLogger(ding_logger).propagate = False
    logger.info(f'experiment: {exp_dir}')
    logger.info(f'{len(data.train_loader.dataset)} train / {len(data.val_loader.dataset)} val images, '
                f'{data.num_classes} classes, {cfg.policy.learn.iters_per_epoch} iterations per epoch, '
                f'world size {world_size}')

    metrics, best, best_epoch, epoch = {}, None, 0, 0
    learner.call_hook('before_run')
    learn_model = policy.learn_mode.get_attribute('learn_model')
    for epoch in range(1, epochs + 1):
        data.train_sampler.set_epoch(epoch)
        log_hook.mark_epoch_start()
        # DDP's join lets ranks whose shard ends one batch earlier wait without deadlocking the others.
        with learn_model.join() if hasattr(learn_model, 'join') else nullcontext():
            for batch in data.train_loader:
                learner.train(batch)
        policy.learn_mode.set_attribute('epoch', epoch)
        log_skipped_files(data.train_loader.dataset, tb, epoch)
        if epoch % cfg.eval_every and epoch != epochs:
            continue
        stop, metrics = evaluator.eval(learner.save_checkpoint, learner.train_iter)
        log_hook.log_eval(metrics, epoch, learner.train_iter)
        if rank == 0:
            event = EvalEvent(policy.eval_mode, tb, epoch, learner.train_iter, exp_dir, epoch == epochs or stop, metrics)
            for callback in data.eval_callbacks:
                callback(event)
        if metric.gt(metrics, best):
            best, best_epoch = metrics, epoch
        if stop:
            logger.info(f'stop_value {cfg.policy.eval.evaluator.stop_value} reached after epoch {epoch}')
            break
    learner.call_hook('after_run')

    summary = {
        'acc1': metrics.get('acc1'),
        'acc5': metrics.get('acc5'),
        'loss': metrics.get('loss'),
        'best_acc1': best['acc1'] if best else None,
        'best_epoch': best_epoch,
        'eval_samples': metrics.get('samples'),
        'epochs': epoch,
        'wall_seconds': round(time.time() - start, 2),
        'train_img_per_sec': round(log_hook.img_per_sec, 2),
        'world_size': world_size,
        'num_classes': data.num_classes,
        'model': cfg.policy.model.name,
        'exp_dir': exp_dir,
    }
    if rank == 0:
        write_json(os.path.join(exp_dir, 'summary.json'), summary)
        logger.info(f"done in {summary['wall_seconds']:.0f}s: acc1 {summary['acc1']:.2f} "
                    f"(best {summary['best_acc1']:.2f} at epoch {best_epoch}), {summary['train_img_per_sec']:.1f} "
                    f'train img/s')
        logger.info(f'experiment folder: {exp_dir}')
        logger.info(f'TensorBoard: tensorboard --logdir {os.path.join(exp_dir, "tb")}')
    learner.close()
    evaluator.close()
    return summary
