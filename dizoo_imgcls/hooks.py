"""Console and TensorBoard logging as DI-engine ``LearnerHook``s (rank 0 only), and the loss guard.

On an interactive terminal the console shows one progress bar per epoch; anywhere else (CI, pipes, files)
it shows one plain line every ``log_every`` iterations. Both end each epoch with one summary line, and
``train.log`` always gets the plain lines.
"""
import logging
import math
import os
import statistics
import sys
import time
from collections import deque
from contextlib import ExitStack
from typing import Dict, Mapping, Optional, TextIO

from ding.worker.learner.learner_hook import LearnerHook

from .errors import UserError
from .run_state import RunState
from .summary import cuda_max_allocated_mb, peak_rss_mb

logger = logging.getLogger('dizoo_imgcls')

# Stable TensorBoard tags: dashboards and tests rely on these names.
TRAIN_TAGS = {'loss': 'train/loss', 'lr': 'train/lr', 'acc1': 'train/acc1', 'img_per_sec': 'train/img_per_sec',
              'data_time': 'train/data_time', 'data_wait_share': 'train/data_wait_share',
              'peak_rss_mb': 'train/peak_rss_mb', 'cuda_max_allocated_mb': 'train/cuda_max_allocated_mb'}
EVAL_TAGS = {'acc1': 'eval/acc1', 'acc5': 'eval/acc5', 'loss': 'eval/loss'}


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rem = divmod(seconds, 3600)
    return f'{hours}:{rem // 60:02d}:{rem % 60:02d}'


def use_progress_bar(stream: Optional[TextIO] = None, rank: int = 0,
                     environ: Optional[Mapping[str, str]] = None) -> bool:
    """A live bar only for rank 0 writing to an interactive terminal; CI logs, pipes and files get plain lines
    (a bar there is a stream of carriage returns)."""
    stream = sys.stdout if stream is None else stream
    environ = os.environ if environ is None else environ
    if rank != 0 or environ.get('CI', '').lower() in ('1', 'true') or environ.get('TERM') == 'dumb':
        return False
    isatty = getattr(stream, 'isatty', None)
    return bool(isatty is not None and isatty())


def log_to_files_only(message: str) -> None:
    """Write an INFO record to the log files of our logger but not to the console (where the bar is)."""
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class _Stats:
    """Sums over a span of iterations (a logging window or an epoch)."""

    def __init__(self) -> None:
        self.iters, self.loss, self.acc1, self.images, self.wall, self.step = 0, 0.0, 0.0, 0, 0.0, 0.0

    def add(self, out: Dict[str, float], images: int, wall: float) -> None:
        self.iters += 1
        self.loss += out['loss']
        self.acc1 += out['acc1']
        self.images += images
        self.wall += wall
        self.step += out['step_time']

    def mean(self, key: str) -> float:
        return getattr(self, key) / max(self.iters, 1)

    @property
    def img_per_sec(self) -> float:
        return self.images / max(self.wall, 1e-9)

    @property
    def data_wait(self) -> float:
        """Seconds spent waiting for data: the wall time not spent in the policy's step."""
        return max(self.wall - self.step, 0.0)

    @property
    def data_wait_share(self) -> float:
        return self.data_wait / self.wall if self.wall > 0 else 0.0


