"""A training run's progress, the part of a checkpoint that is neither weights nor generator states."""
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional


@dataclass
class RunState:
    """Epochs completed, batches done in the running epoch, the best evaluation (by ``policy.eval.metric_key``)
    and its epoch, one history entry per evaluated epoch, and the wall seconds of the earlier parts of a resumed
    run. Stored in checkpoints as ``position``, ``best``, ``history`` and ``clock.wall_seconds``."""

    epoch: int = 0
    batch: int = 0
    best: Optional[Dict[str, Any]] = None
    best_epoch: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    carried_wall: float = 0.0
    started: float = field(default_factory=time.time)

    def wall_seconds(self) -> float:
        """Seconds this run has taken: this process so far plus the resumed parts', each up to its checkpoint."""
        return self.carried_wall + time.time() - self.started

    def record_eval(self, epoch: int, metrics: Dict[str, Any], better: Callable[[Dict, Any], bool]) -> None:
        """Add an evaluation to the history; it becomes the best when ``better(metrics, best)``."""
        if better(metrics, self.best):
            self.best, self.best_epoch = dict(metrics), epoch
        self.history.append({'epoch': epoch, **metrics})

    def state_dict(self) -> Dict[str, Any]:
        return {'position': {'epoch': self.epoch, 'batch': self.batch},
                'best': {'metric': self.best, 'epoch': self.best_epoch},
                'history': list(self.history)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch, self.batch = state['position']['epoch'], state['position']['batch']
        self.best, self.best_epoch = state['best']['metric'], state['best']['epoch']
        self.history = list(state['history'])
        # checkpoints written before the clock was recorded: this process only
        self.carried_wall = (state.get('clock') or {}).get('wall_seconds', 0.0)
