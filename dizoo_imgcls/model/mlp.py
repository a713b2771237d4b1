"""An MLP on pixel coordinates: (y, x) in, one logit per class out (the OVERFIT demo's model).

Like the ResNets' ``InputNormalize``, the input scaling lives inside the model: the data ships raw pixel
coordinates, and ``input_range`` decides what the first layer sees, which is the whole point of the demo.
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..errors import SettingError
from .factory import MODEL_REGISTRY


class Cos(nn.Module):
    """cos as an activation: with it the MLP builds its own Fourier features of the coordinates."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cos(x)


MLP_ACTIVATIONS = {'relu': nn.ReLU, 'tanh': nn.Tanh, 'cos': Cos}


class CoordinateScale(nn.Module):
    """Maps y in 0..H-1 and x in 0..W-1 linearly onto [-r, r] each, as one fused multiply-add.

    ``input_range=None`` passes raw pixel values (up to W-1) through unchanged.
    """

    def __init__(self, coord_hw: Sequence[int], input_range: Optional[float]) -> None:
        super().__init__()
        hw = torch.tensor([float(s) for s in coord_hw])
        if input_range is None:
            scale, shift = torch.ones(2), torch.zeros(2)
        else:
            scale = 2.0 * input_range / (hw - 1).clamp(min=1)
            shift = torch.full((2, ), -float(input_range))
        self.register_buffer('scale', scale, persistent=False)
        self.register_buffer('shift', shift, persistent=False)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, coords.float(), self.scale)


class CoordinateMLP(nn.Module):
    """Coordinate scaling, then [Linear -> BatchNorm1d (optional) -> activation] per hidden width, then Linear."""

    def __init__(self, num_classes: int, widths: Sequence[int], activation: str, batch_norm: bool,
                 coord_hw: Sequence[int], input_range: Optional[float]) -> None:
        super().__init__()
        self.coord_hw = tuple(int(s) for s in coord_hw)
        self.scale = CoordinateScale(self.coord_hw, input_range)
        layers, fan_in = [], 2
        for width in widths:
            layers.append(nn.Linear(fan_in, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(MLP_ACTIVATIONS[activation]())
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return self.layers(self.scale(coords))


def _check_mlp_args(widths, activation, coord_hw, input_range) -> None:
    if activation not in MLP_ACTIVATIONS:
        raise SettingError(f"policy.model.activation must be one of {sorted(MLP_ACTIVATIONS)}, got '{activation}'")
    if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
        raise SettingError(f'policy.model.widths must be a non-empty list of positive integers, got {widths!r}')
    if len(coord_hw) != 2 or any(not isinstance(s, int) or s < 1 for s in coord_hw):
        raise SettingError(f'policy.model.coord_hw must be [height, width] in px, got {coord_hw!r}')
    if input_range is not None and not (isinstance(input_range, (int, float)) and input_range > 0):
        raise SettingError(f'policy.model.input_range must be None (raw pixels) or a positive number, '
                           f'got {input_range!r}')


@MODEL_REGISTRY.register('coord_mlp')
def build_coord_mlp(num_classes: int, widths: Sequence[int] = (128, 128, 128), activation: Optional[str] = 'cos',
                    batch_norm: bool = False, input_range: Optional[float] = 3.0,
                    coord_hw: Sequence[int] = (300, 1000), zero_init_residual: Optional[bool] = None,
                    blur_pool: bool = False) -> CoordinateMLP:
    """``create_model('coord_mlp', 2)``: the OVERFIT demo's MLP (defaults: the fastest recipe measured there);
    ``create_model('coord_mlp', 2, activation='relu', input_range=None)`` is the seed's failing raw-pixel MLP.

    ``input_range``: None feeds raw pixels, 1.0 maps each axis to [-1, 1], 3.0 to [-3, 3]. ``coord_hw`` is
    the (height, width) the coordinates span, i.e. the size of the image being fitted.
    ``zero_init_residual`` and ``blur_pool`` are accepted because the policy's default model config passes
    them to every model; an MLP has no residual blocks (ignored) and no strided convolutions (refused).
    """
    if blur_pool:
        raise SettingError('policy.model.blur_pool applies to convolutional models, not coord_mlp')
    widths, coord_hw = list(widths), list(coord_hw)
    activation = 'cos' if activation is None else activation  # None: the policy config's "the model's own"
    _check_mlp_args(widths, activation, coord_hw, input_range)
    # PyTorch's default Linear init (uniform, +-1/sqrt(fan_in)) is kept on purpose: it is what the
    # raw-vs-normalized comparison is about.
    return CoordinateMLP(num_classes, widths, activation, batch_norm, coord_hw, input_range)
