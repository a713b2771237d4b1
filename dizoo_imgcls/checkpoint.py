"""Checkpoints: one dict per file, written atomically, read with ``torch.load(weights_only=True)`` only.

Layout (``CHECKPOINT_FORMAT``)::

    format        'dizoo_imgcls/1'
    policy        ImageClassificationPolicy learn state: model, optimizer, lr_scheduler, [grad_scaler], epoch, iteration
    last_iter     DI-engine learner iteration counter (files: iter_N.pth.tar, epoch_E_iter_N.pth.tar, ckpt_best.pth.tar)
    position      {'epoch': epochs completed, 'batch': batches done in the running epoch}
    rng           {'torch', 'numpy', 'python'} generator states (rank 0's)
    rng_per_rank  [rng of rank 0, rank 1, ...] under DDP, else None
    best          {'metric': {...} or None, 'epoch': int}
    history       [{'epoch', 'acc1', 'acc5', 'loss'}, ...] one entry per evaluated epoch
    config        the compiled config as plain dicts
    class_names   folder names in class-index order; display_names: human-readable names or None
"""
import glob
import logging
import os
import random
import re
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .errors import UserError
from .model import InputNormalize, build_model_from_cfg

CHECKPOINT_FORMAT = 'dizoo_imgcls/1'
BEST_NAME = 'ckpt_best.pth.tar'
logger = logging.getLogger('dizoo_imgcls')
_STEP_NAME = re.compile(r'^(?:epoch_\d+_)?iter_(\d+)\.pth\.tar$')


class CheckpointError(UserError):
    """A checkpoint cannot be read or is not ours; the message names the file."""


class DiskWriteError(UserError):
    """Writing one of the run's files failed for a reason outside the program (a full disk, a quota, a read-only
    or vanished file system); the message names the file, the reason and the free space left."""

    exit_code = 74  # EX_IOERR of sysexits.h

    def __init__(self, path: str, error: OSError) -> None:
        super().__init__(f'cannot write {path}: {error.strerror or error} ({free_space(path)} free there)')
        self.path, self.errno = path, error.errno


