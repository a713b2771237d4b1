"""The signals that stop a run: Ctrl-C (SIGINT) and SIGTERM, each remembered so that the training loop stops at
a point of its choosing, and the data-loader workers that leave a process group's SIGTERM to the run."""
import signal
import threading
from contextlib import contextmanager
from typing import Callable

import torch


@contextmanager
def interrupt_guard():
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered, as the callable this yields: Python
    drops an exception raised inside a destructor or callback ("Exception ignored in ..."), and a run that went
    on training after Ctrl-C would surprise its user; the loop checks after every batch."""
    # Signal handlers belong to the main thread; and a process started with Ctrl-C ignored (a background job of
    # a script, nohup) keeps ignoring it.
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        yield lambda: False
        return
    hits = []

    def on_sigint(signum, frame):
        hits.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


class Terminated(Exception):
    """SIGTERM stopped the run at ``checkpoint``, which it wrote (every rank agreed on the iteration first)."""

    def __init__(self, checkpoint: str, iteration: int, rank: int) -> None:
        super().__init__(f'terminated (SIGTERM) at iteration {iteration}; saved {checkpoint}')
        self.checkpoint, self.iteration, self.rank = checkpoint, iteration, rank


class StopAgreement:
    """Whether a SIGTERM (``terminated()``) asks the run to stop here. Alone, at once; under DDP only at sync
    points, which every rank reaches at the same batch, and then for all ranks together (any rank's SIGTERM stops
    all, through a tiny all-reduce: one per step would cost speed)."""

    def __init__(self, terminated: Callable[[], bool], world_size: int) -> None:
        self._terminated, self._world_size = terminated, world_size

    def __call__(self, sync_point: bool = True) -> bool:
        if self._world_size == 1:
            return self._terminated()
        if not sync_point:
            return False
        device = 'cuda' if torch.distributed.get_backend() == 'nccl' else 'cpu'
        flag = torch.tensor([1 if self._terminated() else 0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


@contextmanager
def termination_guard():
    """SIGTERM (what Slurm, Kubernetes and torchrun send before they kill) is remembered, as the callable this
    yields, instead of ending the process at once: the loop finishes the running step, writes a checkpoint and
    raises ``Terminated``. The data-loader workers ignore a first SIGTERM (``worker_leaves_sigterm_to_the_run``),
    so one sent to the whole process group (Slurm) leaves them serving until the main process stops them."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        yield lambda: False
        return
    hits = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: hits.append(signum))
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def worker_leaves_sigterm_to_the_run(previous, worker_id: int) -> None:
    """``worker_init_fn`` of the run's data loaders: a SIGTERM sent to the whole process group (Slurm) would kill
    the workers mid-batch (PyTorch's handler), and the run would then fail wherever it is ('DataLoader worker ...
    killed by signal'), not finish its step and save. A worker ignores the first SIGTERM (the main process stops
    it when it ends); a second one, e.g. from multiprocessing's clean-up at exit, ends it as before."""
    signal.signal(signal.SIGTERM, _second_sigterm_ends_the_worker)
    if previous is not None:
        previous(worker_id)


def _second_sigterm_ends_the_worker(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
