"""Layers handed to timm's model builders (imported only when a timm model is built: timm takes seconds to import)."""
from timm.layers import BlurPool2d


class ReplicatePadBlurPool2d(BlurPool2d):
    """timm's ``BlurPool2d`` with edge-replicating padding: its default, reflection, fails on the 1x1 feature maps of
    small inputs (a 32 px image in layer4), while replication pads any size and blurs a border the same way."""

    def __init__(self, channels=None, filt_size: int = 3, stride: int = 2, **kwargs) -> None:
        super().__init__(channels, filt_size, stride, pad_mode='replicate', **kwargs)
