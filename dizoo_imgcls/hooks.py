"""Console and TensorBoard logging as a DI-engine ``LearnerHook`` (rank 0 only)."""
import logging
import time
from typing import Dict, Optional

from ding.worker.learner.learner_hook import LearnerHook

logger = logging.getLogger('dizoo_imgcls')

# Stable TensorBoard tags: dashboards and tests rely on these names.
TRAIN_TAGS = {'loss': 'train/loss', 'lr': 'train/lr', 'acc1': 'train/acc1', 'img_per_sec': 'train/img_per_sec'}
EVAL_TAGS = {'acc1': 'eval/acc1', 'acc5': 'eval/acc5', 'loss': 'eval/loss'}


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rem = divmod(seconds, 3600)
    return f'{hours}:{rem // 60:02d}:{rem % 60:02d}'


class TrainLoggerHook(LearnerHook):
    """Every ``log_every`` iterations: one console line and the ``train/*`` scalars, averaged over the window.

    Timing: ``step_time`` comes from the policy (forward, backward, update); the rest of the wall time
    between two iterations is spent waiting for data, reported as ``data``.
    """

    def __init__(self, tb_logger, log_every: int, total_iters: int, iters_per_epoch: int, world_size: int = 1,
                 rank: int = 0) -> None:
        super().__init__('dizoo_imgcls_train_logger', priority=15, position='after_iter')
        self._tb = tb_logger
        self._every = max(1, int(log_every))
        self._total = total_iters
        self._per_epoch = iters_per_epoch
        self._world = world_size
        self._rank = rank
        self._last_end: Optional[float] = None
        self._window = self._empty_window()
        self.images_seen = 0
        self.train_seconds = 0.0

    @staticmethod
    def _empty_window() -> Dict[str, float]:
        return dict(iters=0, loss=0.0, acc1=0.0, images=0, wall=0.0, step=0.0)

    def mark_epoch_start(self) -> None:
        """Call before the first batch of an epoch, so eval time is not counted as data time."""
        self._last_end = time.perf_counter()

    def __call__(self, engine) -> None:
        now = time.perf_counter()
        out = engine.log_buffer['scalar']
        wall = now - self._last_end if self._last_end is not None else out['step_time']
        self._last_end = now
        images = out['batch_size'] * self._world
        self.images_seen += images
        self.train_seconds += wall
        w = self._window
        w['iters'] += 1
        w['loss'] += out['loss']
        w['acc1'] += out['acc1']
        w['images'] += images
        w['wall'] += wall
        w['step'] += out['step_time']
        iteration = engine.last_iter.val + 1  # the learner counts this iteration only after its hooks
        if self._rank == 0 and (iteration % self._every == 0 or iteration == self._total):
            self._flush(iteration, out['lr'])
        if iteration % self._every == 0:
            self._window = self._empty_window()

    def _flush(self, iteration: int, lr: float) -> None:
        w = self._window
        n = max(w['iters'], 1)
        loss, acc1 = w['loss'] / n, w['acc1'] / n
        img_per_sec = w['images'] / max(w['wall'], 1e-9)
        data_time = max(w['wall'] - w['step'], 0.0) / n
        eta = (self._total - iteration) * (self.train_seconds / max(iteration, 1))
        epoch = (iteration - 1) // self._per_epoch + 1
        logger.info(
            f'epoch {epoch} iter {iteration}/{self._total} loss {loss:.4f} lr {lr:.4g} acc1 {acc1:.1f} '
            f'data {data_time * 1000:.0f}ms step {w["step"] / n * 1000:.0f}ms {img_per_sec:.1f} img/s '
            f'eta {format_duration(eta)}'
        )
        for key, value in (('loss', loss), ('lr', lr), ('acc1', acc1), ('img_per_sec', img_per_sec)):
            self._tb.add_scalar(TRAIN_TAGS[key], value, iteration)
        self._tb.add_scalar('train/data_time', data_time, iteration)

    def log_eval(self, metrics: Dict[str, float], epoch: int, iteration: int) -> None:
        if self._rank != 0:
            return
        logger.info(
            f'eval epoch {epoch}: acc1 {metrics["acc1"]:.2f} acc5 {metrics["acc5"]:.2f} loss {metrics["loss"]:.4f} '
            f'({metrics["samples"]} images)'
        )
        for key, tag in EVAL_TAGS.items():
            self._tb.add_scalar(tag, metrics[key], iteration)
        self._tb.flush()

    @property
    def img_per_sec(self) -> float:
        return self.images_seen / self.train_seconds if self.train_seconds else 0.0
