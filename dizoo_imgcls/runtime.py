"""Process-level plumbing: distributed init, logging, experiment folders (claimed and locked), atomic JSON."""
import fcntl
import glob
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import threading
import time
import weakref
from datetime import datetime
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
from easydict import EasyDict

from .checkpoint import BEST_NAME, DiskWriteError, atomic_write, free_space, pid_alive, step_checkpoints
from .errors import SettingError, UserError

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
    folder from that step on, so the curves of a run resumed from an older checkpoint do not double back.

    A failed write (a full disk) raises ``DiskWriteError`` in the run: tensorboardX writes from a thread of its own,
    which dies on the error, and the run would then block for ever on the thread's full queue. After that first
    error the writer does nothing (destructors still flush it)."""

    def __init__(self, logdir: str) -> None:
        self._logdir, self._writer = logdir, None
        self._failed = False
        self.thread_error: Optional[OSError] = None
        self.purge_step = None

    def flush(self) -> None:
        if self._writer is not None:
            self._checked(self._writer.flush)()

    def close(self) -> None:
        if self._writer is not None:
            self._checked(self._writer.close)()

    def close_after_failure(self) -> None:
        """The run is failing with an error of its own: write the events that still fit (the curve up to a NaN
        loss, say). A disk error here is the full disk already reported, or a second error the run has no way left
        to report; raised from DI-engine's destructor at exit it would print a traceback after the error line."""
        try:
            self.close()
        except DiskWriteError:
            pass
        self._failed = True  # the learner's destructor flushes it again

    def __getattr__(self, name):
        if name.startswith('_'):
            raise AttributeError(name)
        if self._writer is None:
            from tensorboardX import SummaryWriter

            before = set(threading.enumerate())
            self._writer = SummaryWriter(self._logdir, purge_step=self.purge_step)
            _watch_writer_threads(self, [t for t in threading.enumerate() if t not in before])  # its event writer
        return self._checked(getattr(self._writer, name))

    def _checked(self, method):
        if self._failed:
            return lambda *args, **kwargs: None
        if self.thread_error is not None:  # its writer thread died of it (_watch_writer_threads)
            self._fail()
            raise DiskWriteError(self._logdir, self.thread_error)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except OSError as e:
                self._fail()
                raise DiskWriteError(self._logdir, e) from None
        return call

    def _fail(self) -> None:
        """Write nothing more: the events that did not fit are lost, and tensorboardX's own flush at exit would
        print a traceback for them (the events already written stay readable, as after a kill)."""
        self._failed = True
        for file_writer in getattr(self._writer, 'all_writers', {}).values():
            event_writer = getattr(file_writer, 'event_writer', None)
            if event_writer is not None and hasattr(event_writer, '_closed'):
                event_writer._closed = True


_WRITER_THREADS = weakref.WeakKeyDictionary()  # tensorboardX writer thread -> its LazyWriter


def _watch_writer_threads(writer: LazyWriter, threads) -> None:
    """A LazyWriter's thread that dies of an OSError: the writer reports it in the run (one line, no traceback
    from the thread); every other thread's exception goes to the hook installed before."""
    for thread in threads:
        _WRITER_THREADS[thread] = writer
    if getattr(threading.excepthook, 'dizoo_imgcls', False):
        return
    previous = threading.excepthook

    def hook(args) -> None:
        owner = _WRITER_THREADS.get(args.thread) if args.thread is not None else None
        if owner is not None and isinstance(args.exc_value, OSError):
            owner.thread_error = args.exc_value
            return
        previous(args)

    hook.dizoo_imgcls = True
    threading.excepthook = hook


def quiet_write_errors(log: logging.Logger) -> None:
    """The file handlers of ``log`` (DI-engine's text logs) stop writing on a full disk instead of printing a
    traceback per line; ``train.log`` and the checkpoints report the failure."""
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler) and not isinstance(handler, RunLogHandler):
            handler.handleError = _ignore_os_errors(handler.handleError)


def _ignore_os_errors(handle_error):
    def quiet(record: logging.LogRecord) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            handle_error(record)
    return quiet


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


class RunLogHandler(logging.FileHandler):
    """``train.log``. On a full (or read-only) disk Python's logging prints a traceback for every line it fails to
    write; this handler says it once, on stderr, and from then on the lines go to the console only."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        self.failed = True
        sys.stderr.write(f'warning: cannot write {self.baseFilename}: {error.strerror or error} '
                         f'({free_space(self.baseFilename)} free there); further log lines go to the console only\n')


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
        file_handler = RunLogHandler(os.path.join(exp_dir, 'train.log'), delay=rank != 0)
        file_handler.setFormatter(fmt)
        if rank != 0:  # the other ranks add only the unreadable files they find in their shards
            file_handler.addFilter(lambda record: getattr(record, 'bad_file', False))
        log.addHandler(file_handler)


_CURRENT_EXPERIMENT = None
# The experiment folder this process holds: (path, open lock file, whether this process created the folder)
_HELD: Optional[Tuple[str, Any, bool]] = None
LOCK_NAME = '.lock'  # in the experiment folder: "PID HOST START", flock-ed by the run writing there


class ExperimentInUse(UserError, ValueError):
    """Another live process holds the experiment folder's lock."""


