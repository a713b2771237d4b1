"""Training-recipe pieces the policy composes: Mixup/CutMix on a batch and an EMA of the weights (test-time
augmentation is inference's: ``dizoo_imgcls/inference.py``)."""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel
from torchvision.transforms import v2

from ..errors import SettingError


class BatchMixer:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) on a whole batch, from torchvision's
    ``transforms.v2``: with probability ``prob`` a batch is mixed, by CutMix with probability ``switch_prob``
    and by Mixup otherwise (an alpha of 0 removes that kind). Targets become class-probability rows that sum
    to one. Randomness comes from torch's global RNG (seeded by the run, saved in checkpoints)."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, stop_epoch: Optional[int] = None) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= prob <= 1 or not 0 <= switch_prob <= 1:
            raise SettingError('policy.learn.mix needs alphas >= 0 and prob, switch_prob in [0, 1], got '
                               f'mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}, prob={prob}, '
                               f'switch_prob={switch_prob}')
        self.num_classes = num_classes
        self.prob = prob
        self.stop_epoch = stop_epoch
        choices: List[Tuple[object, float]] = []
        if mixup_alpha > 0:
            choices.append((v2.MixUp(alpha=mixup_alpha, num_classes=num_classes), 1 - switch_prob))
        if cutmix_alpha > 0:
            choices.append((v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes), switch_prob))
        choices = [(t, p) for t, p in choices if p > 0] or choices[:1]
        self.transforms = [t for t, _ in choices]
        self.weights = torch.tensor([p for _, p in choices], dtype=torch.float) if choices else None

    @property
    def enabled(self) -> bool:
        return bool(self.transforms) and self.prob > 0

    def active(self, epoch: int) -> bool:
        """Whether batches of ``epoch`` (counted from 1) are mixed at all."""
        return self.enabled and (self.stop_epoch is None or epoch <= self.stop_epoch)

    def __call__(self, images: torch.Tensor, target: torch.Tensor, epoch: int):
        """(images, targets): float images and probability targets when mixed, else unchanged."""
        if not self.active(epoch) or torch.rand(()).item() >= self.prob:
            return images, target
        choice = int(torch.multinomial(self.weights, 1)) if len(self.transforms) > 1 else 0
        return self.transforms[choice](images.float(), target)


class ExponentialMovingAverage(AveragedModel):
    """EMA of parameters and buffers (BN statistics too) with timm's warm-up: update n uses the decay
    min(decay, (1 + n) / (10 + n)), so early averages are not dominated by the random initialization."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise SettingError(f'policy.learn.ema.decay must be in (0, 1), got {decay}')
        self.decay = decay
        super().__init__(model, multi_avg_fn=self._lerp, use_buffers=True)

    def current_decay(self, num_updates: int) -> float:
        return min(self.decay, (1.0 + num_updates) / (10.0 + num_updates))

    def _lerp(self, averaged: List[torch.Tensor], current: List[torch.Tensor], num_averaged) -> None:
        weight = 1.0 - self.current_decay(int(num_averaged))
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], weight)
        for a, c in zip(averaged, current):  # integer buffers (BN's num_batches_tracked) are copied
            if not a.is_floating_point():
                a.copy_(c)


def soft_target_accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Training top-1 against the hard label, or the largest share of a mixed (probability) target."""
    hard = target.argmax(dim=1) if target.dim() == 2 else target
    return (logits.argmax(dim=1) == hard).float().mean()

