"""What a training run is made of, built once in order: settings checks, processes, seeds, data, experiment
folder, logging, TensorBoard, the policy and DI-engine's learner and evaluator; and the run's checkpoint state."""
import atexit
import functools
import logging
import os
import shutil
import tempfile
from typing import Any, Dict

import torch
from ding.utils import set_pkg_seed
from easydict import EasyDict

from .checkpoint import (CHECKPOINT_FORMAT, CheckpointError, CheckpointManager, one_line, sweep_stale_temp_files,
                         to_plain)
from .config import check_run_settings, check_same_schedule, prepare_config
from .data import build_loaders, shutdown_workers
from .data.check import check_splits_readable
from .ding_adapter import make_evaluator, make_learner, make_policy
from .errors import SettingError
from .hooks import LossGuardHook, TrainingDiverged, TrainLoggerHook
from .metric import DiagnosticMetric
from .run_state import RunState
from .runtime import (LazyWriter, NullWriter, elastic_restart_count, experiment_dir, init_distributed,
                      release_experiment_dir, remove_restart_marker, set_deterministic,
                      setup_logging)
from .signals import worker_leaves_sigterm_to_the_run
from .tb_visuals import TensorBoardVisuals

logger = logging.getLogger('dizoo_imgcls')


def non_finite_tensors(state: Dict[str, Any]) -> list:
    """Names of the floating-point tensors of ``state`` holding a NaN or an infinity (one device sync)."""
    floats = [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(v).all() for _, v in floats]).tolist()
    return [k for (k, _), ok in zip(floats, finite) if not ok]


class RunParts:
    """The parts of one training run (``cfg`` completed by ``prepare_config``), progress in ``state``. Rank 0
    claims and locks the experiment folder; a failure while building releases it and removes what was made."""

    def __init__(self, cfg: EasyDict, state: RunState) -> None:
        self.cfg, self.state = cfg, state
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
            raise SettingError(f'{val_images} validation image(s) for {self.world_size} processes: every process '
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
        self.exp_dir = experiment_dir(cfg)  # claimed and locked by rank 0 until the run ends
        self.checkpoints = CheckpointManager(os.path.join(self.exp_dir, 'ckpt'), cfg.checkpoint.keep_last, self.rank,
                                             self.world_size)
        try:
            self._build(cfg)
        except BaseException:
            release_experiment_dir(remove=True)
            raise

    def _build(self, cfg: EasyDict) -> None:
        setup_logging(self.exp_dir, self.rank)
        if self.rank == 0:
            stale = sweep_stale_temp_files(self.exp_dir, self.checkpoints.dir)  # of writers killed mid-write
            if stale:
                logger.info(f'removed {len(stale)} temporary file(s) that killed runs left: {", ".join(stale)}')
        self.tb = LazyWriter(os.path.join(self.exp_dir, 'tb')) if self.rank == 0 else NullWriter()
        self.policy = make_policy(cfg.policy, enable_field=['learn', 'eval'])
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
                                        self.world_size, self.rank, global_batch_sizes=batches() if batches else None,
                                        state=self.state)
        self.learner.register_hook(self.log_hook)
        self.evaluator = make_evaluator(cfg.policy.eval.evaluator, self.data.val_loader, self.metric,
                                        self.policy.eval_mode, exp_name)
        # TensorBoard image, per-class and pixel-map panels (written on rank 0)
        self.visuals = TensorBoardVisuals(self.tb, self.data, self.metric, self.rank)

    def log_start(self) -> None:
        d = self.data
        logger.info(f'experiment: {self.exp_dir}')
        logger.info(f'{len(d.train_loader.dataset)} train / {len(d.val_loader.dataset)} val images, '
                    f'{d.num_classes} classes, {len(d.train_loader)} iterations per epoch, '
                    f'world size {self.world_size}')
        logger.info(f'training on {self.policy.describe_compute()}')

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
            **self.state.state_dict(),  # position, best, history, clock
            'config': to_plain(self.cfg),
            'class_names': list(self.data.class_names),
            'display_names': getattr(self.data, 'display_names', None),
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
        self.checkpoints.restore_rng(state)

    def close(self) -> None:
        """The end of a run that finished: loader workers, DI-engine's learner and evaluator, the folders."""
        shutdown_workers(self.data.train_loader, self.data.val_loader)
        self.learner.close()
        self.evaluator.close()
        if self.rank != 0:
            shutil.rmtree(self._log_root, ignore_errors=True)
        else:
            remove_restart_marker(self.cfg)
