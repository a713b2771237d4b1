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
from typing import Any, Dict, List, Optional

import numpy as np
import torch

CHECKPOINT_FORMAT = 'dizoo_imgcls/1'
BEST_NAME = 'ckpt_best.pth.tar'
logger = logging.getLogger('dizoo_imgcls')
_STEP_NAME = re.compile(r'^(?:epoch_\d+_)?iter_(\d+)\.pth\.tar$')


class CheckpointError(Exception):
    """A checkpoint cannot be read or is not ours; the message names the file."""


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
    """Write to a temporary file in the same folder, flush + fsync, then rename over ``path``.

    A reader (or a restarted run) sees either the old complete file or the new complete file, never a
    partial one, even if the process is killed with SIGKILL in the middle of the write."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp-{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(folder)


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Load tensors and plain containers only: pickled code in the file is refused, never executed."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # UnpicklingError for unsafe content, RuntimeError/EOFError for damaged files
        # 'Unsupported global': a pickled reference to a Python callable or class; 'Unsupported operand': a
        # plain-pickle stream (not torch.save) whose opcodes the safe unpickler does not accept.
        if 'unsupported global' in str(e).lower() or 'unsupported operand' in str(e).lower():
            raise CheckpointError(
                f'refusing to load {path}: it holds pickled Python objects, not just tensors and plain data, '
                f'and loading it could run arbitrary code'
            ) from None
        raise CheckpointError(f'cannot read checkpoint {path}: {type(e).__name__}: {e}') from None


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
    """The newest step checkpoint that loads; damaged files are skipped (they cannot come from our own
    atomic writer, but a disk can still lose them)."""
    for path in reversed(step_checkpoints(ckpt_dir)):
        try:
            state = load_checkpoint(path)
        except CheckpointError:
            continue
        if state.get('format') == CHECKPOINT_FORMAT:
            return path
    return None


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
