"""Model factory: build a classifier by name, with MSRA init and an input-normalization stem.

Image models take uint8 (or float 0..255) NCHW batches; the normalization to mean/std lives inside the
model so the data workers ship compact uint8 tensors and an exported model needs no separate preprocessing.
"""
import difflib
import inspect
import logging
from functools import partial
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torchvision
from ding.utils.registry import Registry

from ..errors import SettingError
from .tweaks import add_blur_pool_, set_activation_

logger = logging.getLogger('dizoo_imgcls')

MODEL_REGISTRY = Registry()

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputNormalize(nn.Module):
    """Maps 0..255 pixel values to (x / 255 - mean) / std, as one fused multiply-add."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer('scale', 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer('shift', -mean_t / std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x.float(), self.scale)


class ImageClassifier(nn.Module):
    """A backbone preceded by input normalization; ``backbone`` holds the torchvision module unchanged."""

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = InputNormalize(mean, std)
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


def msra_init_(model: nn.Module, zero_init_residual: bool) -> None:
    """Kaiming-normal convs (fan_out, as in He et al. 2015), unit BN, small linear head.

    With ``zero_init_residual`` the last BN of each residual block starts at zero, so every block is the
    identity at init (Goyal et al. 2017) and very deep nets train from the first step.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, torchvision.models.resnet.Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, torchvision.models.resnet.BasicBlock):
                nn.init.zeros_(m.bn2.weight)
            elif hasattr(m, 'zero_init_last'):  # timm's ResNet blocks
                m.zero_init_last()


def _register_torchvision_resnet(name: str) -> None:
    builder: Callable[..., nn.Module] = getattr(torchvision.models, name)

    def build(num_classes: int, zero_init_residual: bool = False, blur_pool: bool = False,
              activation: Optional[str] = 'relu', mean=IMAGENET_MEAN, std=IMAGENET_STD):
        backbone = builder(weights=None, num_classes=num_classes)
        if blur_pool:
            add_blur_pool_(backbone)
        set_activation_(backbone, activation)
        msra_init_(backbone, zero_init_residual)
        return ImageClassifier(backbone, mean, std)

    MODEL_REGISTRY.register(name, build)


# torchvision's ResNets, kept for torchvision state dicts (``policy.model.pretrained``).
for _name in ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152'):
    _register_torchvision_resnet(_name)

TIMM_PREFIX = 'timm/'


def build_timm_model(arch: str, num_classes: int, zero_init_residual: bool = True, blur_pool: bool = False,
                     activation: Optional[str] = None, self_attention: bool = False, **timm_kwargs) -> nn.Module:
    """``policy.model.name='timm/<arch>'``: any architecture ``timm.create_model`` builds, without pretrained
    weights (nothing is downloaded), behind our input normalization with timm's mean/std for it.

    ``activation`` is timm's ``act_layer`` ('silu', 'mish', ...; None: the model's own); ``blur_pool`` is timm's
    anti-aliasing (``aa_layer=BlurPool2d``: blur-pooled strided convolutions and a MaxBlurPool stem, Zhang 2019).
    ``self_attention`` (``policy.model.extra.self_attention``, timm's ResNets only) adds fastai's simple
    self-attention layer to the first stage's last block. Further keys of ``policy.model.extra`` go to
    ``timm.create_model`` as they are (e.g. ``block_args=dict(attn_layer='se')``, ``drop_path_rate=0.05``).
    timm's ResNet family (ResNet-D, SE-ResNeXt, ...) gets our MSRA init with the residual branches' last BN at zero
    when ``zero_init_residual``; other architectures keep timm's own init."""
    import timm
    from timm.models.resnet import ResNet as TimmResNet

    if activation is not None:
        timm_kwargs['act_layer'] = activation
    if blur_pool:
        from .timm_layers import ReplicatePadBlurPool2d
        timm_kwargs['aa_layer'] = ReplicatePadBlurPool2d
    try:
        backbone = timm.create_model(arch, pretrained=False, num_classes=num_classes, **timm_kwargs)
    except TypeError as e:  # an option this architecture does not take
        raise SettingError(f"timm model '{arch}' does not take the options {sorted(timm_kwargs)}: {e}") from None
    if isinstance(backbone, TimmResNet):
        msra_init_(backbone, zero_init_residual)
    if self_attention:
        if not isinstance(backbone, TimmResNet):
            raise SettingError(f"policy.model.extra.self_attention needs one of timm's ResNets (its blocks' attention "
                               f"slot); '{arch}' is a {type(backbone).__name__}")
        from .timm_layers import add_self_attention_
        add_self_attention_(backbone)
    cfg = getattr(backbone, 'pretrained_cfg', None) or {}
    return ImageClassifier(backbone, cfg.get('mean', IMAGENET_MEAN), cfg.get('std', IMAGENET_STD))