class TrainLoggerHook(LearnerHook):
    """Every ``log_every`` iterations the ``train/*`` scalars (averaged over the window) and a plain line; a
    progress bar per epoch instead of the console lines when ``progress_bar`` (default: ``use_progress_bar``);
    a summary line at the end of each epoch.

    Timing: ``step_time`` comes from the policy (forward, backward, update); the rest of the wall time
    between two iterations is spent waiting for data, reported as ``data`` and ``train/data_wait_share``.
    ``global_batch_sizes`` (images per step of an epoch over all ranks) makes the image counts exact where the
    ranks' last batches differ; without it a step counts this rank's batch x ``world_size``. Each step's images
    and seconds go to the run's clock, ``state`` (a ``RunState``), which checkpoints carry over a resume.
    """

    def __init__(self, tb_logger, log_every: int, total_iters: int, iters_per_epoch: int, world_size: int = 1,
                 rank: int = 0, progress_bar: Optional[bool] = None, stream: Optional[TextIO] = None,
                 global_batch_sizes: Optional[list] = None, state: Optional[RunState] = None) -> None:
        super().__init__('dizoo_imgcls_train_logger', priority=15, position='after_iter')
        self._tb = tb_logger
        self._every = max(1, int(log_every))
        self._total = total_iters
        self._per_epoch = iters_per_epoch
        self._world = world_size
        self._global_batches = global_batch_sizes if global_batch_sizes and len(global_batch_sizes) == \
            iters_per_epoch else None
        self._rank = rank
        self._stream = stream
        self.progress_bar = use_progress_bar(stream, rank) if progress_bar is None else progress_bar and rank == 0
        self._bar, self._bar_context = None, ExitStack()
        self._last_end: Optional[float] = None
        self._window, self._epoch = _Stats(), _Stats()
        self._iters_done = 0  # in this process: a resumed run's ETA must not count the iterations before it
        self._seconds = 0.0  # of training in this process, for the ETA
        self.state = RunState() if state is None else state  # the run's clock: every step is counted there

    def restart_clock(self) -> None:
        """Call before the first batch of an epoch and after a pause between batches (a checkpoint written), so
        the time of an evaluation or a save is not counted as time spent waiting for data."""
        self._last_end = time.perf_counter()

    def __call__(self, engine) -> None:
        now = time.perf_counter()
        out = engine.log_buffer['scalar']
        wall = now - self._last_end if self._last_end is not None else out['step_time']
        self._last_end = now
        if self._global_batches is not None:
            images = self._global_batches[engine.last_iter.val % self._per_epoch]
        else:
            images = out['batch_size'] * self._world
        self.state.add_training(images, wall, max(wall - out['step_time'], 0.0))
        self._seconds += wall
        self._iters_done += 1
        self._window.add(out, images, wall)
        self._epoch.add(out, images, wall)
        iteration = engine.last_iter.val + 1  # the learner counts this iteration only after its hooks
        if self._rank == 0:
            if self.progress_bar:
                self._advance_bar(iteration)
            if iteration % self._every == 0 or iteration == self._total:
                self._flush(iteration, out['lr'])
            if iteration % self._per_epoch == 0 or iteration == self._total:
                self._end_epoch(iteration)
        if iteration % self._every == 0:
            self._window = _Stats()
        if iteration % self._per_epoch == 0:
            self._epoch = _Stats()

    def _eta(self, iteration: int) -> float:
        return (self._total - iteration) * self._seconds / max(self._iters_done, 1)

    def _epoch_of(self, iteration: int) -> int:
        return (iteration - 1) // self._per_epoch + 1

    def _advance_bar(self, iteration: int) -> None:
        if self._bar is None:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            epochs = -(-self._total // self._per_epoch)
            position = (iteration - 1) % self._per_epoch  # > 0 when resumed mid-epoch
            self._bar = tqdm(total=self._per_epoch, initial=position, unit='it', dynamic_ncols=True,
                             desc=f'epoch {self._epoch_of(iteration)}/{epochs}', file=self._stream or sys.stdout)
            self._bar_context.enter_context(logging_redirect_tqdm([logger]))  # log lines print above the bar
        e = self._epoch
        self._bar.set_postfix_str(f'loss {e.mean("loss"):.4f} {e.img_per_sec:.1f} img/s '
                                  f'eta {format_duration(self._eta(iteration))}', refresh=False)
        self._bar.update(1)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._bar_context.close()

    def _flush(self, iteration: int, lr: float) -> None:
        w = self._window
        line = (f'epoch {self._epoch_of(iteration)} iter {iteration}/{self._total} loss {w.mean("loss"):.4f} '
                f'lr {lr:.4g} acc1 {w.mean("acc1"):.1f} data {w.data_wait / max(w.iters, 1) * 1000:.0f}ms '
                f'step {w.mean("step") * 1000:.0f}ms {w.img_per_sec:.1f} img/s eta '
                f'{format_duration(self._eta(iteration))}')
        if self.progress_bar:
            log_to_files_only(line)
        else:
            logger.info(line)
        scalars = {'loss': w.mean('loss'), 'lr': lr, 'acc1': w.mean('acc1'), 'img_per_sec': w.img_per_sec,
                   'data_time': w.data_wait / max(w.iters, 1), 'data_wait_share': w.data_wait_share,
                   'peak_rss_mb': peak_rss_mb(), 'cuda_max_allocated_mb': cuda_max_allocated_mb()}
        for key, value in scalars.items():
            if value is not None:
                self._tb.add_scalar(TRAIN_TAGS[key], value, iteration)

    def _end_epoch(self, iteration: int) -> None:
        self._close_bar()
        e, rss = self._epoch, peak_rss_mb()
        memory = f', peak memory {rss:.0f} MiB' if rss is not None else ''
        logger.info(f'epoch {self._epoch_of(iteration)} done in {format_duration(e.wall)}: loss {e.mean("loss"):.4f} '
                    f'acc1 {e.mean("acc1"):.1f}, {e.img_per_sec:.1f} img/s, data wait {e.data_wait_share:.0%}'
                    f'{memory}, eta {format_duration(self._eta(iteration))}')

    def log_eval(self, metrics: Dict[str, float], epoch: int, iteration: int) -> None:
        if self._rank != 0:
            return
        variants = ''.join(f' {key} {value:.2f}' for key, value in metrics.items()
                           if key.startswith('acc1_'))  # acc1_tta, acc1_ema, ...: TTA and weight average
        logger.info(
            f'eval epoch {epoch}: acc1 {metrics["acc1"]:.2f} acc5 {metrics["acc5"]:.2f} loss {metrics["loss"]:.4f}'
            f'{variants} ({metrics["samples"]} images)'
        )
        for key, value in metrics.items():
            if key != 'samples':
                self._tb.add_scalar(EVAL_TAGS.get(key, f'eval/{key}'), value, iteration)
        self._tb.flush()

    @property
    def img_per_sec(self) -> float:
        """Training images per second over the whole run (resumed parts included)."""
        return self.state.img_per_sec

    @property
    def data_wait_share(self) -> float:
        """Share of the training wall time spent waiting for data, over the whole run."""
        return self.state.data_wait_share



class TrainingDiverged(UserError):
    """The training loss became non-finite (or spiked): the run stopped before saving anything from that state."""
    exit_code = 3


class LossGuardHook(LearnerHook):
    """Stops the run at the first non-finite training loss, before anything else sees that iteration: the
    logger, and the checkpoints the run writes after it (the weights are already updated by then). With
    ``spike_factor`` > 0 also at a loss above ``spike_factor`` times the median of the last ``window`` losses.

    Only the loss is checked, a Python float the policy already has: no extra GPU sync. With fp16 the
    GradScaler skips the steps whose *gradients* overflowed (its loss is finite, its grad_norm NaN) and lowers
    its scale; those steps are not errors."""

    def __init__(self, spike_factor: float = 0.0, window: int = 100, iters_per_epoch: int = 0) -> None:
        super().__init__('dizoo_imgcls_loss_guard', priority=5, position='after_iter')  # before the logger's 15
        self._factor = float(spike_factor or 0.0)
        self._recent = deque(maxlen=window)
        self._min_history = min(20, window)
        self._per_epoch = iters_per_epoch

    def __call__(self, engine) -> None:
        out = engine.log_buffer['scalar']
        loss = out['loss']
        if math.isfinite(loss) and not self._factor:
            return
        iteration = engine.last_iter.val + 1  # the learner counts this iteration only after its hooks
        where = f'at iteration {iteration}' + (f' (epoch {(iteration - 1) // self._per_epoch + 1})'
                                               if self._per_epoch else '')
        if not math.isfinite(loss):
            raise TrainingDiverged(f'training diverged {where}: the loss is {loss} (lr {out["lr"]:.4g})')
        if len(self._recent) >= self._min_history:
            median = statistics.median(self._recent)
            if loss > self._factor * median:
                raise TrainingDiverged(f'training diverged {where}: the loss {loss:.4g} is above loss_spike_factor='
                                       f'{self._factor:g} x {median:.4g}, the median of the last '
                                       f'{len(self._recent)} (lr {out["lr"]:.4g})')
        self._recent.append(loss)
