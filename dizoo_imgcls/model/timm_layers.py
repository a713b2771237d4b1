"""Layers handed to timm's model builders (imported only when a timm model is built: timm takes seconds to import)."""
import torch
import torch.nn as nn
from timm.layers import BlurPool2d
from torch.nn.utils.parametrizations import spectral_norm


class ReplicatePadBlurPool2d(BlurPool2d):
    """timm's ``BlurPool2d`` with edge-replicating padding: its default, reflection, fails on the 1x1 feature maps of
    small inputs (a 32 px image in layer4), while replication pads any size and blurs a border the same way."""

    def __init__(self, channels=None, filt_size: int = 3, stride: int = 2, **kwargs) -> None:
        super().__init__(channels, filt_size, stride, pad_mode='replicate', **kwargs)


class SimpleSelfAttention(nn.Module):
    """Simple self-attention (Doria 2019, the layer of fastai's xresnet ``sa=True`` and of the Imagenette records):
    ``x + gamma * (x x^T) W x`` over the flattened pixels, with ``W`` a spectrally normalized 1x1 convolution
    (kaiming-normal init) and ``gamma`` starting at 0, so the layer is the identity at init. Costs 3 * C^2 * H * W
    multiply-adds: little in an early, narrow stage.

    ``x x^T`` sums over the H * W pixels, so the attention term grows with the image area: a model trained at one
    size and evaluated at another (progressive resizing, ``data.eval_image_size``) sees it scaled by the ratio of
    areas, as fastai's layer does (docs/BENCHMARKS.md, session 14)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        conv = nn.Conv1d(channels, channels, kernel_size=1, bias=False)
        nn.init.kaiming_normal_(conv.weight)
        self.conv = spectral_norm(conv)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)  # N, C, H*W
        attended = torch.bmm(torch.bmm(flat, flat.transpose(1, 2)), self.conv(flat))
        return (flat + self.gamma * attended).reshape_as(x)


def add_self_attention_(backbone: nn.Module) -> None:
    """fastai's placement: one ``SimpleSelfAttention`` on the residual branch of the first stage's last block
    (after its last BN, before the shortcut is added; after the block's SE where it has one). In place."""
    block = backbone.layer1[-1]
    channels = block.conv3.out_channels if hasattr(block, 'conv3') else block.conv2.out_channels
    attention = SimpleSelfAttention(channels)
    block.se = attention if block.se is None else nn.Sequential(block.se, attention)
