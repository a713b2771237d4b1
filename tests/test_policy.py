import copy

import pytest
import torch
from ding.utils import POLICY_REGISTRY

from dizoo_imgcls.config import default_config
from dizoo_imgcls.policy import ImageClassificationPolicy, lr_schedule_curve, resolve_amp_dtype, scaled_lr


def make_policy(eval=None, **learn):
    """A 4-class ResNet-18 policy on CPU with ``learn`` keys set (and the ``eval`` section updated by ``eval``)."""
    cfg = default_config().policy
    cfg.cuda = False
    cfg.model.num_classes = 4
    cfg.learn.update(dict(batch_size=8, train_epoch=2, iters_per_epoch=5, warmup_epochs=0, amp='none',
                          lr_per_256=3.2, weight_decay=1e-4))
    cfg.learn.update(learn)
    cfg.eval.update(eval or {})
    return ImageClassificationPolicy(cfg, enable_field=['learn', 'eval'])


def fixed_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    return [images, torch.arange(8) % 4]


def test_registered_in_dingengine_registry():
    assert POLICY_REGISTRY.get('image_classification') is ImageClassificationPolicy


def test_one_step_lowers_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    policy = make_policy()
    batch = fixed_batch()
    first = policy.learn_mode.forward(batch)
    for value in first.values():
        assert isinstance(value, (int, float)), first
    assert set(policy.learn_mode.monitor_vars()) <= set(first)
    second = policy.learn_mode.forward(batch)
    assert second['loss'] < first['loss']
    assert first['grad_norm'] > 0


def test_bf16_autocast_step_runs_and_learns():
    torch.manual_seed(0)
    policy = make_policy(amp='bf16')
    assert policy._amp_dtype is torch.bfloat16
    seen = []
    policy._model.backbone.fc.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    batch = fixed_batch()
    losses = [policy.learn_mode.forward(batch)['loss'] for _ in range(3)]
    assert losses[-1] < losses[0]
    assert seen == [torch.bfloat16] * 3  # the layers really ran in bf16, the loss in fp32 (it still learns)
    with pytest.raises(ValueError, match="'fp16' needs a GPU"):
        resolve_amp_dtype('fp16', 'cpu')
    assert resolve_amp_dtype('none', 'cpu') is None and resolve_amp_dtype('bf16', 'cpu') is torch.bfloat16


def test_lr_is_scaled_by_global_batch_and_no_decay_on_bn_and_bias():
    policy = make_policy(lr_schedule='cosine')
    optimizer = policy._optimizer
    assert optimizer.param_groups[0]['lr'] == pytest.approx(scaled_lr(3.2, 8)) == pytest.approx(0.1)
    decayed, plain = optimizer.param_groups
    assert decayed['weight_decay'] == 1e-4 and plain['weight_decay'] == 0.0
    assert all(p.ndim > 1 for p in decayed['params']) and all(p.ndim == 1 for p in plain['params'])
    n_bn_and_bias = sum(1 for m in policy._model.modules() if isinstance(m, torch.nn.BatchNorm2d)) * 2 + 1
    assert len(plain['params']) == n_bn_and_bias  # BN weight + bias per layer, + the fc bias


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    a = make_policy()
    for seed in range(3):
        a.learn_mode.forward(fixed_batch(seed))
    state = copy.deepcopy(a.learn_mode.state_dict())
    assert state['iteration'] == 3 and {'model', 'optimizer', 'lr_scheduler', 'epoch'} <= set(state)
    b = make_policy()
    b.learn_mode.load_state_dict(state)
    out_a = a.learn_mode.forward(fixed_batch(9))
    out_b = b.learn_mode.forward(fixed_batch(9))
    assert out_a['loss'] == out_b['loss'] and out_a['lr'] == out_b['lr']
    for pa, pb in zip(a._model.parameters(), b._model.parameters()):
        assert torch.equal(pa, pb)


def test_eval_mode_returns_float_logits():
    policy = make_policy()
    out = policy.eval_mode.forward(fixed_batch()[0])
    assert set(out) == {'logit'}
    assert out['logit'].shape == (8, 4) and out['logit'].dtype == torch.float32


def test_collect_mode_is_not_implemented():
    policy = make_policy()
    with pytest.raises(NotImplementedError):
        policy._forward_collect({0: None})
    with pytest.raises(NotImplementedError):
        policy._process_transition(None, {}, None)
    with pytest.raises(NotImplementedError):
        policy._get_train_sample([])
    cfg = copy.deepcopy(policy._cfg)
    with pytest.raises(NotImplementedError):
        ImageClassificationPolicy(cfg)  # collect is among the default enabled fields


def test_zero_init_residual_and_msra_init():
    policy = make_policy()
    backbone = policy._model.backbone
    assert torch.count_nonzero(backbone.layer1[0].bn2.weight) == 0
    assert torch.all(backbone.bn1.weight == 1)
    std = backbone.conv1.weight.std().item()
    expected = (2.0 / (64 * 7 * 7)) ** 0.5  # kaiming normal, fan_out
    assert abs(std - expected) / expected < 0.1


def schedule(name, **kw):
    base = dict(schedule=name, total_iters=100, warmup_iters=10, warmup_start_factor=0.1, final_lr_factor=0.0)
    base.update(kw)
    return lr_schedule_curve(base, lr=1.0, iters=100)


