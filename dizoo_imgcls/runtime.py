"""Process-level plumbing: distributed init, logging, experiment folders, atomic JSON."""
import glob
import json
import logging
import os
import re
import sys
from datetime import datetime
from typing import Any, Tuple

import torch
import torch.distributed as dist
from easydict import EasyDict

from .checkpoint import step_checkpoints

logger = logging.getLogger('dizoo_imgcls')
# A later run of an experiment whose folder is taken writes to <exp_name>_<RUN_STAMP>[_N] (experiment_dir);
# --resume auto looks for these (newest_run_folder).
RUN_STAMP, RUN_STAMP_PATTERN = '%y%m%d_%H%M%S', r'_\d{6}_\d{6}(_\d+)?'


class NullWriter:
    """Stands in for the TensorBoard writer on ranks other than 0, so exactly one process writes events."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class LazyWriter:
    """A TensorBoard ``SummaryWriter`` made on first use: a run that stops before it logs anything (a refused
    resume) leaves no empty event file behind. ``flush`` and ``close`` before any use make nothing (DI-engine's
    learner flushes in its destructor).

    ``purge_step`` (set by a resumed run before its first log): TensorBoard drops the events of earlier runs in the
    folder from that step on, so the curves of a run resumed from an older checkpoint do not double back."""

    def __init__(self, logdir: str) -> None:
        self._logdir, self._writer = logdir, None
        self.purge_step = None

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def __getattr__(self, name):
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(self._logdir, purge_step=self.purge_step)
        return getattr(self._writer, name)


def init_distributed(use_cuda: bool) -> Tuple[int, int]:
    """Join the process group torchrun describes in the environment; (rank, world_size)."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size > 1 and not dist.is_initialized():
        cuda = use_cuda and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
        dist.init_process_group(backend='nccl' if cuda else 'gloo', store=_attempt_store(world_size),
                                rank=int(os.environ['RANK']), world_size=world_size)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _attempt_store(world_size: int) -> dist.Store:
    """torchrun's key-value store, under a prefix per restart attempt: after ``--max-restarts`` brings the
    job back, the new processes must not read the (dead) addresses the previous attempt published there."""
    agent_store = os.environ.get('TORCHELASTIC_USE_AGENT_STORE', '').lower() == 'true'
    store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), world_size,
                          is_master=not agent_store and int(os.environ['RANK']) == 0)
    return dist.PrefixStore(f'dizoo_imgcls/attempt{elastic_restart_count()}', store)


def setup_logging(exp_dir: str = None, rank: int = 0) -> None:
    log = logging.getLogger('dizoo_imgcls')
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter('[%(asctime)s] %(message)s', datefmt='%m-%d %H:%M:%S')
    for handler in list(log.handlers):  # a second run in the same process starts clean
        log.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    if exp_dir is not None:
        # appends, one line per write; the other ranks open the file only if they have something to add
        file_handler = logging.FileHandler(os.path.join(exp_dir, 'train.log'), delay=rank != 0)
        file_handler.setFormatter(fmt)
        if rank != 0:  # the other ranks add only the unreadable files they find in their shards
            file_handler.addFilter(lambda record: getattr(record, 'bad_file', False))
        log.addHandler(file_handler)


_CURRENT_EXPERIMENT = None


def current_experiment_dir():
    """The folder the last ``experiment_dir`` call chose in this process (None before any)."""
    return _CURRENT_EXPERIMENT


