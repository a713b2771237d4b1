"""Architecture tweaks applied to torchvision ResNets in place (timm's models take timm's own equivalents:
ResNet-D is timm's ``resnet18d``, activations its ``act_layer``, anti-aliasing its ``aa_layer``).

* BlurPool (Zhang 2019, "Making Convolutional Networks Shift-Invariant Again"), in the form FFCV's ResNet
  recipes use: every strided convolution with at least 16 input channels first low-pass filters its input
  with a fixed depthwise 3x3 binomial kernel, so the stride aliases less.
* Activation: every ReLU replaced by SiLU (Swish; Ramachandran et al. 2017) or Mish (Misra 2019), the smooth
  activations of EfficientNet and of fastai's Imagenette leaderboard entries.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SettingError


ACTIVATIONS = {'relu': nn.ReLU, 'silu': nn.SiLU, 'mish': nn.Mish}


def set_activation_(model: nn.Module, name: Optional[str]) -> nn.Module:
    """Replace every ``nn.ReLU`` module of ``model`` (torchvision's ResNets use modules, not ``F.relu``) by the
    activation ``name``, in place; ``'relu'`` or None leaves the model as it is."""
    if name is not None and name not in ACTIVATIONS:
        raise SettingError(f"policy.model.activation must be one of {sorted(ACTIVATIONS)}, got '{name}'")
    if name in (None, 'relu'):
        return model
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, ACTIVATIONS[name](inplace=True))
    return model


class BlurPool(nn.Module):
    """Fixed depthwise 3x3 binomial low-pass filter ([1, 2, 1] x [1, 2, 1] / 16), stride 1, reflect-free
    zero padding; no parameters, so checkpoints of blurred and plain models have the same keys."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = (taps[:, None] * taps[None, :]) / 16.0
        self.register_buffer('kernel', kernel.expand(channels, 1, 3, 3).contiguous(), persistent=False)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel.to(x.dtype), padding=1, groups=self.channels)


class BlurConv2d(nn.Module):
    """A strided convolution preceded by ``BlurPool``; the wrapped convolution keeps its parameter names
    under ``conv.``."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.blur = BlurPool(conv.in_channels)
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.blur(x))


def add_blur_pool_(model: nn.Module) -> nn.Module:
    """Wrap every strided conv with >= 16 input channels (not the RGB stem) in ``BlurConv2d``, in place."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.stride[0] > 1 and child.in_channels >= 16:
                setattr(parent, name, BlurConv2d(child))
    return model
