"""The training run: data -> policy -> DI-engine BaseLearner + MetricSerialEvaluator -> experiment folder."""
import atexit
import functools
import json
import logging
import os
import shutil
import tempfile
from contextlib import nullcontext
from typing import Any, Dict

import torch
from ding.utils import set_pkg_seed
from easydict import EasyDict

from .checkpoint import (CHECKPOINT_FORMAT, CheckpointError, CheckpointManager, DiskWriteError, one_line,
                         set_aside_later_checkpoints, step_checkpoint_name, sweep_stale_temp_files, to_plain)
from .config import check_run_settings, check_same_schedule, prepare_config, save_config_file
from .ding_adapter import make_evaluator, make_learner, restore_best
from .data import EvalEvent, build_loaders, shutdown_workers
from .data.check import check_splits_readable
from .hooks import LossGuardHook, TrainingDiverged, TrainLoggerHook
from .metric import DiagnosticMetric
from .policy import ImageClassificationPolicy
from .run_state import RunState
from .runtime import (LazyWriter, NullWriter, elastic_restart_count, experiment_dir, init_distributed,
                      quiet_write_errors, release_experiment_dir, remove_restart_marker, set_deterministic,
                      setup_logging, write_json)
from .signals import Terminated, interrupt_guard, termination_guard, worker_leaves_sigterm_to_the_run
from .summary import run_facts
from .tb_visuals import TensorBoardVisuals, log_hparams

logger = logging.getLogger('dizoo_imgcls')


def log_skipped_files(dataset, tb, epoch: int, iteration: int, rank: int = 0) -> None:
    """Datasets that replace unreadable files expose ``skipped_files()`` (a count over all workers), and
    ``sync_skipped_files()``, the count over all DDP ranks (called by every rank). The TensorBoard step is the
    training iteration, like every other scalar of the run."""
    if hasattr(dataset, 'skipped_files'):
        skipped = dataset.sync_skipped_files() if hasattr(dataset, 'sync_skipped_files') else dataset.skipped_files()
        tb.add_scalar('data/skipped', skipped, iteration)
        if skipped and rank == 0:
            logger.warning(f'epoch {epoch}: {skipped} unreadable training file(s) skipped so far (see train.log)')


# Under DDP the ranks agree on a SIGTERM (a tiny all-reduce) every this many batches and at each epoch's last
# batch, not after every batch: a collective per step would cost speed.
STOP_CHECK_EVERY = 10


def non_finite_tensors(state: Dict[str, Any]) -> list:
    """Names of the floating-point tensors of ``state`` holding a NaN or an infinity (one device sync)."""
    floats = [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(v).all() for _, v in floats]).tolist()
    return [k for (k, _), ok in zip(floats, finite) if not ok]