def experiment_dir(cfg: EasyDict) -> str:
    """Where this run writes: the resumed run's folder (``EXP`` of ``--resume EXP/ckpt/FILE``), else
    ``output_dir/exp_name`` (plus a timestamp if that folder is already used). The same path on every rank."""
    restart_marker = _elastic_restart_marker(cfg)
    first_rank = int(os.environ.get('RANK', '0')) == 0  # only it creates folders; the others get its path
    # Only a restarted attempt reads the marker: a new job with the same torchrun run id (its default is 'none')
    # must not write into the folder of an earlier, finished one.
    if restart_marker and elastic_restart_count() > 0 and os.path.isfile(restart_marker):
        with open(restart_marker) as f:
            path = f.read().strip()
    elif cfg.resume == 'auto':
        path = newest_run_folder(os.path.abspath(os.path.join(cfg.output_dir, cfg.exp_name)))
    elif cfg.resume and os.path.basename(os.path.dirname(os.path.abspath(cfg.resume))) == 'ckpt':
        path = os.path.dirname(os.path.dirname(os.path.abspath(cfg.resume)))  # EXP/ckpt/file.pth.tar
    else:  # a new run, or one resumed from a checkpoint file kept outside any experiment folder
        path = os.path.abspath(os.path.join(cfg.output_dir, cfg.exp_name))
        if os.path.isdir(path) and os.listdir(path) and first_rank:
            path = _claim_new_folder(f'{path}_{datetime.now().strftime(RUN_STAMP)}')
    if dist.is_initialized():
        holder = [path]
        dist.broadcast_object_list(holder, src=0)
        path = holder[0]
    try:
        os.makedirs(path, exist_ok=True)
        if restart_marker and elastic_restart_count() == 0 and first_rank:
            with open(restart_marker, 'w') as f:
                f.write(path)
    except OSError as e:  # output_dir is a file, or a folder this user cannot write
        raise ValueError(f'cannot create the experiment folder {path} (output_dir={cfg.output_dir!r}, '
                         f'exp_name={cfg.exp_name!r}): {e.strerror or e}') from None
    global _CURRENT_EXPERIMENT
    _CURRENT_EXPERIMENT = path
    return path


def newest_run_folder(base: str) -> str:
    """What ``--resume auto`` continues: of ``base`` and the ``base_YYMMDD_HHMMSS[_N]`` folders that later runs
    of the same experiment got, the one whose newest step checkpoint was written last; ``base`` when none has
    a checkpoint (the run then starts from scratch there)."""
    stamped = re.compile(re.escape(os.path.basename(base)) + RUN_STAMP_PATTERN)
    candidates = [base] + [p for p in glob.glob(glob.escape(base) + '_*')
                           if stamped.fullmatch(os.path.basename(p)) and os.path.isdir(p)]
    newest, newest_time = base, None
    for folder in candidates:
        checkpoints = step_checkpoints(os.path.join(folder, 'ckpt'))
        if checkpoints:
            written = max(os.path.getmtime(p) for p in checkpoints)
            if newest_time is None or written > newest_time:
                newest, newest_time = folder, written
    return newest


def _claim_new_folder(base: str) -> str:
    """Create ``base`` (or ``base_2``, ``base_3``, ... when a run started in the same second has it) and return
    it: the creation is the claim, so two runs never share a folder."""
    candidate, n = base, 1
    while True:
        try:
            os.makedirs(candidate)
            return candidate
        except FileExistsError:
            n += 1
            candidate = f'{base}_{n}'


def _elastic_restart_marker(cfg: EasyDict):
    """A file naming this torchrun job's experiment folder, so a restarted job (--max-restarts) finds it."""
    run_id = os.environ.get('TORCHELASTIC_RUN_ID')
    if not run_id or 'TORCHELASTIC_RESTART_COUNT' not in os.environ:
        return None
    name = str(cfg.exp_name).replace(os.sep, '_')  # exp_name may name a sub-folder (a/b); the marker is one file
    return os.path.join(os.path.abspath(cfg.output_dir), f'.{name}.torchrun-{run_id}')


def remove_restart_marker(cfg: EasyDict) -> None:
    """A finished job needs no marker (torchrun restarts only failed ones): leave no hidden file behind."""
    marker = _elastic_restart_marker(cfg)
    if marker is not None:
        try:
            os.remove(marker)
        except FileNotFoundError:
            pass


def elastic_restart_count() -> int:
    return int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0'))


def write_json(path: str, payload: Any) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def set_deterministic(enabled: bool) -> None:
    """Bit-exact repeatability: deterministic kernels, no cuDNN autotuning."""
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled and torch.cuda.is_available()