def free_space(path: str) -> str:
    """Free space of the file system holding ``path`` (or its nearest existing parent), e.g. '1.2 MiB'."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        free = float(shutil.disk_usage(folder).free)
    except OSError:
        return 'unknown space'
    for unit in ('bytes', 'KiB', 'MiB', 'GiB'):
        if free < 1024 or unit == 'GiB':
            return f'{free:.0f} {unit}' if unit == 'bytes' else f'{free:.1f} {unit}'
        free /= 1024
    return ''


def os_error_in(error: BaseException) -> Optional[OSError]:
    """The OSError (with an errno) behind ``error``, itself or along its chain: torch.save reports a failed write
    as a RuntimeError ('unexpected pos') whose context is the OSError (ENOSPC, EDQUOT, EROFS, ...)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def temp_path(path: str) -> str:
    """Where the atomic writers put ``path``'s content before the rename: ``.NAME.tmp-PID`` beside it (the PID
    tells a later run whether the writer is still alive: ``sweep_stale_temp_files``)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), f'.{os.path.basename(path)}.tmp-{os.getpid()}')


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:  # already gone; or it cannot be removed now, and a later run's sweep removes it
        pass


def atomic_write(path: str, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, flush + fsync, rename over ``path``.

    A reader (or a restarted run) sees either the old complete file or the new complete file, never a partial
    one, even if the process is killed with SIGKILL in the middle of the write. A write that fails (full disk,
    quota, read-only file system) removes its temporary file and raises ``DiskWriteError``; ``path`` is left as
    it was."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temp_path(path)
    try:
        os.makedirs(folder, exist_ok=True)
        try:
            with open(tmp, 'wb') as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                _remove_quietly(tmp)
        _fsync_dir(folder)
    except Exception as e:  # only failures of the file system; anything else (a bug) keeps its traceback
        cause = os_error_in(e)
        if cause is None:
            raise
        raise DiskWriteError(path, cause) from None


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message (load_state_dict's spans many lines) as one line of at most ``limit`` chars."""
    text = ' '.join(str(error.args[0] if error.args else type(error).__name__).split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` through ``atomic_write``: the old complete file or the new one, never a partial one."""
    atomic_write(path, lambda f: torch.save(obj, f))


_TEMP_NAME = re.compile(r'^\..+\.tmp-(\d+)$')


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def sweep_stale_temp_files(*folders: str) -> List[str]:
    """Remove the ``.NAME.tmp-PID`` files that writers killed mid-write (SIGKILL, a lost node) left in
    ``folders``, only those whose PID no longer runs; returns the removed paths."""
    removed = []
    for folder in folders:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            match = _TEMP_NAME.match(name)
            if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
                path = os.path.join(folder, name)
                try:
                    os.remove(path)
                except OSError:
                    continue
                removed.append(path)
    return removed


def _describe_start(head: bytes) -> str:
    """What the first bytes of a file that is no checkpoint look like, for the error message."""
    try:
        text = head.decode('utf-8')
    except UnicodeDecodeError:
        return f'it starts with the bytes {head[:8].hex(" ")}'
    if text.lstrip()[:1] in ('{', '['):
        return 'it looks like a JSON file'
    return f'it starts with the text {text[:16]!r}'


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Load tensors and plain containers only: pickled code in the file is refused, never executed.

    The error says what the file is: empty; not a checkpoint at all (neither the zip archive ``torch.save``
    writes nor a pickle); a damaged or truncated one; or one holding pickled Python objects (the refusal that
    protects against checkpoints that would run code)."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        size = os.path.getsize(path)
        with open(path, 'rb') as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f'cannot read checkpoint {path}: {e.strerror or e}') from None
    if size == 0:
        raise CheckpointError(f'{path} is empty (0 bytes): not a checkpoint (a copy or download that never '
                              f'finished?)')
    is_zip, is_pickle = head.startswith(b'PK\x03\x04'), head[:1] == b'\x80'  # torch.save / legacy and plain pickle
    if not (is_zip or is_pickle):
        raise CheckpointError(f'{path} is not a checkpoint: neither the zip archive torch.save writes nor a '
                              f'pickle ({_describe_start(head)}; {size} bytes)')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # UnpicklingError for unsafe content, RuntimeError/EOFError for damaged files
        # 'Unsupported global': a pickled reference to a Python callable or class; 'Unsupported operand': a
        # plain-pickle stream (not torch.save) whose opcodes the safe unpickler does not accept.
        message = str(e).lower()
        if 'unsupported global' in message or (is_pickle and 'unsupported operand' in message):
            raise CheckpointError(
                f'refusing to load {path}: it holds pickled Python objects, not just tensors and plain data, '
                f'and loading it could run arbitrary code'
            ) from None
        reason = one_line(e, 200).split('. ')[0]  # torch's first sentence; the rest is advice on other cases
        raise CheckpointError(f'cannot read checkpoint {path}: it is damaged or truncated ({size} bytes; '
                              f'{type(e).__name__}: {reason})') from None


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        'torch': torch.get_rng_state(),
        'numpy': {
            'key': torch.from_numpy(np_state['state']['key'].astype(np.int64)),
            'pos': int(np_state['state']['pos']),
            'has_gauss': int(np_state['has_gauss']),
            'gauss': float(np_state['gauss']),
        },
        'python': random.getstate(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    np_state = state['numpy']
    np.random.set_state({
        'bit_generator': 'MT19937',
        'state': {'key': np_state['key'].numpy().astype(np.uint32), 'pos': np_state['pos']},
        'has_gauss': np_state['has_gauss'],
        'gauss': np_state['gauss'],
    })
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))


def to_plain(obj: Any) -> Any:
    """EasyDicts and tuples to plain dicts and lists, so the config loads under weights_only=True."""
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def step_checkpoint_name(iteration: int, epoch_end: Optional[int] = None) -> str:
    """``iter_N.pth.tar`` inside an epoch, ``epoch_E_iter_N.pth.tar`` at the end of epoch E."""
    prefix = f'epoch_{epoch_end}_' if epoch_end is not None else ''
    return f'{prefix}iter_{iteration}.pth.tar'


def step_checkpoints(ckpt_dir: str) -> List[str]:
    """Step checkpoints of a folder, oldest first (by the iteration in the name)."""
    found = []
    for path in glob.glob(os.path.join(ckpt_dir, '*.pth.tar')):
        match = _STEP_NAME.match(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), os.path.getmtime(path), path))
    return [p for _, _, p in sorted(found)]


def prune_checkpoints(ckpt_dir: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints; the best checkpoint is never touched."""
    if keep_last <= 0:
        return
    for path in step_checkpoints(ckpt_dir)[:-keep_last]:
        os.remove(path)


def set_aside_later_checkpoints(ckpt_dir: str, iteration: int) -> Optional[str]:
    """A run resumed from iteration ``iteration`` of its history: the step checkpoints past it (and a
    ``ckpt_best`` past it) belong to the trajectory it leaves. They are moved, not deleted, into
    ``ckpt_dir/superseded_at_iter_N/``: left in place they would outrank the resumed run's new checkpoints, which
    pruning would then delete, and ``--resume auto`` would go back to them. Returns that folder, if used."""
    later = [p for p in step_checkpoints(ckpt_dir) if int(_STEP_NAME.match(os.path.basename(p)).group(1)) > iteration]
    best = os.path.join(ckpt_dir, BEST_NAME)
    if os.path.isfile(best):
        try:
            if load_checkpoint(best).get('last_iter', 0) > iteration:
                later.append(best)
        except CheckpointError:
            pass  # a damaged best checkpoint stays where it is
    if not later:
        return None
    folder = os.path.join(ckpt_dir, f'superseded_at_iter_{iteration}')
    os.makedirs(folder, exist_ok=True)
    for path in later:
        os.replace(path, os.path.join(folder, os.path.basename(path)))
    logger.info(f'resumed at iteration {iteration}: moved {len(later)} later checkpoint(s) of the previous run to '
             f'{folder}')
    return folder


def latest_checkpoint(ckpt_dir: str) -> Optional[str]:
    """The newest step checkpoint that loads (``ckpt_best`` is not one); damaged files are skipped (they cannot
    come from our own atomic writer, but a disk can still lose them)."""
    for path in reversed(step_checkpoints(ckpt_dir)):
        try:
            state = load_checkpoint(path)
        except CheckpointError:
            continue
        if state.get('format') == CHECKPOINT_FORMAT:
            return path
    return None


def resumable_checkpoint(ckpt_dir: str) -> Tuple[Optional[str], Optional[Dict[str, Any]], List[str]]:
    """What ``--resume auto`` continues from: ``(path, state, skipped)``, the newest complete and loadable of all
    the folder's checkpoints, ``ckpt_best`` included (a kill between writing it and the epoch's checkpoint leaves
    it the newest). Newest by training iteration; at equal iterations a step checkpoint. ``skipped`` says which
    newer files were passed over and why (damaged, not ours)."""
    candidates, skipped, loaded = [], [], {}
    for path in step_checkpoints(ckpt_dir):
        candidates.append((int(_STEP_NAME.match(os.path.basename(path)).group(1)), 1, path))
    best = os.path.join(ckpt_dir, BEST_NAME)
    if os.path.isfile(best):  # its iteration is inside it
        try:
            loaded[best] = load_checkpoint(best)
        except CheckpointError as e:  # of unknown age: named whichever checkpoint is chosen
            skipped.append(f'{best} ({e})')
        else:
            candidates.append((loaded[best].get('last_iter', 0) if isinstance(loaded[best], dict) else 0, 0, best))
    for _, _, path in sorted(candidates, reverse=True):
        try:
            state = loaded[path] if path in loaded else load_checkpoint(path)
        except CheckpointError as e:
            skipped.append(f'{path} ({e})')
            continue
        if not isinstance(state, dict) or state.get('format') != CHECKPOINT_FORMAT:
            skipped.append(f'{path} (not a dizoo_imgcls checkpoint)')
            continue
        return path, state, skipped
    return None, None, skipped


class CheckpointManager:
    """The one writer and finder of a run's checkpoints in ``ckpt_dir``. Every rank calls ``save`` at the same
    point of the run: it gathers every rank's generator states (a collective; each rank draws its own
    augmentation stream, and all are needed to resume exactly), then rank 0 writes the state atomically and
    keeps the newest ``keep_last`` step checkpoints. ``ckpt_best`` is written the same way and never pruned.
    ``find`` is what ``--resume`` continues from; ``restore_rng`` puts this rank's generators back."""

    def __init__(self, ckpt_dir: str, keep_last: int, rank: int = 0, world_size: int = 1) -> None:
        self.dir, self.keep_last, self.rank, self.world_size = ckpt_dir, keep_last, rank, world_size

    def save(self, name: str, state_fn: Callable[[], Dict[str, Any]]) -> str:
        """Write ``state_fn()`` plus the generator states as ``name`` (rank 0); returns the path."""
        rng, rngs = rng_state(), None
        if self.world_size > 1:
            rngs = [None] * self.world_size
            torch.distributed.all_gather_object(rngs, rng)
        path = os.path.join(self.dir, name)
        if self.rank == 0:
            atomic_torch_save({**state_fn(), 'rng': rng, 'rng_per_rank': rngs}, path)
            if name != BEST_NAME:
                prune_checkpoints(self.dir, self.keep_last)
        return path

    def find(self, resume: str) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
        """``(path, state)`` of the checkpoint ``resume`` names; for ``'auto'`` the newest complete one (naming
        those skipped), or ``(None, None)`` when the folder has none yet."""
        if resume != 'auto':
            return resume, load_checkpoint(resume)
        path, state, skipped = resumable_checkpoint(self.dir)
        for reason in skipped:
            logger.warning(f'--resume auto: skipped {reason}')
        if path is None:
            logger.info(f'--resume auto: no {"loadable " if skipped else ""}checkpoint in {self.dir} yet, starting '
                        f'from scratch')
        return path, state

    def restore_rng(self, state: Dict[str, Any]) -> None:
        per_rank = state.get('rng_per_rank')
        set_rng_state(per_rank[self.rank] if per_rank and len(per_rank) == self.world_size else state['rng'])

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)


def model_state_from_file(path: str) -> Dict[str, torch.Tensor]:
    """Model weights from one of our checkpoints or from a plain (torchvision-style) state dict file."""
    state = load_checkpoint(path)
    if isinstance(state, dict) and state.get('format') == CHECKPOINT_FORMAT:
        return state['policy']['model']
    if isinstance(state, dict) and isinstance(state.get('model'), dict):  # DI-engine / torchvision references
        state = state['model']
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f'{path} is neither a dizoo_imgcls checkpoint nor a state dict of tensors')
    return state


# ----- the model bundle of a checkpoint: weights, config, class names (predict, evaluate, export, label issues) -----
def require_key(tree: Dict[str, Any], dotted: str, path: str) -> Any:
    """``tree``'s value at the ``dotted`` key of a checkpoint read from ``path``; its absence is a CheckpointError."""
    from .config import get_dotted  # config imports this module

    try:
        return get_dotted(tree, dotted)
    except KeyError:
        raise CheckpointError(f"{path} has no '{dotted}' (expected a {CHECKPOINT_FORMAT} checkpoint)") from None


def checkpoint_class_names(state: Dict[str, Any], path: str) -> List[str]:
    """Human-readable names in class-index order: ``display_names`` when stored, else the folder names."""
    names = state.get('display_names')
    names = require_key(state, 'class_names', path) if names is None else names
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f'{path}: class names must be a list of strings, got {type(names).__name__}')
    return list(names)


WEIGHTS = ('model', 'ema')


def stored_weights(state: Dict[str, Any], path: str, weights: str = 'model') -> Dict[str, torch.Tensor]:
    """The trained weights (``model``), or their exponential moving average (``ema``, when the run kept one
    with ``policy.learn.ema.enabled``) as a plain model state dict."""
    if weights not in WEIGHTS:
        raise CheckpointError(f'weights must be one of {WEIGHTS}, got {weights!r}')
    if weights == 'model':
        return require_key(state, 'policy.model', path)
    ema = state.get('policy', {}).get('ema') if isinstance(state.get('policy'), dict) else None
    if ema is None:
        raise CheckpointError(f'{path} holds no EMA weights (the run did not set policy.learn.ema.enabled=True); '
                              'use the model weights')
    # torch.optim.swa_utils.AveragedModel keys: module.<name>, plus its update counter n_averaged
    return {k[len('module.'):]: v for k, v in ema.items() if k.startswith('module.')}


def load_model_from_checkpoint(path: str, weights: str = 'model') -> Tuple[nn.Module, Dict[str, Any], List[str]]:
    """``(model in eval mode on CPU, compiled config, class names)`` from one of our checkpoints of an image
    classifier; ``weights`` 'ema' takes the weight average instead of the trained weights.

    Every problem (missing file, pickled code, another format, weights that do not fit the stored model
    config) raises ``CheckpointError`` with a one-line message that names ``path``."""
    model, config, class_names = rebuild_checkpoint_model(path, weights)
    if not any(isinstance(m, InputNormalize) for m in model.modules()):
        raise CheckpointError(f"{path}: model {config['policy']['model'].get('name')!r} does not take images (it "
                              f'has no InputNormalize input layer); only image classifiers can predict or export')
    return model.eval(), config, class_names


def rebuild_checkpoint_model(path: str, weights: str = 'model',
                             state: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any], List[str]]:
    """``(model on CPU, compiled config, class names)`` of any of our checkpoints, every part checked (see
    ``load_model_from_checkpoint``); ``state``: the file's content when already loaded."""
    state = load_checkpoint(path) if state is None else state
    if not isinstance(state, dict) or state.get('format') != CHECKPOINT_FORMAT:
        found = state.get('format') if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f'{path} is not a dizoo_imgcls checkpoint (format {found!r}, '
                              f'expected {CHECKPOINT_FORMAT!r})')
    config = require_key(state, 'config', path)
    model_cfg = require_key(config, 'policy.model', path)
    for key in ('data.image_size', 'data.eval_crop_ratio', 'data.jpeg_draft', 'data.decoder'):  # EvalReader
        require_key(config, key, path)
    state_dict = stored_weights(state, path, weights)
    class_names = checkpoint_class_names(state, path)
    num_classes = model_cfg.get('num_classes')
    if not isinstance(num_classes, int) or num_classes < len(class_names):
        raise CheckpointError(f"{path}: policy.model.num_classes is {num_classes!r} but "
                              f'{len(class_names)} class names are stored')
    # A run may train a head larger than its folder's classes (policy.model.num_classes set by hand): its
    # extra outputs were never a target, and get a name that says so.
    class_names = class_names + [f'(unused output {i})' for i in range(len(class_names), num_classes)]
    try:
        model = build_model_from_cfg(dict(model_cfg, pretrained=None))  # the weights are the checkpoint's
        model.load_state_dict(state_dict)
    except (KeyError, ValueError, RuntimeError) as e:  # unknown model name, bad kwargs, mismatched weights
        raise CheckpointError(f"{path}: cannot rebuild model {model_cfg.get('name')!r} from the stored config "
                              f'and weights: {one_line(e)}') from None
    return model, config, class_names