class TrainingRun:
    """One run of ``train``: owns the policy, DI-engine learner and evaluator, and the resumable state."""

    def __init__(self, cfg: EasyDict) -> None:
        self.state = RunState()  # the run's progress; its clock starts now
        self.cfg = cfg
        check_run_settings(cfg)
        self.rank, self.world_size = init_distributed(cfg.policy.cuda)
        cfg.policy.learn.multi_gpu = self.world_size > 1
        set_deterministic(cfg.deterministic, cfg.policy.learn.cudnn_benchmark)
        set_pkg_seed(cfg.seed + self.rank, use_cuda=cfg.policy.cuda and torch.cuda.is_available())
        self.data = build_loaders(cfg.data, cfg.policy.learn.batch_size, cfg.policy.eval.batch_size, self.rank,
                                  self.world_size, cfg.seed)
        check_splits_readable(self.data)  # a split of unreadable files: one clear error before any folder is made
        val_images = getattr(self.data.val_sampler, 'num_samples', None)
        if val_images is not None and val_images < self.world_size:  # the same decision on every rank
            raise ValueError(f'{val_images} validation image(s) for {self.world_size} processes: every process '
                             f'evaluates a shard of its own and needs at least one image; add validation images '
                             f'or start fewer processes')
        prepare_config(cfg, self.data)
        for loader in (self.data.train_loader, self.data.val_loader):
            loader.worker_init_fn = functools.partial(worker_leaves_sigterm_to_the_run, loader.worker_init_fn)
        # The exact metric plus, in the same val pass, a confusion matrix and the most confident mistakes.
        self.metric = DiagnosticMetric(cfg.policy.eval.metric_key, cfg.policy.model.num_classes,
                                       self.data.val_sampler)
        if elastic_restart_count() > 0 and not cfg.resume:
            cfg.resume = 'auto'  # torchrun --max-restarts brought the job back: continue from its checkpoints
        self.exp_dir = experiment_dir(cfg)  # claimed and locked by rank 0 until fit() ends
        self.checkpoints = CheckpointManager(os.path.join(self.exp_dir, 'ckpt'), cfg.checkpoint.keep_last, self.rank,
                                             self.world_size)
        self._training_started = False  # before: a failed run removes the folder it created (release_experiment_dir)
        try:
            self._setup(cfg)
        except BaseException:
            release_experiment_dir(remove=True)
            raise

    def _setup(self, cfg: EasyDict) -> None:
        setup_logging(self.exp_dir, self.rank)
        if self.rank == 0:
            stale = sweep_stale_temp_files(self.exp_dir, self.checkpoints.dir)  # of writers killed mid-write
            if stale:
                logger.info(f'removed {len(stale)} temporary file(s) that killed runs left: {", ".join(stale)}')
        self.tb = LazyWriter(os.path.join(self.exp_dir, 'tb')) if self.rank == 0 else NullWriter()
        self.policy = ImageClassificationPolicy(cfg.policy, enable_field=['learn', 'eval'])
        self._build_workers()
        # TensorBoard image and per-class panels (rank 0); the run calls eval callbacks on rank 0 only.
        self.visuals = TensorBoardVisuals(self.tb, self.data, self.metric, self.rank)
        self.data.eval_callbacks.append(self.visuals)

    def _build_workers(self) -> None:
        cfg = self.cfg
        # DI-engine's learner and evaluator write text logs under './{exp_name}/log' on every rank; only rank 0
        # may write into the experiment folder, the others log to a private temporary folder.
        if self.rank == 0:
            self._log_root = self.exp_dir
        else:  # removed at exit, also when the run fails (not after SIGKILL)
            self._log_root = tempfile.mkdtemp(prefix=f'dizoo_imgcls_rank{self.rank}_')
            atexit.register(shutil.rmtree, self._log_root, True)
        exp_name = os.path.relpath(self._log_root)
        self.learner = make_learner(cfg.policy.learn.learner, self.policy.learn_mode, self.tb, self.rank, exp_name)
        iters = cfg.policy.learn.iters_per_epoch
        self.learner.register_hook(LossGuardHook(cfg.get('loss_spike_factor', 0), iters_per_epoch=iters))
        batches = getattr(self.data.train_loader.batch_sampler, 'global_batch_sizes', None)
        self.log_hook = TrainLoggerHook(self.tb, cfg.log_every, cfg.policy.learn.train_epoch * iters, iters,
                                        self.world_size, self.rank, global_batch_sizes=batches() if batches else None)
        self.learner.register_hook(self.log_hook)
        self.evaluator = make_evaluator(cfg.policy.eval.evaluator, self.data.val_loader, self.metric,
                                        self.policy.eval_mode, exp_name)
        for ding_logger in ('learner_logger', 'evaluator_logger'):
            # DI-engine's tables stay in exp_dir/log/*; the console gets our one-line summaries instead.
            logging.getLogger(ding_logger).propagate = False
            quiet_write_errors(logging.getLogger(ding_logger))

    # ----- checkpoint state -----
    def state_dict(self) -> Dict[str, Any]:
        policy = self.policy.learn_mode.state_dict()
        broken = non_finite_tensors(policy['model'])
        if broken:  # a loss still finite, but the step that followed it broke the weights: nothing of it is saved
            lr = self.learner.log_buffer['scalar'].get('lr', float('nan'))
            raise TrainingDiverged(f'training diverged by iteration {self.learner.train_iter} (lr {lr:.4g}): '
                                   f'{len(broken)} weight tensor(s) hold NaN or infinite values (e.g. {broken[0]})')
        return {
            'format': CHECKPOINT_FORMAT,
            'policy': policy,
            'last_iter': self.learner.last_iter.val,
            **self.state.state_dict(),  # position, best, history
            'config': to_plain(self.cfg),
            'class_names': list(self.data.class_names),
            'display_names': getattr(self.data, 'display_names', None),
            # the run's cost so far, so that the summary of a resumed run covers all of it
            'clock': {**self.log_hook.totals(), 'wall_seconds': self.state.wall_seconds()},
        }

    def load_state_dict(self, state: Dict[str, Any], path: str) -> None:
        if state.get('format') != CHECKPOINT_FORMAT:
            raise CheckpointError(f'{path} is not a dizoo_imgcls checkpoint (format {state.get("format")!r})')
        check_same_schedule(state['config'], self.cfg, path)
        if list(state['class_names']) != list(self.data.class_names):
            raise CheckpointError(f'{path} was trained on classes {state["class_names"][:5]}..., but the data '
                                  f'folder has {self.data.class_names[:5]}...; resume needs the same classes')
        try:
            self.policy.learn_mode.load_state_dict(state['policy'])
        except (RuntimeError, KeyError, ValueError) as e:  # the weights do not fit this model
            raise CheckpointError(f'{path} does not fit policy.model.name={self.cfg.policy.model.name!r} '
                                  f'({one_line(e)})') from e
        self.learner.last_iter.update(state['last_iter'])
        self.state.load_state_dict(state)
        self.log_hook.carried_over = {k: v for k, v in (state.get('clock') or {}).items() if k != 'wall_seconds'}
        self.checkpoints.restore_rng(state)

    def save(self, name: str) -> str:
        """Write the run's state as checkpoint ``name`` (every rank calls it; rank 0 writes)."""
        return self.checkpoints.save(name, self.state_dict)

    def resume(self) -> None:
        path, state = self.checkpoints.find(self.cfg.resume)
        if path is None:
            return
        self.load_state_dict(state, path)
        if self.rank == 0:
            set_aside_later_checkpoints(self.checkpoints.dir, self.learner.last_iter.val)
            # What the superseded run logged after this checkpoint (its iterations >= last_iter + 1) is hidden.
            self.tb.purge_step = self.learner.last_iter.val + 1
        restore_best(self.evaluator, self.state.best)
        logger.info(f'resumed from {path}: epoch {self.state.epoch} done, {self.state.batch} batches into the next')

    # ----- the loop -----
    def fit(self) -> Dict[str, Any]:
        try:
            with interrupt_guard() as self._interrupted, termination_guard() as self._terminated:
                return self._fit()
        except BaseException:
            self.tb.close_after_failure()
            raise
        finally:
            # Stopped loader workers on every way out: left to interpreter exit they can delay it or (after a
            # SIGTERM, which they ignored) keep it waiting.
            shutdown_workers(self.data.train_loader, self.data.val_loader)
            # A run that failed before it trained leaves no folder behind (if it made it).
            release_experiment_dir(remove=not self._training_started)

    def _fit(self) -> Dict[str, Any]:
        if self.cfg.resume:
            self.resume()  # first: a refused resume must leave the run's folder as it was
            if self.state.epoch >= self.cfg.policy.learn.train_epoch:
                return self._already_finished()
        if self.rank == 0:
            # Without `resume`: run again with --config, the file starts a new run instead of continuing this one.
            config_file = os.path.join(self.exp_dir, 'total_config.py')
            try:
                save_config_file(dict(self.cfg, resume=None), config_file)
            except OSError as e:  # a full or read-only disk: one line, not a traceback
                raise DiskWriteError(config_file, e) from None
            write_json(os.path.join(self.exp_dir, 'classes.json'), self.data.class_names)
        self._log_start()
        self.visuals.log_training_images(self.learner.train_iter)
        metrics = self.state.history[-1] if self.state.history else {}
        self.learner.call_hook('before_run')
        for epoch in range(self.state.epoch + 1, self.cfg.policy.learn.train_epoch + 1):
            self._train_epoch(epoch)
            stop = False
            if epoch % self.cfg.eval_every == 0 or epoch == self.cfg.policy.learn.train_epoch:
                metrics, stop = self._evaluate(epoch)
            name = step_checkpoint_name(self.learner.train_iter, epoch)
            self.save(name)
            if epoch < self.cfg.policy.learn.train_epoch and not stop and self._stop_agreed():  # SIGTERM in eval/save
                self._terminate(name, write=False)
            if stop:
                logger.info(f'stop_value {self.cfg.policy.eval.evaluator.stop_value} reached at epoch {epoch}')
                break
        self.learner.call_hook('after_run')
        return self._finish(metrics)

    def _already_finished(self) -> Dict[str, Any]:
        """A resume of a run that trained all its epochs: nothing to do, and its summary.json stays as it is."""
        path = os.path.join(self.exp_dir, 'summary.json')
        logger.info(f'{self.exp_dir} has already trained all {self.cfg.policy.learn.train_epoch} epochs; '
                    f'nothing to resume (raise policy.learn.train_epoch only with a new run: the LR schedule '
                    f'was built for this length). Its results: {path}')
        shutdown_workers(self.data.train_loader, self.data.val_loader)
        self.tb.close()
        if self.rank == 0:
            remove_restart_marker(self.cfg)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        return {'exp_dir': self.exp_dir, 'epochs': self.state.epoch}

    def _train_epoch(self, epoch: int) -> None:
        data, state, every = self.data, self.state, self.cfg.checkpoint.every_n_iters
        data.train_sampler.set_epoch(epoch)
        data.train_loader.batch_sampler.skip_batches = state.batch
        self.log_hook.restart_clock()
        learn_model = self.policy.learn_mode.get_attribute('learn_model')
        self._training_started = True
        # DDP's join lets ranks whose shard ends one batch earlier wait without deadlocking the others.
        with learn_model.join() if hasattr(learn_model, 'join') else nullcontext():
            for batch in data.train_loader:
                self.learner.train(batch)
                state.batch += 1
                if self._interrupted():  # a Ctrl-C that Python dropped (raised inside a destructor)
                    raise KeyboardInterrupt
                if self._stop_agreed(state.batch % STOP_CHECK_EVERY == 0 or state.batch == len(data.train_loader)):
                    self._terminate(step_checkpoint_name(self.learner.train_iter), write=True)
                if every and self.learner.train_iter % every == 0 and state.batch < len(data.train_loader):
                    self.save(step_checkpoint_name(self.learner.train_iter))
                    self.log_hook.restart_clock()
        state.epoch, state.batch = epoch, 0
        self.policy.set_epoch(epoch)
        log_skipped_files(data.train_loader.dataset, self.tb, epoch, self.learner.train_iter, self.rank)

    def _stop_agreed(self, sync_point: bool = True) -> bool:
        """Whether a SIGTERM asks the run to stop here. Alone, at once; under DDP only at ``sync_point``s, which
        every rank reaches at the same batch, and then for all ranks together (any rank's SIGTERM stops all)."""
        if self.world_size == 1:
            return self._terminated()
        if not sync_point:
            return False
        device = 'cuda' if torch.distributed.get_backend() == 'nccl' else 'cpu'
        flag = torch.tensor([1 if self._terminated() else 0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _terminate(self, name: str, write: bool) -> None:
        """Stop for SIGTERM at a checkpoint: written now (mid-epoch; the loader position makes it resumable) or
        just written (``write=False``); every rank waits until rank 0 has it on disk, then raises ``Terminated``."""
        path = self.save(name) if write else self.checkpoints.path(name)
        if self.world_size > 1:
            torch.distributed.barrier()
        raise Terminated(path, self.learner.train_iter, self.rank)

    def _evaluate(self, epoch: int):
        last = epoch == self.cfg.policy.learn.train_epoch
        tta = self.cfg.policy.eval.tta
        # TTA in every evaluation when asked, or when it decides the best checkpoint (metric_key acc1_tta)
        every = tta.every_eval or 'tta' in self.cfg.policy.eval.metric_key.split('_')
        self.policy.set_tta(last or every)
        # The evaluator asks for ckpt_best while it evaluates; it is written once this epoch's result is part of
        # the run's state (best, history), so the file records itself as the best.
        best_requests = []
        stop, metrics = self.evaluator.eval(best_requests.append, self.learner.train_iter)
        self.log_hook.log_eval(metrics, epoch, self.learner.train_iter)
        self.state.record_eval(epoch, metrics, self.metric.gt)
        for name in best_requests:  # the same on every rank: the metric is reduced over all of them
            self.save(name)
            if self.rank == 0:
                logger.info(f'saved {name}')
        if self.rank == 0:
            final = stop or epoch == self.cfg.policy.learn.train_epoch
            event = EvalEvent(self.policy.eval_mode, self.tb, epoch, self.learner.train_iter, self.exp_dir, final,
                              metrics)
            for callback in self.data.eval_callbacks:
                callback(event)
        return metrics, stop

    def _log_start(self) -> None:
        d = self.data
        logger.info(f'experiment: {self.exp_dir}')
        logger.info(f'{len(d.train_loader.dataset)} train / {len(d.val_loader.dataset)} val images, '
                    f'{d.num_classes} classes, {len(d.train_loader)} iterations per epoch, '
                    f'world size {self.world_size}')
        logger.info(f'training on {self.policy.describe_compute()}')

    def _finish(self, metrics: Dict[str, Any]) -> Dict[str, Any]:
        summary = {
            'acc1': metrics.get('acc1'),
            'acc5': metrics.get('acc5'),
            'loss': metrics.get('loss'),
            # Test-time augmentation and the weight average (None when off), on the same final eval pass.
            'acc1_tta': metrics.get('acc1_tta'),
            'acc1_ema': metrics.get('acc1_ema'),
            'acc1_ema_tta': metrics.get('acc1_ema_tta'),
            # acc1 of the best evaluation by policy.eval.metric_key (ckpt_best's); all its metrics: best_metrics.
            'best_acc1': self.state.best['acc1'] if self.state.best else None,
            'best_epoch': self.state.best_epoch,
            'eval_samples': metrics.get('samples'),
            'epochs': self.state.epoch,
            'wall_seconds': round(self.state.wall_seconds(), 2),  # resumed runs: all parts, each to its checkpoint
            'train_images': self.log_hook.totals()['train_images'],
            'train_img_per_sec': round(self.log_hook.img_per_sec, 2),
            'world_size': self.world_size,
            'num_classes': self.data.num_classes,
            'model': self.cfg.policy.model.name,
            'exp_dir': self.exp_dir,
        }
        summary.update(run_facts(self.cfg, self.state.best, self.log_hook.data_wait_share))  # resources, provenance
        if self.rank == 0:
            log_hparams(self.tb, self.cfg, summary, self.world_size, self.learner.train_iter)
            write_json(os.path.join(self.exp_dir, 'summary.json'), summary)
            if summary['acc1'] is not None:
                key = self.cfg.policy.eval.metric_key
                best = f'{key} {self.state.best[key]:.4g}, acc1 ' if key != 'acc1' else ''
                logger.info(f"done in {summary['wall_seconds']:.0f}s: acc1 {summary['acc1']:.2f} (best: {best}"
                            f"{summary['best_acc1']:.2f} at epoch {self.state.best_epoch}), "
                            f"{summary['train_img_per_sec']:.1f} train img/s")
            logger.info(f'experiment folder: {self.exp_dir}')
            logger.info(f'TensorBoard: tensorboard --logdir {os.path.join(self.exp_dir, "tb")}')
        shutdown_workers(self.data.train_loader, self.data.val_loader)
        self.learner.close()
        self.evaluator.close()
        if self.rank != 0:
            shutil.rmtree(self._log_root, ignore_errors=True)
        else:
            remove_restart_marker(self.cfg)
        return summary


def train(cfg: EasyDict) -> Dict[str, Any]:
    """Train and evaluate as ``cfg`` says; returns the summary that is also written to summary.json."""
    return TrainingRun(cfg).fit()
