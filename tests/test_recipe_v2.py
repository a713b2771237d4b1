"""Recipe v2 pieces from the libraries: timm models, RAdam/LAMB/Lookahead, the flat_cos schedule, light crops."""
import io
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from dizoo_imgcls.data.sampler import EpochSeededDataset
from dizoo_imgcls.data.transforms import TrainPreset
from dizoo_imgcls.model import create_model, load_pretrained
from dizoo_imgcls.policy.optim import build_optimizer, lr_schedule_curve
from test_policy import fixed_batch, make_policy


def test_flat_cos_holds_the_peak_then_follows_the_cosine_to_the_final_factor():
    # 20 iterations, 4 of linear warmup from 0.25, flat until half the run (iteration 10), cosine to 0.1 x peak
    curve = lr_schedule_curve(dict(schedule='flat_cos', total_iters=20, warmup_iters=4, warmup_start_factor=0.25,
                                   final_lr_factor=0.1, flat_fraction=0.5), lr=2.0, iters=20)
    assert curve[0] == pytest.approx(0.5)  # 0.25 x 2.0
    assert curve[2] == pytest.approx(2.0 * (0.25 + 0.75 * 2 / 4))  # linear warmup: 1.25
    assert curve[4:11] == pytest.approx([2.0] * 7)  # the peak from the end of warmup to iteration 10
    for it in (11, 15, 19):  # cosine over the last 10 iterations: 0.1 + 0.9 x (1 + cos(pi x (it - 10) / 10)) / 2
        assert curve[it] == pytest.approx(2.0 * (0.1 + 0.9 * (1 + math.cos(math.pi * (it - 10) / 10)) / 2))
    # fastai's fit_flat_cos: no warmup, 75% flat, cosine to zero
    fastai = lr_schedule_curve(dict(schedule='flat_cos', total_iters=8, warmup_iters=0, flat_fraction=0.75), 1.0, 8)
    assert fastai == pytest.approx([1.0] * 7 + [0.5])  # iteration 7: half way down a 2-iteration cosine
    with pytest.raises(ValueError, match='flat_fraction must be in'):
        lr_schedule_curve(dict(schedule='flat_cos', total_iters=8, warmup_iters=0, flat_fraction=1.0), 1.0, 1)


def test_lookahead_step_equals_the_hand_computed_update():
    """timm's Lookahead around SGD (k=2, alpha=0.5) on w -> loss = w^2 / 2 (gradient w): two plain SGD steps,
    then the slow weights move half way towards the fast ones and the fast ones restart from there."""
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = build_optimizer('sgd', [dict(params=[w], weight_decay=0.0)], lr=0.1, momentum=0.0,
                                lookahead=dict(k=2, alpha=0.5))
    expected, slow = w.detach().clone(), None
    for step in range(1, 7):
        optimizer.zero_grad()
        (w ** 2 / 2).sum().backward()
        optimizer.step()
        expected = expected - 0.1 * expected  # SGD on the fast weights
        if step % 2 == 0:
            # timm starts the slow copy at the fast weights of the first sync, so that sync changes nothing
            slow = expected.clone() if slow is None else slow + 0.5 * (expected - slow)
            expected = slow.clone()
        assert torch.allclose(w.detach(), expected, atol=1e-7), step
    assert not torch.allclose(w.detach(), torch.tensor([1.0, -2.0]) * 0.9 ** 6)  # differs from plain SGD


