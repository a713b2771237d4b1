"""Learning-rate finder (Smith 2015, as in fastai's ``lr_find``): one training step per LR on an exponential
sweep, the loss smoothed, the LR where it falls fastest suggested.

It drives the real training step (``ImageClassificationPolicy`` learn mode, built as ``train`` builds it) on a
fresh model, in its own experiment folder ``output_dir/<exp_name>_lr_find``; no checkpoint is written and no
run is trained afterwards. Single process only.
"""
import copy
import csv
import logging
import math
import os
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from ding.utils import set_pkg_seed
from easydict import EasyDict
from tensorboardX import SummaryWriter

from .config import save_config_file
from .data import build_loaders
from .errors import SettingError
from .policy import ImageClassificationPolicy
from .runtime import experiment_dir, set_deterministic, setup_logging, write_json
from .config import prepare_config

logger = logging.getLogger('dizoo_imgcls')

DEFAULT_START_LR = 1e-7  # (float) First LR of the sweep (the largest param group's LR, not per 256 images).
DEFAULT_END_LR = 10.0  # (float) Last LR of the sweep, reached unless the loss diverges first.
DEFAULT_STEPS = 100  # (int) Training steps in the sweep, one LR each, spaced geometrically.
SMOOTH_BETA = 0.98  # Exponential moving average of the loss, bias-corrected (fastai's Recorder).
DIVERGE_FACTOR = 4.0  # Stop once the smoothed loss exceeds this multiple of its minimum so far.
SKIP_END = 5  # Points dropped from the end before suggesting (fastai drops steps//10 at the start, 5 at the end).


class Point(NamedTuple):
    step: int
    lr: float
    loss: float
    smoothed: float


class Suggestion(NamedTuple):
    steep_step: int  # index of the point where the smoothed loss falls fastest per log-LR
    steep_lr: float  # the suggested LR
    min_step: int  # index of the smallest smoothed loss
    min_lr_div10: float  # LR at the minimum / 10, fastai's other rule of thumb


def check_sweep(start: float, end: float, steps: int) -> None:
    if not (math.isfinite(start) and start > 0):
        raise SettingError(f'--lr-find-start must be a positive number, got {start}')
    if not (math.isfinite(end) and end > start):
        raise SettingError(f'--lr-find-end must be a finite number above --lr-find-start ({start}), got {end}')
    if steps < 2:
        raise SettingError(f'--lr-find-steps must be at least 2, got {steps}')


def exp_lrs(start: float, end: float, steps: int) -> List[float]:
    """``steps`` LRs from ``start`` to ``end`` (both included), each ``(end/start)**(1/(steps-1))`` times the last."""
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


def sweep(lrs: Sequence[float], train_step: Callable[[float], float], beta: float = SMOOTH_BETA,
          diverge_factor: float = DIVERGE_FACTOR) -> List[Point]:
    """Call ``train_step(lr) -> loss`` for each LR until the smoothed loss is NaN or exceeds ``diverge_factor``
    times its minimum; the diverged point is kept (it shows on the plot) and is the last one."""
    points, average, best = [], 0.0, math.inf
    for step, lr in enumerate(lrs):
        loss = float(train_step(lr))
        average = beta * average + (1 - beta) * loss
        smoothed = average / (1 - beta ** (step + 1))  # bias correction: the average starts at 0, not at loss
        points.append(Point(step, lr, loss, smoothed))
        best = min(best, smoothed)
        if math.isnan(smoothed) or smoothed > diverge_factor * best:
            break
    return points


def diverged_at(points: Sequence[Point], diverge_factor: float = DIVERGE_FACTOR) -> Optional[int]:
    """The step at which ``sweep`` stopped for divergence, or None if it ran to the end of the sweep."""
    last, best = points[-1], min((p.smoothed for p in points if not math.isnan(p.smoothed)), default=math.inf)
    return last.step if math.isnan(last.smoothed) or last.smoothed > diverge_factor * best else None


def suggest(points: Sequence[Point], skip_start: int, skip_end: int = SKIP_END) -> Optional[Suggestion]:
    """Steepest descent and min/10 of the smoothed loss, on the points without the first ``skip_start``
    (too little signal) and the last ``skip_end`` (the blow-up); on all finite points if that leaves < 2."""
    finite = [p for p in points if math.isfinite(p.smoothed)]
    window = finite[skip_start:len(finite) - skip_end]
    if len(window) < 2:
        window = finite
    if len(window) < 2:
        return None
    lrs = np.log([p.lr for p in window])
    smoothed = np.array([p.smoothed for p in window])
    steep = int(np.argmin(np.diff(smoothed) / np.diff(lrs)))  # left point of the steepest segment, as fastai
    lowest = int(np.argmin(smoothed))
    return Suggestion(window[steep].step, window[steep].lr, window[lowest].step, window[lowest].lr / 10)