def _register_legacy_resnet_d(name: str) -> None:
    """``resnet18d`` and friends were torchvision ResNets rebuilt by hand into ResNet-D; timm's ``resnet18d``
    is the same network with the same state-dict keys, so the old names build timm's and old checkpoints load.
    The old ``blur_pool`` (a blur before each strided convolution) is not timm's anti-aliasing: refused."""

    def build(num_classes: int, zero_init_residual: bool = False, blur_pool: bool = False,
              activation: Optional[str] = None):
        if blur_pool:
            raise SettingError(f"'{name}' with blur_pool=True was the hand-built ResNet-D with a blur before each "
                               f"strided convolution, which no longer exists; 'timm/{name}' with blur_pool=True is "
                               f"timm's anti-aliased ResNet-D (another network: its weights do not carry over)")
        return build_timm_model(name, num_classes, zero_init_residual=zero_init_residual, activation=activation)

    MODEL_REGISTRY.register(name, build)


for _name in ('resnet18d', 'resnet34d', 'resnet50d', 'resnet101d', 'resnet152d'):
    _register_legacy_resnet_d(_name)


def available_models() -> list:
    return sorted(MODEL_REGISTRY.keys())


def model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder of a registered name, or of a timm architecture named ``timm/<arch>``."""
    if name.startswith(TIMM_PREFIX):
        import timm

        arch = name[len(TIMM_PREFIX):]
        if not timm.is_model(arch):
            close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(TIMM_PREFIX + c for c in close)}?)" if close else ''
            raise KeyError(f"timm has no model '{arch}'{hint}; timm.list_models() lists them")
        return partial(build_timm_model, arch)
    if name not in MODEL_REGISTRY:
        raise KeyError(f"unknown model '{name}'; available: {', '.join(available_models())}, or timm/<name> for "
                       f"any timm architecture")
    return MODEL_REGISTRY[name]


def check_model_options(name: str, options: Iterable[str], config_keys: Sequence[str] = ()) -> None:
    """The model is registered and takes every one of ``options`` as a keyword (a typo such as ``blurpool``
    must not be silently ignored); ``KeyError`` / ``ValueError`` naming the problem otherwise. ``config_keys``:
    other valid keys where the options come from (``policy.model.name``), offered as corrections too.
    A timm model takes any keyword (``policy.model.extra``); timm itself refuses the ones it does not know."""
    builder = model_builder(name)
    params = inspect.signature(builder).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    valid = [k for k in params if k != 'num_classes']
    for key in sorted(set(options) - set(params)):
        close = difflib.get_close_matches(key, valid + list(config_keys), n=2, cutoff=0.5)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ''
        raise SettingError(f"model '{name}' has no option '{key}'{hint}; its options: {', '.join(valid)}")


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``create_model('resnet18', num_classes=10, zero_init_residual=True)``."""
    check_model_options(name, kwargs)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise SettingError(f'num_classes must be a positive integer, got {num_classes!r}')
    return model_builder(name)(num_classes=num_classes, **kwargs)


def classifier_head_prefix(model: nn.Module) -> str:
    """State-dict prefix of the final classifier: the last ``nn.Linear`` (``backbone.fc.`` for ResNets)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SettingError(f'{type(model).__name__} has no nn.Linear classifier head')
    return linears[-1] + '.'


def load_pretrained(model: nn.Module, state: Dict[str, torch.Tensor], source: str = 'pretrained weights') -> str:
    """Copy ``state`` (ours, or a plain torchvision state dict) into ``model``; returns what was done.

    A head of a different size is left at its fresh initialization (the new task's classes); any other
    missing, unexpected or mis-shaped key is an error naming it."""
    own = model.state_dict()
    if not any(k in own for k in state):
        state = {f'backbone.{k}': v for k, v in state.items()}  # torchvision keys: conv1.weight, fc.bias, ...
    head = classifier_head_prefix(model)
    head_keys = [k for k in own if k.startswith(head)]
    new_head = any(k in state and state[k].shape != own[k].shape for k in head_keys)
    if new_head:
        old_classes = state[head + 'weight'].shape[0]
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    mismatched = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise SettingError(f'{source}: shapes differ for {mismatched[:3]}: is it the same architecture?')
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (new_head and k.startswith(head))]
    if missing or unexpected:
        raise SettingError(f'{source} does not fit {type(model).__name__}: missing {missing[:3]}, '
                           f'unexpected {unexpected[:3]}')
    if new_head:
        return f'loaded {source}; replaced the classifier head ({old_classes} -> {own[head + "weight"].shape[0]} ' \
               f'classes, freshly initialized)'
    return f'loaded {source} (all layers, including the classifier head)'


def model_options(model_cfg: Dict) -> Dict:
    """The builder's keyword options in a ``policy.model`` config: all but name, num_classes and pretrained, with
    the keys of ``extra`` (further options of one model, e.g. a timm architecture's) in their place."""
    options = {k: v for k, v in model_cfg.items() if k not in ('name', 'num_classes', 'pretrained', 'extra')}
    return {**options, **(model_cfg.get('extra') or {})}


def build_model_from_cfg(model_cfg: Dict) -> nn.Module:
    """The adapter between a ``policy.model`` config dict and the factory, which never sees the config."""
    kwargs = model_options(model_cfg)
    model = create_model(model_cfg['name'], model_cfg['num_classes'], **kwargs)
    if model_cfg.get('pretrained'):
        from ..checkpoint import model_state_from_file  # checkpoint loading is safe-only (weights_only)
        path = model_cfg['pretrained']
        logger.info(load_pretrained(model, model_state_from_file(path), source=path))
    return model