@pytest.mark.parametrize('name', ['radam', 'lamb'])
@pytest.mark.slow  # > ~10 s on 2 cores
def test_library_optimizers_train_through_the_policy_and_resume_exactly(name):
    """RAdam (decoupled weight decay) and LAMB with Lookahead, flat_cos, no warmup: the loss falls on a fixed
    batch, and a policy restored from the state dict continues exactly as the original one."""
    settings = dict(optimizer=name, lookahead=dict(enabled=True, k=3, alpha=0.5), lr_schedule='flat_cos',
                    lr_per_256=0.5, adam_betas=[0.9, 0.99], adam_eps=1e-6, weight_decay=1e-2)
    torch.manual_seed(0)
    policy = make_policy(**settings)
    batch = fixed_batch()
    losses = [policy.learn_mode.forward(batch)['loss'] for _ in range(4)]
    assert losses[-1] < losses[0]
    buffer = io.BytesIO()  # through bytes, as a checkpoint file: torch's load_state_dict may keep the tensors
    torch.save(policy.learn_mode.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert any('lookahead_slow_buff' in s for s in state['optimizer']['state'].values())  # the slow weights
    clone = make_policy(**settings)
    clone.learn_mode.load_state_dict(state)
    for _ in range(3):  # past the next Lookahead sync (every 3 steps)
        a, b = policy.learn_mode.forward(batch), clone.learn_mode.forward(batch)
        assert a['loss'] == b['loss'] and a['lr'] == b['lr']
    params_a = dict(policy._model.named_parameters())
    for key, param in clone._model.named_parameters():
        assert torch.equal(param, params_a[key]), key


def test_radam_decays_conv_weights_but_not_bn_or_bias():
    policy = make_policy(optimizer='radam', weight_decay=0.05)
    decays = {group['weight_decay'] for group in policy._optimizer.param_groups if
              all(p.ndim == 1 for p in group['params'])}
    assert decays == {0.0}
    assert isinstance(policy._optimizer, torch.optim.RAdam) and policy._optimizer.defaults['decoupled_weight_decay']


def _old_resnet18d() -> nn.Module:
    """The hand-built ResNet-D this package had before timm's (torchvision resnet18 + deep stem + avg-pool
    shortcuts), to show that its checkpoints load into the ``resnet18d`` that timm builds now."""
    net = torchvision.models.resnet18(num_classes=10)
    layers = []
    for cin, cout in ((3, 32), (32, 32)):
        layers += [nn.Conv2d(cin, cout, 3, 2 if cin == 3 else 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    net.conv1 = nn.Sequential(*layers, nn.Conv2d(32, 64, 3, 1, 1, bias=False))
    for stage in (net.layer2, net.layer3, net.layer4):
        conv, bn = stage[0].downsample
        stage[0].downsample = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                                            nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=False), bn)
    return net


def test_resnet18d_is_timms_and_loads_the_old_hand_built_weights():
    torch.manual_seed(0)
    old = _old_resnet18d().eval()
    for m in old.modules():  # non-trivial BN statistics, so a mismatch cannot hide
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5), m.weight.data.uniform_(0.5, 1.5)
    new = create_model('resnet18d', 10)
    assert type(new.backbone).__module__ == 'timm.models.resnet'
    assert load_pretrained(new, old.state_dict()).startswith('loaded')
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(new.eval()(x), old(new.normalize(x)), atol=1e-5)
    with pytest.raises(ValueError, match="'timm/resnet18d' with blur_pool=True is timm's anti-aliased"):
        create_model('resnet18d', 10, blur_pool=True)


def test_timm_models_by_name_with_options_and_a_new_head():
    with pytest.raises(KeyError, match=r"timm has no model 'resnet18dd' \(did you mean timm/resnet18d"):
        create_model('timm/resnet18dd', 3)
    se = create_model('timm/resnet18d', 3, activation='mish', blur_pool=True, block_args=dict(attn_layer='se'))
    kinds = {type(m).__name__ for m in se.modules()}
    assert {'Mish', 'SEModule', 'ReplicatePadBlurPool2d'} <= kinds
    assert not any(isinstance(m, nn.ReLU) and '.se.' not in name for name, m in se.named_modules())  # SE's own
    assert [type(m).__name__ for m in se.backbone.maxpool] == ['MaxPool2d', 'ReplicatePadBlurPool2d']  # MaxBlurPool
    assert se.eval()(torch.zeros(1, 3, 16, 16, dtype=torch.uint8)).shape == (1, 3)  # 1x1 maps in layer4 blur too
    # zero-init of each residual branch's last BN (timm's zero_init_last), on top of our MSRA init
    assert all(block.bn2.weight.abs().sum() == 0 for stage in (se.backbone.layer1, se.backbone.layer4)
               for block in stage)
    with pytest.raises(ValueError, match="does not take the options"):
        create_model('timm/resnet18d', 3, no_such_option=1)
    # fine-tuning: a 3-class checkpoint's weights into a 5-class model of the same architecture
    grouped = create_model('timm/seresnext26d_32x4d', 3)
    target = create_model('timm/seresnext26d_32x4d', 5)
    message = load_pretrained(target, grouped.state_dict())
    assert 'replaced the classifier head (3 -> 5 classes' in message
    assert torch.equal(target.backbone.conv1[0].weight, grouped.backbone.conv1[0].weight)
    assert target(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, 5)