def group_lr_factors(optimizer) -> List[float]:
    """Each param group's LR relative to the largest (the head vs. backbone factor), read when the policy is new:
    then every LR schedule here has scaled all groups by the same factor, so these are the peak LRs' ratios."""
    lrs = [group['lr'] for group in optimizer.param_groups]
    return [lr / max(lrs) for lr in lrs]


def set_lr(optimizer, factors: Sequence[float], lr: float) -> None:
    for group, factor in zip(optimizer.param_groups, factors):
        group['lr'] = lr * factor


def cycle_batches(data) -> Iterator:
    """Training batches in the order training sees them, epoch after epoch, for as long as asked."""
    epoch = 1
    while True:
        data.train_sampler.set_epoch(epoch)
        yield from data.train_loader
        epoch += 1


class PolicyStep:
    """``sweep``'s training step: the policy's real learn-mode forward on the next batch, at the given LR."""

    def __init__(self, policy, data, tb, log_every: int) -> None:
        self.learn = policy.learn_mode
        self.optimizer = self.learn.get_attribute('optimizer')
        self.factors = group_lr_factors(self.optimizer)
        self.batches = cycle_batches(data)
        self.tb, self.log_every, self.step = tb, log_every, 0

    def __call__(self, lr: float) -> float:
        set_lr(self.optimizer, self.factors, lr)  # every step: the policy's LR scheduler steps after each forward
        out = self.learn.forward(next(self.batches))
        if not math.isclose(out['lr'], lr, rel_tol=1e-9):  # the policy reports the largest group's LR of the step
            raise RuntimeError(f'lr_find: the policy trained at lr {out["lr"]}, not at the swept {lr}')
        self.tb.add_scalar('lr_find/loss', out['loss'], self.step)
        self.tb.add_scalar('lr_find/lr', lr, self.step)
        if self.step % self.log_every == 0:
            logger.info(f'lr_find step {self.step}: lr {lr:.3g}, loss {out["loss"]:.4f}')
        self.step += 1
        return out['loss']


