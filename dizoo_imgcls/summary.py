"""What a run reports about itself: peak memory, package versions, git commit (and whether the work tree
had changes) and a hash of its config."""
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any, Dict, Optional

import torch

from .checkpoint import to_plain

logger = logging.getLogger('dizoo_imgcls')

# Distributions whose versions decide what a run computes; reported as installed (None when missing).
VERSIONED_PACKAGES = ('torch', 'torchvision', 'DI-engine', 'dizoo_imgcls')


def peak_rss_mb() -> Optional[float]:
    """Peak resident memory of this process in MiB (loader workers are separate processes), or None."""
    try:
        import resource
    except ImportError:  # Windows: psutil's peak working set, when psutil is installed
        try:
            import psutil
        except ImportError:
            return None
        return getattr(psutil.Process().memory_info(), 'peak_wset', 0) / 2 ** 20 or None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == 'darwin' else peak / 2 ** 10  # bytes on macOS, KiB on Linux


def cuda_max_allocated_mb() -> Optional[float]:
    """Peak CUDA memory held by tensors on the current device in MiB; None when CUDA was never used."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.max_memory_allocated() / 2 ** 20


def package_versions() -> Dict[str, Optional[str]]:
    versions = {'python': platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(folder: str, *args: str) -> Optional[str]:
    """stdout of a git command in ``folder``, or None when git is missing, fails or hangs."""
    try:
        result = subprocess.run(['git', '-C', folder, *args], capture_output=True, text=True, timeout=5,
                                check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout


def git_commit(path: Optional[str] = None) -> Optional[str]:
    """The commit checked out in the git work tree holding ``path`` (default: this package), or None when
    there is none, git is not installed, or git does not answer within a few seconds."""
    out = _git(path or os.path.dirname(os.path.abspath(__file__)), 'rev-parse', 'HEAD')
    return (out or '').strip() or None


def git_dirty(path: Optional[str] = None) -> Optional[bool]:
    """Whether tracked files of that work tree differ from the commit (the run's code is not exactly the
    commit's); None when there is no work tree or git does not answer."""
    out = _git(path or os.path.dirname(os.path.abspath(__file__)), 'status', '--porcelain', '--untracked-files=no')
    return None if out is None else bool(out.strip())


def config_sha256(cfg: Dict[str, Any]) -> str:
    """sha256 of the config's canonical JSON (sorted keys, no whitespace): equal configs, equal hashes."""
    text = json.dumps(to_plain(cfg), sort_keys=True, separators=(',', ':'), default=repr)
    return hashlib.sha256(text.encode('utf-8')).hexdigest()


def _rounded(value: Optional[float], digits: int = 1) -> Optional[float]:
    return None if value is None else round(value, digits)


def run_summary(cfg: Dict[str, Any], state, metrics: Dict[str, Any], exp_dir: str, world_size: int,
                num_classes: int) -> Dict[str, Any]:
    """``summary.json`` of a run: the final evaluation's ``metrics``, the best one (``state``, a ``RunState``),
    the run's clock, resources and provenance."""
    return {
        'acc1': metrics.get('acc1'),
        'acc5': metrics.get('acc5'),
        'loss': metrics.get('loss'),
        # Test-time augmentation and the weight average (None when off), on the same final eval pass.
        'acc1_tta': metrics.get('acc1_tta'),
        'acc1_ema': metrics.get('acc1_ema'),
        'acc1_ema_tta': metrics.get('acc1_ema_tta'),
        # acc1 of the best evaluation by policy.eval.metric_key (ckpt_best's); all its metrics: best_metrics.
        'best_acc1': state.best['acc1'] if state.best else None,
        'best_epoch': state.best_epoch,
        'eval_samples': metrics.get('samples'),
        'epochs': state.epoch,
        'wall_seconds': round(state.wall_seconds(), 2),  # resumed runs: all parts, each to its checkpoint
        'train_images': state.train_images,
        'train_img_per_sec': round(state.img_per_sec, 2),
        'world_size': world_size,
        'num_classes': num_classes,
        'model': cfg['policy']['model']['name'],
        'exp_dir': exp_dir,
        **run_facts(cfg, state.best, state.data_wait_share),
    }


def log_done(summary: Dict[str, Any], best: Optional[Dict[str, Any]], metric_key: str) -> None:
    """The run's last console lines: its result, its folder, the TensorBoard command."""
    if summary['acc1'] is not None:
        by_key = f'{metric_key} {best[metric_key]:.4g}, acc1 ' if metric_key != 'acc1' else ''
        logger.info(f"done in {summary['wall_seconds']:.0f}s: acc1 {summary['acc1']:.2f} (best: {by_key}"
                    f"{summary['best_acc1']:.2f} at epoch {summary['best_epoch']}), "
                    f"{summary['train_img_per_sec']:.1f} train img/s")
    logger.info(f"experiment folder: {summary['exp_dir']}")
    logger.info(f'TensorBoard: tensorboard --logdir {os.path.join(summary["exp_dir"], "tb")}')


def run_facts(cfg: Dict[str, Any], best: Optional[Dict[str, Any]], train_data_wait_share: float) -> Dict[str, Any]:
    """The ``summary.json`` entries beyond the final metrics: best metrics, resources, provenance."""
    return {
        'best_metrics': dict(best) if best else None,
        'metric_key': cfg['policy']['eval']['metric_key'],
        'train_data_wait_share': round(train_data_wait_share, 4),
        'peak_rss_mb': _rounded(peak_rss_mb()),
        'cuda_max_allocated_mb': _rounded(cuda_max_allocated_mb()),
        'versions': package_versions(),
        'git_commit': git_commit(),
        'git_dirty': git_dirty(),
        'config_sha256': config_sha256(cfg),
    }