def test_warmup_then_cosine():
    lr = schedule('cosine')
    assert lr[0] == pytest.approx(0.1)
    assert lr[5] == pytest.approx(0.1 + 0.9 * 5 / 10)
    assert lr[10] == pytest.approx(1.0)
    assert lr[55] == pytest.approx(0.5, abs=1e-6)  # half-way through the cosine
    assert lr[99] < 0.001


def test_cosine_ends_each_param_group_at_its_own_fraction_of_its_peak():
    # Fine-tuning: head at 1.0, backbone at a tenth, a frozen group at 0. A single eta_min (torch's
    # CosineAnnealingLR) would end every group at 0.05 and raise the frozen one from 0.
    from dizoo_imgcls.policy.optim import build_lr_scheduler

    peaks = [1.0, 0.1, 0.0]
    optimizer = torch.optim.SGD([dict(params=[torch.nn.Parameter(torch.zeros(1))], lr=lr) for lr in peaks], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, 'cosine', total_iters=40, warmup_iters=8, warmup_start_factor=0.1,
                                   final_lr_factor=0.05)
    curves = []
    for _ in range(40):
        curves.append([group['lr'] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    curves.append([group['lr'] for group in optimizer.param_groups])
    for g, peak in enumerate(peaks):
        lrs = [c[g] for c in curves]
        assert lrs[0] == pytest.approx(0.1 * peak) and lrs[8] == pytest.approx(peak)
        assert lrs[24] == pytest.approx(peak * (0.05 + 0.95 * 0.5))  # half-way through the cosine
        assert lrs[40] == pytest.approx(0.05 * peak, abs=1e-12)
        assert all(a >= b - 1e-12 for a, b in zip(lrs[8:], lrs[9:]))  # never rises after the warmup


def test_warmup_then_step():
    lr = schedule('step', step_milestones=[50, 80], step_gamma=0.1)
    assert lr[10] == pytest.approx(1.0) and lr[49] == pytest.approx(1.0)
    assert lr[50] == pytest.approx(0.1) and lr[80] == pytest.approx(0.01)


def test_onecycle_peaks_after_warmup_and_anneals():
    lr = schedule('onecycle')
    assert lr[0] == pytest.approx(0.1)
    assert max(lr) == pytest.approx(1.0, abs=1e-3) and lr.index(max(lr)) in (9, 10, 11)
    assert lr[-1] < 0.01


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_fused_optimizer_takes_the_same_steps_as_the_per_tensor_loop(name):
    from dizoo_imgcls.policy.optim import build_optimizer

    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.BatchNorm1d(5),
                                    torch.nn.Linear(5, 3))
    fused_model = copy.deepcopy(reference)
    fused = build_optimizer(name, fused_model.parameters(), 0.1, momentum=0.9, nesterov=True)
    assert fused.defaults['fused'] is True
    kwargs = dict(momentum=0.9, nesterov=True) if name == 'sgd' else {}
    loop = getattr(torch.optim, {'sgd': 'SGD', 'adamw': 'AdamW'}[name])(reference.parameters(), lr=0.1,
                                                                        foreach=False, **kwargs)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    start = [p.detach().clone() for p in reference.parameters()]
    for _ in range(3):
        for model, optimizer in ((reference, loop), (fused_model, fused)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for a, b, before in zip(reference.parameters(), fused_model.parameters(), start):
        assert (a - b).abs().max() < 1e-6 and not torch.equal(a, before)


def test_batch_size_counts_images_when_mixup_makes_the_targets_soft():
    torch.manual_seed(0)
    policy = make_policy(mix=dict(mixup_alpha=0.4, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, stop_epoch=None))
    out = policy.learn_mode.forward(fixed_batch())
    assert out['batch_size'] == 8  # not 8 x 4 classes: the logged img/s and images seen depend on it


def test_fine_tuning_freezes_the_backbone_then_trains_it_at_a_lower_lr():
    torch.manual_seed(0)
    policy = make_policy(backbone_lr_factor=0.3, freeze_backbone_epochs=1, lr_schedule='step', lr_step_epochs=[])
    assert sorted(round(g['lr'], 6) for g in policy._optimizer.param_groups) == [0.03, 0.03, 0.1, 0.1]
    head = {id(p) for g in policy._optimizer.param_groups if g['lr'] == pytest.approx(0.1) for p in g['params']}
    assert head == {id(policy._model.backbone.fc.weight), id(policy._model.backbone.fc.bias)}

    def snapshot():
        return {name: p.detach().clone() for name, p in policy._model.named_parameters()}

    before = snapshot()
    policy.learn_mode.forward(fixed_batch())  # epoch 1 of training (index 0): the backbone is frozen
    after = snapshot()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved == {'backbone.fc.weight', 'backbone.fc.bias'}
    policy._epoch = 1  # from epoch 2 on, everything trains
    policy.learn_mode.forward(fixed_batch())
    assert not torch.equal(snapshot()['backbone.layer1.0.conv1.weight'], after['backbone.layer1.0.conv1.weight'])
    with pytest.raises(ValueError, match='backbone_lr_factor'):  # a share of the LR: a factor above 1 is a mistake
        make_policy(backbone_lr_factor=2.0)