def test_simple_self_attention_by_hand_and_in_the_first_stages_last_block():
    from dizoo_imgcls.model.timm_layers import SimpleSelfAttention

    attention = SimpleSelfAttention(2)
    attention.conv.weight = 3 * torch.eye(2).unsqueeze(-1)  # spectral norm 3: the normalized 1x1 conv is I
    attention.gamma.data.fill_(0.5)
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]).view(1, 2, 1, 3)
    attention.train()(x)  # one power iteration finds the exact singular vectors of 3 I
    # X X^T = [[5, 2], [2, 2]]; X X^T X = [[5, 2, 12], [2, 2, 6]]; X + 0.5 * that:
    expected = torch.tensor([[3.5, 1.0, 8.0], [1.0, 2.0, 4.0]]).view(1, 2, 1, 3)
    assert torch.allclose(attention.eval()(x), expected)
    assert torch.allclose(attention(x.contiguous(memory_format=torch.channels_last)), expected)

    torch.manual_seed(0)
    plain = create_model('timm/resnet18d', 3).eval()
    model = create_model('timm/resnet18d', 3, self_attention=True, block_args=dict(attn_layer='se'))
    block = model.backbone.layer1[-1]
    assert [type(m).__name__ for m in block.se] == ['SEModule', 'SimpleSelfAttention']  # after SE, as in fastai
    assert model.backbone.layer1[0].se is not None and not any(
        isinstance(m, SimpleSelfAttention) for m in model.backbone.layer2.modules())
    model = create_model('timm/resnet18d', 3, self_attention=True)
    assert isinstance(model.backbone.layer1[-1].se, SimpleSelfAttention)
    # gamma starts at 0: the same function as the plain network with the same weights
    assert load_pretrained(plain, {k: v for k, v in model.state_dict().items() if '.se.' not in k})
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), plain(x), atol=1e-5)
    nn.init.ones_(model.backbone.layer1[-1].bn2.weight)  # a non-zero residual branch: gamma learns
    model.train()(x).sum().backward()
    assert model.backbone.layer1[-1].se.gamma.grad.abs().item() > 0
    with pytest.raises(ValueError, match="self_attention needs one of timm's ResNets"):
        create_model('timm/mobilenetv3_small_050', 3, self_attention=True)


class _Images(torch.utils.data.Dataset):
    def __init__(self, preset, images):
        self.preset, self.images = preset, images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.preset(self.images[index])


def test_light_crops_are_whole_squares_flipped_and_a_function_of_the_sample_seed():
    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    wide = rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)
    # Resize + flip (scale [1, 1], ratio [1, 1]): the whole square image, as is or mirrored
    resize_flip = _Images(TrainPreset(20, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), reduced_decode=False),
                          [square] * 16)
    whole = torch.nn.functional.interpolate(torch.from_numpy(square).permute(2, 0, 1)[None], size=(20, 20),
                                            mode='bilinear', antialias=True, align_corners=False)[0]
    outs = [resize_flip[i] for i in range(16)]
    assert all(out.shape == (3, 20, 20) and out.dtype == torch.uint8 for out in outs)
    flipped = [torch.equal(out, whole.flip(-1)) for out in outs]
    assert all(f or torch.equal(out, whole) for f, out in zip(flipped, outs)) and 0 < sum(flipped) < 16
    # A non-square image gets the largest square that fits (the scale-1 square cannot): the central one
    central = TrainPreset(20, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False, reduced_decode=False)
    expected = torch.nn.functional.interpolate(torch.from_numpy(wide[:, 15:45].copy()).permute(2, 0, 1)[None],
                                               size=(20, 20), mode='bilinear', antialias=True, align_corners=False)
    assert torch.equal(central(wide), expected[0])
    # Small random squares (60-100% of the area): square, and the same for the same (seed, epoch, index)
    light = TrainPreset(24, crop_scale=(0.6, 1.0), crop_ratio=(1.0, 1.0), reduced_decode=False)
    data = EpochSeededDataset(_Images(light, [square, wide]), seed=3)
    first = [data[1 * 2 + i] for i in range(2)]  # epoch 1, both samples
    assert all(out.shape == (3, 24, 24) for out in first)
    assert all(torch.equal(a, b) for a, b in zip(first, [data[2], data[3]]))
    assert not torch.equal(data[2], data[4])  # epoch 2 draws another crop
    with pytest.raises(ValueError, match='train_crop_ratio must be'):
        TrainPreset(24, crop_ratio=(1.5, 1.0))
