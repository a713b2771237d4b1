"""The training run, top to bottom: resume, then per epoch train -> evaluate -> checkpoint, then the summary.

The parts it drives (data, policy, DI-engine's learner and evaluator, folder, TensorBoard) are built by
``run_parts.RunParts``; progress and clock live in ``run_state.RunState``; checkpoints are written by
``checkpoint.CheckpointManager``. docs/ARCHITECTURE.md walks one step through the files."""
import json
import logging
import os
from contextlib import nullcontext
from typing import Any, Dict

import torch
from easydict import EasyDict

from .checkpoint import DiskWriteError, set_aside_later_checkpoints, step_checkpoint_name
from .config import save_config_file
from .data import shutdown_workers
from .ding_adapter import restore_best
from .run_parts import RunParts
from .run_state import RunState
from .runtime import release_experiment_dir, remove_restart_marker, write_json
from .signals import StopAgreement, Terminated, interrupt_guard, termination_guard
from .summary import log_done, run_summary
from .tb_visuals import log_hparams

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


class Trainer:
    """``Trainer(cfg).fit()`` trains and evaluates as ``cfg`` says and returns the run's summary."""

    def __init__(self, cfg: EasyDict) -> None:
        self.cfg, self.state = cfg, RunState()  # the run's progress; its clock starts now
        self.run = RunParts(cfg, self.state)
        self.learner = self.run.learner
        self._training_started = False  # before: a failed run removes the folder it created

    def fit(self) -> Dict[str, Any]:
        try:
            with interrupt_guard() as self._interrupted, termination_guard() as terminated:
                self._stop_agreed = StopAgreement(terminated, self.run.world_size)
                return self._fit()
        except BaseException:
            self.run.tb.close_after_failure()
            raise
        finally:
            # Stopped loader workers on every way out: left to interpreter exit they can delay it or (after a
            # SIGTERM, which they ignored) keep it waiting.
            shutdown_workers(self.run.data.train_loader, self.run.data.val_loader)
            # A run that failed before it trained leaves no folder behind (if it made it).
            release_experiment_dir(remove=not self._training_started)

    def _fit(self) -> Dict[str, Any]:
        cfg, run, epochs = self.cfg, self.run, self.cfg.policy.learn.train_epoch
        if cfg.resume:
            self.resume()  # first: a refused resume must leave the run's folder as it was
            if self.state.epoch >= epochs:
                return self._already_finished()
        if run.rank == 0:
            # Without `resume`: run again with --config, the file starts a new run instead of continuing this one.
            config_file = os.path.join(run.exp_dir, 'total_config.py')
            try:
                save_config_file(dict(cfg, resume=None), config_file)
            except OSError as e:  # a full or read-only disk: one line, not a traceback
                raise DiskWriteError(config_file, e) from None
            write_json(os.path.join(run.exp_dir, 'classes.json'), run.data.class_names)
        run.log_start()
        run.visuals.log_training_images(self.learner.train_iter)
        metrics = self.state.history[-1] if self.state.history else {}
        self.learner.call_hook('before_run')
        for epoch in range(self.state.epoch + 1, epochs + 1):
            self._train_epoch(epoch)
            stop = False
            if epoch % cfg.eval_every == 0 or epoch == epochs:
                metrics, stop = self._evaluate(epoch)
            name = step_checkpoint_name(self.learner.train_iter, epoch)
            self.save(name)
            if epoch < epochs and not stop and self._stop_agreed():  # a SIGTERM during the evaluation or save
                self._terminate(name, write=False)
            if stop:
                logger.info(f'stop_value {cfg.policy.eval.evaluator.stop_value} reached at epoch {epoch}')
                break
        self.learner.call_hook('after_run')
        return self._finish(metrics)

    def _train_epoch(self, epoch: int) -> None:
        data, state, every = self.run.data, self.state, self.cfg.checkpoint.every_n_iters
        data.train_sampler.set_epoch(epoch)
        data.train_loader.batch_sampler.skip_batches = state.batch
        self.run.log_hook.restart_clock()
        learn_model = self.run.policy.learn_mode.get_attribute('learn_model')
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
                    self.run.log_hook.restart_clock()
        state.epoch, state.batch = epoch, 0
        self.run.policy.set_epoch(epoch)
        log_skipped_files(data.train_loader.dataset, self.run.tb, epoch, self.learner.train_iter, self.run.rank)

    def _evaluate(self, epoch: int):
        run, last = self.run, epoch == self.cfg.policy.learn.train_epoch
        tta = self.cfg.policy.eval.tta
        # TTA in every evaluation when asked, or when it decides the best checkpoint (metric_key acc1_tta)
        run.policy.set_tta(last or tta.every_eval or 'tta' in self.cfg.policy.eval.metric_key.split('_'))
        # The evaluator asks for ckpt_best while it evaluates; it is written once this epoch's result is part of
        # the run's state (best, history), so the file records itself as the best.
        best_requests = []
        stop, metrics = run.evaluator.eval(best_requests.append, self.learner.train_iter)
        run.log_hook.log_eval(metrics, epoch, self.learner.train_iter)
        self.state.record_eval(epoch, metrics, run.metric.gt)
        for name in best_requests:  # the same on every rank: the metric is reduced over all of them
            self.save(name)
            if run.rank == 0:
                logger.info(f'saved {name}')
        run.visuals.after_eval(run.policy.eval_mode, self.learner.train_iter, run.exp_dir, final=stop or last)
        return metrics, stop

    def save(self, name: str) -> str:
        """Write the run's state as checkpoint ``name`` (every rank calls it; rank 0 writes)."""
        return self.run.checkpoints.save(name, self.run.state_dict)

    def resume(self) -> None:
        run = self.run
        path, state = run.checkpoints.find(self.cfg.resume)
        if path is None:
            return
        run.load_state_dict(state, path)
        if run.rank == 0:
            set_aside_later_checkpoints(run.checkpoints.dir, self.learner.last_iter.val)
            # What the superseded run logged after this checkpoint (its iterations >= last_iter + 1) is hidden.
            run.tb.purge_step = self.learner.last_iter.val + 1
        restore_best(run.evaluator, self.state.best)
        logger.info(f'resumed from {path}: epoch {self.state.epoch} done, {self.state.batch} batches into the next')

    def _terminate(self, name: str, write: bool) -> None:
        """Stop for SIGTERM at a checkpoint: written now (mid-epoch; the loader position makes it resumable) or
        just written (``write=False``); every rank waits until rank 0 has it on disk, then raises ``Terminated``."""
        path = self.save(name) if write else self.run.checkpoints.path(name)
        if self.run.world_size > 1:
            torch.distributed.barrier()
        raise Terminated(path, self.learner.train_iter, self.run.rank)

    def _already_finished(self) -> Dict[str, Any]:
        """A resume of a run that trained all its epochs: nothing to do, and its summary.json stays as it is."""
        run, path = self.run, os.path.join(self.run.exp_dir, 'summary.json')
        logger.info(f'{run.exp_dir} has already trained all {self.cfg.policy.learn.train_epoch} epochs; '
                    f'nothing to resume (raise policy.learn.train_epoch only with a new run: the LR schedule '
                    f'was built for this length). Its results: {path}')
        shutdown_workers(run.data.train_loader, run.data.val_loader)
        run.tb.close()
        if run.rank == 0:
            remove_restart_marker(self.cfg)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        return {'exp_dir': run.exp_dir, 'epochs': self.state.epoch}

    def _finish(self, metrics: Dict[str, Any]) -> Dict[str, Any]:
        run = self.run
        summary = run_summary(self.cfg, self.state, metrics, run.exp_dir, run.world_size, run.data.num_classes)
        if run.rank == 0:
            log_hparams(run.tb, self.cfg, summary, run.world_size, self.learner.train_iter)
            write_json(os.path.join(run.exp_dir, 'summary.json'), summary)
            log_done(summary, self.state.best, self.cfg.policy.eval.metric_key)
        run.close()
        return summary


def train(cfg: EasyDict) -> Dict[str, Any]:
    """Train and evaluate as ``cfg`` says; returns the summary that is also written to summary.json."""
    return Trainer(cfg).fit()