def current_experiment_dir():
    """The folder the last ``experiment_dir`` call chose in this process (None before any)."""
    return _CURRENT_EXPERIMENT


def experiment_dir(cfg: EasyDict) -> str:
    """Where this run writes: the resumed run's folder (``EXP`` of ``--resume EXP/ckpt/FILE``), else
    ``output_dir/exp_name`` (plus a timestamp if that folder is already used). The same path on every rank.

    The first rank claims the folder: a new run's folder is created by ``os.mkdir`` (the creation is the claim),
    and the folder is locked (``EXP/.lock``, an exclusive ``flock`` held until ``release_experiment_dir`` or
    the process's end, also a killed one). A folder another live run holds is refused (``ExperimentInUse``,
    naming its PID and host) on every rank; a new run instead takes a timestamped folder of its own."""
    check_exp_name(cfg)
    release_experiment_dir()  # a process runs one experiment at a time
    path, error = None, None
    first_rank = not dist.is_initialized() or dist.get_rank() == 0
    if first_rank:  # only the first rank creates and locks; the others get its answer
        try:
            path = _claim_experiment_dir(cfg)
        except ValueError as e:
            error = e
    if dist.is_initialized():
        holder = [path, str(error) if error is not None else None]
        dist.broadcast_object_list(holder, src=0)
        path = holder[0]
        if holder[1] is not None and error is None:
            error = ExperimentInUse(holder[1])
    if error is not None:
        raise error
    if not first_rank:
        try:
            os.makedirs(path, exist_ok=True)  # another machine's rank, without a shared file system
        except OSError as e:
            raise _folder_error(cfg, path, e) from None
    global _CURRENT_EXPERIMENT
    _CURRENT_EXPERIMENT = path
    return path


def check_exp_name(cfg: EasyDict) -> None:
    """exp_name names a folder inside output_dir (a/b is fine); '../x' or an absolute path would write elsewhere."""
    out = os.path.abspath(str(cfg.output_dir))
    path = os.path.abspath(os.path.join(out, str(cfg.exp_name)))
    if os.path.isabs(str(cfg.exp_name)) or path == out or os.path.commonpath([out, path]) != out:
        raise SettingError(f'exp_name must name a folder inside output_dir ({out}), got {cfg.exp_name!r}: it would '
                           f'write to {path}; use a plain name such as my_run (or a/b for a sub-folder)')


def _folder_error(cfg: EasyDict, path: str, e: OSError) -> SettingError:
    # output_dir is a file, or a folder this user cannot write
    return SettingError(f'cannot create the experiment folder {path} (output_dir={cfg.output_dir!r}, '
                        f'exp_name={cfg.exp_name!r}): {e.strerror or e}')


def _claim_experiment_dir(cfg: EasyDict) -> str:
    restart_marker = _elastic_restart_marker(cfg)
    base = os.path.abspath(os.path.join(cfg.output_dir, cfg.exp_name))
    try:
        # Only a restarted attempt reads the marker: a new job with the same torchrun run id (its default is
        # 'none') must not write into the folder of an earlier, finished one.
        if restart_marker and elastic_restart_count() > 0 and os.path.isfile(restart_marker):
            with open(restart_marker) as f:
                path = _hold(f.read().strip(), must=True)
        elif cfg.resume == 'auto':
            path = _hold(newest_run_folder(base), must=True)
        elif cfg.resume and os.path.basename(os.path.dirname(os.path.abspath(cfg.resume))) == 'ckpt':
            path = _hold(os.path.dirname(os.path.dirname(os.path.abspath(cfg.resume))), must=True)  # EXP/ckpt/FILE
        else:  # a new run, or one resumed from a checkpoint file kept outside any experiment folder
            path = _hold(base, must=False) or _claim_new_folder(f'{base}_{datetime.now().strftime(RUN_STAMP)}')
        if restart_marker and elastic_restart_count() == 0:
            with open(restart_marker, 'w') as f:
                f.write(path)
    except OSError as e:
        raise _folder_error(cfg, getattr(e, 'filename', None) or base, e) from None
    return path