def find_lr(cfg: EasyDict, start: float = DEFAULT_START_LR, end: float = DEFAULT_END_LR,
            steps: int = DEFAULT_STEPS) -> dict:
    """Run the sweep for ``cfg``; writes lr_find.csv, lr_find.png, lr_find.json and tb/ to its own folder."""
    check_sweep(start, end, steps)
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size > 1:
        raise SettingError(f'--lr-find runs in one process: start it with python, not torchrun '
                           f'(WORLD_SIZE={world_size})')
    if cfg.resume:
        raise SettingError(f'--lr-find starts from a fresh model and cannot resume ({cfg.resume}); to sweep from '
                           f'trained weights set policy.model.pretrained=CHECKPOINT')
    cfg = copy.deepcopy(cfg)
    set_deterministic(cfg.deterministic, cfg.policy.learn.cudnn_benchmark)
    set_pkg_seed(cfg.seed, use_cuda=cfg.policy.cuda and torch.cuda.is_available())
    data = build_loaders(cfg.data, cfg.policy.learn.batch_size, cfg.policy.eval.batch_size, 0, 1, cfg.seed)
    prepare_config(cfg, data)
    cfg.exp_name = f'{cfg.exp_name}_lr_find'
    exp_dir = experiment_dir(cfg)
    setup_logging(exp_dir)
    save_config_file(cfg, os.path.join(exp_dir, 'total_config.py'))
    policy_cfg = copy.deepcopy(cfg.policy)
    # The finder sets the LR itself; a schedule that ends (one-cycle) must only not be stepped past its end.
    policy_cfg.learn.train_epoch = max(policy_cfg.learn.train_epoch, steps // policy_cfg.learn.iters_per_epoch + 2)
    if policy_cfg.learn.freeze_backbone_epochs:
        # The sweep never leaves the policy's first epoch: with the backbone frozen it would measure the head
        # alone, and the suggestion is for training the whole network.
        logger.info(f'lr_find: sweeping with the whole network trained (policy.learn.freeze_backbone_epochs='
                    f'{policy_cfg.learn.freeze_backbone_epochs} applies to training only)')
        policy_cfg.learn.freeze_backbone_epochs = 0
    policy = ImageClassificationPolicy(policy_cfg, enable_field=['learn', 'eval'])
    batch_size = cfg.policy.learn.batch_size  # the global batch: one process
    logger.info(f'lr_find: {steps} steps from lr {start:.3g} to {end:.3g} at batch {batch_size} on '
                f'{len(data.train_loader.dataset)} train images; writing {exp_dir}')
    tb = SummaryWriter(os.path.join(exp_dir, 'tb'))
    points = sweep(exp_lrs(start, end, steps), PolicyStep(policy, data, tb, log_every=max(1, steps // 10)))
    suggestion = suggest(points, skip_start=steps // 10)
    summary = result_summary(points, suggestion, steps, batch_size, exp_dir)
    write_outputs(exp_dir, points, suggestion, batch_size, tb, summary)
    log_result(summary)
    return summary


def write_outputs(exp_dir: str, points: Sequence[Point], suggestion: Optional[Suggestion], batch_size: int, tb,
                  summary: dict) -> None:
    for p in points:
        tb.add_scalar('lr_find/smoothed_loss', p.smoothed, p.step)
    plot = save_plot(os.path.join(exp_dir, 'lr_find.png'), points, suggestion, batch_size)
    tb.add_image('lr_find/plot', plot, points[-1].step, dataformats='HWC')
    tb.close()
    rows = [[p.step, p.lr, per_256(p.lr, batch_size), p.loss, p.smoothed] for p in points]  # floats in full
    with open(os.path.join(exp_dir, 'lr_find.csv'), 'w', newline='') as f:
        csv.writer(f).writerows([['step', 'lr', 'lr_per_256', 'loss', 'smoothed_loss'], *rows])
    write_json(os.path.join(exp_dir, 'lr_find.json'), summary)


def per_256(lr: float, batch_size: int) -> float:
    return lr * 256 / batch_size


def save_plot(path: str, points: Sequence[Point], suggestion: Optional[Suggestion], batch_size: int) -> np.ndarray:
    """Loss against LR (log scale; lr_per_256 on the top axis) with the suggestions marked; the PNG's pixels."""
    import matplotlib
    matplotlib.use('Agg')  # files only, no display
    import matplotlib.pyplot as plt

    lrs = [p.lr for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.plot(lrs, [p.loss for p in points], color='0.75', linewidth=1, label='loss')
    ax.plot(lrs, [p.smoothed for p in points], color='C0', linewidth=2, label='smoothed loss')
    if suggestion is not None:
        ax.axvline(suggestion.steep_lr, color='C3', linestyle='--',
                   label=f'suggested (steepest descent) {suggestion.steep_lr:.3g}')
        ax.axvline(suggestion.min_lr_div10, color='C2', linestyle=':', label=f'min / 10: {suggestion.min_lr_div10:.3g}')
    # Frame the curve before the blow-up; the diverged last step leaves through the top edge.
    body = [p for p in (points[:-1] or points) if math.isfinite(p.smoothed)]
    if body:
        low = min(min(p.smoothed, p.loss) for p in body)
        high = max(p.smoothed for p in body)
        margin = 0.1 * (high - low) + 1e-3
        ax.set_ylim(low - margin, high + 2 * margin)
    ax.set_xscale('log')
    ax.set_xlabel('learning rate (largest param group)')
    ax.set_ylabel('training loss')
    top = ax.secondary_xaxis('top', functions=(lambda x: per_256(x, batch_size), lambda x: x * batch_size / 256))
    top.set_xlabel(f'policy.learn.lr_per_256 (batch {batch_size})')
    ax.legend(loc='best')
    ax.grid(True, which='both', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return pixels


def result_summary(points: Sequence[Point], suggestion: Optional[Suggestion], steps: int, batch_size: int,
                   exp_dir: str) -> dict:
    summary = dict(steps=steps, steps_run=len(points), diverged_at_step=diverged_at(points), batch_size=batch_size,
                   exp_dir=exp_dir)
    if suggestion is not None:
        summary.update(suggestion._asdict(), steep_lr_per_256=per_256(suggestion.steep_lr, batch_size),
                       min_lr_div10_per_256=per_256(suggestion.min_lr_div10, batch_size))
    return summary


def log_result(s: dict) -> None:
    if s['diverged_at_step'] is not None:
        logger.info(f"lr_find: loss diverged at step {s['diverged_at_step']} ({s['steps_run']} of {s['steps']} steps)")
    if 'steep_lr' not in s:
        logger.info('lr_find: too few points for a suggestion; lower --lr-find-start or raise --lr-find-steps')
    else:
        logger.info(f"lr_find: steepest descent (suggested): lr {s['steep_lr']:.3g} = lr_per_256 "
                    f"{s['steep_lr_per_256']:.3g} (step {s['steep_step']})")
        logger.info(f"lr_find: min loss / 10:                lr {s['min_lr_div10']:.3g} = lr_per_256 "
                    f"{s['min_lr_div10_per_256']:.3g} (minimum at step {s['min_step']})")
        logger.info(f"lr_find: train with --set policy.learn.lr_per_256={s['steep_lr_per_256']:.3g}")
    logger.info(f"lr_find: plot {os.path.join(s['exp_dir'], 'lr_find.png')}, TensorBoard: tensorboard --logdir "
                f"{os.path.join(s['exp_dir'], 'tb')}")
