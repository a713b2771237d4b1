"""The one way a model is run on images outside its training step: training's evaluations (the policy's eval
mode), ``--eval-only``, ``predict.py`` and label issues all go through ``InferenceRunner``."""
from contextlib import nullcontext
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import SettingError


def tta_views(images: torch.Tensor, flip: bool, scales: Sequence[float]) -> List[torch.Tensor]:
    """The batch as the model sees it under TTA: itself, its mirror image, and each rescaled copy
    (antialiased bilinear, the side rounded to a multiple of 8 px). Only image batches (N x C x H x W) have
    views: TTA on other inputs (the overfit check's coordinates) is refused, not silently meaningless."""
    if (flip or scales) and images.dim() != 4:
        raise SettingError(f'policy.eval.tta (flip / scales) needs image batches (N x C x H x W), got inputs of '
                           f'shape {tuple(images.shape)}; turn test-time augmentation off for this data')
    views = [images]
    if flip:
        views.append(images.flip(-1))
    for scale in scales:
        side = max(8, int(round(images.shape[-1] * scale / 8)) * 8)
        resized = F.interpolate(images.float(), size=(side, side), mode='bilinear', antialias=scale < 1,
                                align_corners=False)
        views.append(resized.contiguous(memory_format=torch.channels_last)
                     if images.is_contiguous(memory_format=torch.channels_last) else resized)
    return views


def average_probabilities(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Log of the mean softmax over views: argmax is the TTA prediction and cross-entropy on it is the
    loss of the averaged probabilities."""
    probs = torch.stack([torch.softmax(x.float(), dim=1) for x in logits]).mean(dim=0)
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def eval_outputs(models: Dict[str, nn.Module], images: torch.Tensor, flip: bool,
                 scales: Sequence[float]) -> Dict[str, torch.Tensor]:
    """``{'logit': ..., 'logit_tta': ..., 'logit_ema': ..., 'logit_ema_tta': ...}`` for each model (key '' is
    the trained model, 'ema' its average) and, when TTA is on, its TTA prediction."""
    views = tta_views(images, flip, scales) if (flip or scales) else [images]
    out = {}
    for name, model in models.items():
        logits = [model(view).float() for view in views]
        prefix = f'logit_{name}' if name else 'logit'
        out[prefix] = logits[0]
        if len(views) > 1:
            out[f'{prefix}_tta'] = average_probabilities(logits)
    return out


class InferenceRunner:
    """Logits of uint8 NCHW image batches (the models normalize their inputs), computed on ``device`` under
    autocast to ``amp_dtype`` (None: float32), in channels-last memory when asked, with test-time augmentation
    (``tta_flip``, ``tta_scales``) when it is on; returned as float32 on the CPU.

    ``models``: one model, or ``{'': trained model, 'ema': its weight average}``; the outputs are ``logit`` and,
    per further model, ``logit_<name>``, each with a ``_tta`` twin when TTA is on (see ``eval_outputs``).
    """

    def __init__(self, models: Union[nn.Module, Dict[str, nn.Module]], device: Union[str, torch.device] = 'cpu',
                 amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False, tta_flip: bool = False,
                 tta_scales: Sequence[float] = ()) -> None:
        self.models = {'': models} if isinstance(models, nn.Module) else dict(models)
        self.device = torch.device(device)
        self.amp_dtype, self.channels_last = amp_dtype, channels_last
        self.tta_flip, self.tta_scales = tta_flip, list(tta_scales or [])

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` on the runner's device, channels-last when asked (image batches only)."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, tta: bool = True) -> Dict[str, torch.Tensor]:
        """The logits of every model (and their TTA variants unless ``tta`` is False), float32 on the CPU."""
        for model in self.models.values():
            model.eval()
        flip, scales = (self.tta_flip, self.tta_scales) if tta else (False, [])
        with self._autocast():
            out = eval_outputs(self.models, self.to_input(images), flip, scales)
        return {key: value.float().cpu() for key, value in out.items()}

    def top_probabilities(self, images: torch.Tensor, topk: int,
                          key: str = 'logit') -> Tuple[torch.Tensor, torch.Tensor]:
        """``(probabilities, class indices)``, each ``(N, k)``, most likely first, of output ``key`` (``logit``,
        or ``logit_tta`` when TTA is on); k is clamped to the classes."""
        probs = torch.softmax(self(images, tta=key.endswith('_tta'))[key], dim=1)
        return probs.topk(min(topk, probs.shape[1]), dim=1)