def _hold(path: str, must: bool) -> Optional[str]:
    """Create ``path`` if missing and lock it. A folder another process holds: ``ExperimentInUse`` if ``must``,
    else None, as for a folder that is already used (not empty) when not ``must`` (a new run's)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.mkdir(path)
        created = True
    except FileExistsError:
        created = False
    return _lock(path, created, must)


def _lock(path: str, created: bool, must: bool) -> Optional[str]:
    lock = open(os.path.join(path, LOCK_NAME), 'a+')
    try:
        holder = _flock(lock)
    except BaseException:
        lock.close()
        raise
    if holder is not None:
        lock.close()
        if not must:
            return None
        who = f'process {holder[0]} on {holder[1]}' if len(holder) >= 2 else 'another process'
        since = f' since {holder[2]}' if len(holder) >= 3 else ''
        raise ExperimentInUse(f'{path} is in use by {who}{since} (its lock: {os.path.join(path, LOCK_NAME)}); '
                              f'two runs writing one experiment would overwrite each other\'s checkpoints: wait '
                              f'for it to end or stop it, or start a new run with another --exp-name')
    if not must and not created and set(os.listdir(path)) - {LOCK_NAME}:
        _unlock(lock)  # a used folder: a new run does not write into it
        return None
    lock.seek(0)
    lock.truncate()
    lock.write(f'{os.getpid()} {socket.gethostname()} {datetime.now().isoformat(timespec="seconds")}\n')
    lock.flush()
    global _HELD
    _HELD = (path, lock, created)
    return path


def _flock(lock, wait_for_orphans: float = 15.0) -> Optional[list]:
    """Lock ``lock`` exclusively; None when locked, else the holder's ``[pid, host, start]`` as recorded.

    A run killed with SIGKILL can leave its data-loader workers alive for a few seconds, and they share its
    lock: a holder on this machine whose PID is gone is waited for (up to ``wait_for_orphans`` seconds)."""
    deadline = time.monotonic() + wait_for_orphans
    while True:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().split()
        orphaned = len(holder) >= 2 and holder[1] == socket.gethostname() and holder[0].isdigit() and \
            not pid_alive(int(holder[0]))
        if not orphaned or time.monotonic() > deadline:
            return holder
        time.sleep(0.5)


def _unlock(lock) -> None:
    # LOCK_UN before closing: forked children (data-loader workers) share the open file and would keep it locked
    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    lock.close()


def release_experiment_dir(remove: bool = False) -> None:
    """Give up this process's lock on its experiment folder. ``remove``: the run stopped before it trained
    (bad settings, a refused resume): a folder this process created is removed, so the next run gets its name
    rather than a ``_<date>_<time>`` one; a folder it found is left as it was."""
    global _HELD
    if _HELD is None:
        return
    path, lock, created = _HELD
    _HELD = None
    if remove and created:
        shutil.rmtree(path, ignore_errors=True)
    _unlock(lock)


def newest_run_folder(base: str) -> str:
    """What ``--resume auto`` continues: of ``base`` and the ``base_YYMMDD_HHMMSS[_N]`` folders that later runs
    of the same experiment got, the one whose newest checkpoint (a step checkpoint or ``ckpt_best``) was written
    last; ``base`` when none has a checkpoint (the run then starts from scratch there)."""
    stamped = re.compile(re.escape(os.path.basename(base)) + RUN_STAMP_PATTERN)
    candidates = [base] + [p for p in glob.glob(glob.escape(base) + '_*')
                           if stamped.fullmatch(os.path.basename(p)) and os.path.isdir(p)]
    newest, newest_time = base, None
    for folder in candidates:
        ckpt_dir = os.path.join(folder, 'ckpt')
        checkpoints = step_checkpoints(ckpt_dir) + [p for p in [os.path.join(ckpt_dir, BEST_NAME)] if os.path.isfile(p)]
        if checkpoints:
            written = max(os.path.getmtime(p) for p in checkpoints)
            if newest_time is None or written > newest_time:
                newest, newest_time = folder, written
    return newest


def _claim_new_folder(base: str) -> str:
    """Create ``base`` (or ``base_2``, ``base_3``, ... when a run started in the same second has it), lock it and
    return it: the creation is the claim, so two runs never share a folder."""
    candidate, n = base, 1
    while True:
        try:
            os.mkdir(candidate)
        except FileExistsError:
            n += 1
            candidate = f'{base}_{n}'
            continue
        return _lock(candidate, created=True, must=True)


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


def finite_or_none(payload: Any) -> Any:
    """``payload`` with NaN and infinities replaced by None (JSON's null), in nested dicts and lists too."""
    if isinstance(payload, float) and not math.isfinite(payload):
        return None
    if isinstance(payload, dict):
        return {key: finite_or_none(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [finite_or_none(value) for value in payload]
    return payload


def write_json(path: str, payload: Any) -> None:
    """Strict JSON (NaN and infinities written as null, which every parser reads), written atomically;
    a failed write raises ``DiskWriteError``."""
    text = json.dumps(finite_or_none(payload), indent=2, allow_nan=False)
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def set_deterministic(enabled: bool, cudnn_benchmark: bool = True) -> None:
    """Bit-exact repeatability (``deterministic``): deterministic kernels and no cuDNN autotuning. Otherwise cuDNN
    autotunes as ``policy.learn.cudnn_benchmark`` says (on a GPU; the flag does nothing on a CPU)."""
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark) and not enabled
