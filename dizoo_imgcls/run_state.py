"""A training run's progress, the part of a checkpoint that is neither weights nor generator states."""
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional


@dataclass
class RunState:
    """Epochs completed, batches done in the running epoch, the best evaluation (by ``policy.eval.metric_key``)
    and its epoch, one history entry per evaluated epoch, and the run's clock: images trained, seconds spent
    training and waiting for data in it, and wall seconds, each over all parts of a resumed run. Stored in
    checkpoints as ``position``, ``best``, ``history`` and ``clock``."""

    epoch: int = 0
    batch: int = 0
    best: Optional[Dict[str, Any]] = None
    best_epoch: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    train_images: int = 0
    train_seconds: float = 0.0
    data_wait_seconds: float = 0.0
    carried_wall: float = 0.0  # the earlier parts' wall seconds, each up to its checkpoint
    started: float = field(default_factory=time.time)

    def wall_seconds(self) -> float:
        """Seconds this run has taken: this process so far plus the resumed parts', each up to its checkpoint."""
        return self.carried_wall + time.time() - self.started

    def add_training(self, images: int, seconds: float, data_wait: float) -> None:
        """Count one training step: its images (over all ranks), its wall seconds and the part spent waiting for
        data."""
        self.train_images += images
        self.train_seconds += seconds
        self.data_wait_seconds += data_wait

    @property
    def img_per_sec(self) -> float:
        """Training images per second over the whole run (resumed parts included)."""
        return self.train_images / self.train_seconds if self.train_seconds else 0.0

    @property
    def data_wait_share(self) -> float:
        """Share of the training wall time spent waiting for data, over the whole run."""
        return self.data_wait_seconds / self.train_seconds if self.train_seconds else 0.0

    def record_eval(self, epoch: int, metrics: Dict[str, Any], better: Callable[[Dict, Any], bool]) -> None:
        """Add an evaluation to the history; it becomes the best when ``better(metrics, best)``."""
        if better(metrics, self.best):
            self.best, self.best_epoch = dict(metrics), epoch
        self.history.append({'epoch': epoch, **metrics})

    def state_dict(self) -> Dict[str, Any]:
        return {'position': {'epoch': self.epoch, 'batch': self.batch},
                'best': {'metric': self.best, 'epoch': self.best_epoch},
                'history': list(self.history),
                'clock': {'train_images': self.train_images, 'train_seconds': self.train_seconds,
                          'data_wait_seconds': self.data_wait_seconds, 'wall_seconds': self.wall_seconds()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch, self.batch = state['position']['epoch'], state['position']['batch']
        self.best, self.best_epoch = state['best']['metric'], state['best']['epoch']
        self.history = list(state['history'])
        clock = state.get('clock') or {}  # checkpoints written before the clock was recorded: this process only
        self.train_images = clock.get('train_images', 0)
        self.train_seconds = clock.get('train_seconds', 0.0)
        self.data_wait_seconds = clock.get('data_wait_seconds', 0.0)
        self.carried_wall = clock.get('wall_seconds', 0.0)
