"""The training-recipe techniques, each against values computed by hand."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dizoo_imgcls.data.folder import IGNORE_LABEL
from dizoo_imgcls.data.transforms import ProgressiveResize, TrainPreset
from dizoo_imgcls.metric import DiagnosticMetric, ImageClassificationMetric
from dizoo_imgcls.model import create_model
from dizoo_imgcls.model.tweaks import BlurConv2d, BlurPool
from dizoo_imgcls.inference import average_probabilities, eval_outputs, tta_views
from dizoo_imgcls.policy.recipe import BatchMixer, ExponentialMovingAverage
from test_policy import fixed_batch, make_policy


def test_mixup_targets_sum_to_one_and_mix_the_rolled_pair():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    mixer = BatchMixer(4, mixup_alpha=0.4, cutmix_alpha=0.0)
    mixed, target = mixer(images, labels, epoch=1)
    assert target.shape == (6, 4)
    assert torch.allclose(target.sum(dim=1), torch.ones(6))
    lam = target[0, 0].item()  # sample 0 (class 0) mixed with the previous sample, 5 (class 1)
    assert target[0, 1].item() == pytest.approx(1 - lam)
    expected = lam * images[0].float() + (1 - lam) * images[5].float()
    assert torch.allclose(mixed[0], expected, atol=1e-4)


def test_cutmix_target_share_is_the_pasted_area():
    torch.manual_seed(1)
    images = torch.zeros(2, 3, 16, 16)
    images[1] = 1.0  # the pasted patch of sample 0 comes from sample 1: ones
    mixer = BatchMixer(2, mixup_alpha=0.0, cutmix_alpha=1.0)
    mixed, target = mixer(images, torch.tensor([0, 1]), epoch=1)
    pasted = mixed[0, 0].mean().item()  # fraction of sample 0's pixels that are now ones
    assert target[0, 1].item() == pytest.approx(pasted)
    assert torch.allclose(target.sum(dim=1), torch.ones(2))


def test_mix_switch_probability_and_stop_epoch():
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    torch.manual_seed(0)
    cutmix_only = BatchMixer(2, mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=1.0)
    assert [type(t).__name__ for t in cutmix_only.transforms] == ['CutMix']
    never = BatchMixer(2, mixup_alpha=0.2, prob=0.0)
    out, target = never(images, labels, epoch=1)
    assert out is images and target is labels
    late = BatchMixer(2, mixup_alpha=0.2, stop_epoch=2)
    assert late.active(2) and not late.active(3)
    out, target = late(images, labels, epoch=3)
    assert target is labels  # epochs after stop_epoch train on clean images
    torch.manual_seed(0)
    half = BatchMixer(2, mixup_alpha=0.2, prob=0.5)
    mixed = sum(half(images, labels, epoch=1)[1].dim() == 2 for _ in range(400))
    assert 160 < mixed < 240  # binomial(400, 0.5): 4.5 standard deviations either side


def test_label_smoothing_loss_by_hand():
    policy = make_policy(label_smoothing=0.1)
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    logp = F.log_softmax(logits, dim=1)[0]
    # smoothed target: 0.9 on the class plus 0.1 / 4 on every class
    expected = -(0.9 * logp[0] + 0.025 * logp.sum())
    assert policy._criterion(logits, torch.tensor([0])).item() == pytest.approx(expected.item(), rel=1e-6)
    # a Mixup target (probability rows) is smoothed the same way
    soft = torch.tensor([[0.7, 0.3, 0.0, 0.0]])
    expected_soft = -((0.9 * soft[0] + 0.025) * logp).sum()
    assert policy._criterion(logits, soft).item() == pytest.approx(expected_soft.item(), rel=1e-6)


def test_ema_update_by_hand_with_warmup_decay():
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 1.0)
    ema = ExponentialMovingAverage(model, decay=0.9)
    assert ema.module.weight.item() == 1.0
    model.weight.data.fill_(3.0)
    ema.update_parameters(model)  # first update copies: AveragedModel starts from the first seen weights
    assert ema.module.weight.item() == pytest.approx(3.0)
    model.weight.data.fill_(5.0)
    ema.update_parameters(model)  # n=1: decay min(0.9, 2/11) = 0.1818...
    d1 = 2 / 11
    w = d1 * 3.0 + (1 - d1) * 5.0
    assert ema.module.weight.item() == pytest.approx(w)
    for n in range(2, 100):
        model.weight.data.fill_(float(n))
        ema.update_parameters(model)
        w = ema.current_decay(n) * w + (1 - ema.current_decay(n)) * n
    assert ema.current_decay(99) == 0.9 and ema.current_decay(79) < 0.9  # (1+n)/(10+n) reaches 0.9 at n=80
    assert ema.module.weight.item() == pytest.approx(w, rel=1e-6)


def test_ema_averages_batchnorm_statistics_too():
    model = nn.BatchNorm1d(2)
    ema = ExponentialMovingAverage(model, decay=0.5)
    model.running_mean.fill_(4.0)
    ema.update_parameters(model)
    model.running_mean.fill_(8.0)
    ema.update_parameters(model)
    d = min(0.5, 2 / 11)
    assert torch.allclose(ema.module.running_mean, torch.full((2,), d * 4.0 + (1 - d) * 8.0))


def test_progressive_resize_schedule():
    preset = TrainPreset(128)
    schedule = ProgressiveResize(preset, start_size=96, end_size=128, ramp_epochs=[2, 4])
    assert [schedule.size_at(e) for e in range(1, 7)] == [96, 96, 112, 128, 128, 128]
    odd = ProgressiveResize(preset, start_size=64, end_size=128, ramp_epochs=[0, 5])
    # 64 + (e / 5) x 64 px, rounded down to a multiple of 16: 76.8 -> 64, 89.6 -> 80, 102.4 -> 96, 115.2 -> 112
    assert [odd.size_at(e) for e in range(1, 6)] == [64, 80, 96, 112, 128]
    schedule(3)
    assert preset.image_size == 112
    with pytest.raises(ValueError, match='ramp_epochs'):
        ProgressiveResize(preset, 96, 128, [4, 2])
    assert ProgressiveResize.from_scale(preset, 0.75, 128, [2, 4]).start_size == 96
    assert ProgressiveResize.from_scale(preset, 0.75, 64, [2, 4]).start_size == 48
    assert ProgressiveResize.from_scale(preset, 0.1, 64, [2, 4]).start_size == 16  # never below one multiple


def test_tta_views_and_probability_average():
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float).view(2, 3, 16, 16)
    views = tta_views(images, flip=True, scales=[1.5])
    assert [tuple(v.shape[-2:]) for v in views] == [(16, 16), (16, 16), (24, 24)]
    assert torch.equal(views[1][..., 0], images[..., -1])
    a = torch.tensor([[2.0, 0.0]])
    b = torch.tensor([[0.0, 1.0]])
    pa, pb = torch.softmax(a, 1), torch.softmax(b, 1)
    avg = average_probabilities([a, b])
    assert torch.allclose(avg.exp(), (pa + pb) / 2)
    # cross-entropy on it is the loss of the averaged probabilities
    assert F.cross_entropy(avg, torch.tensor([1])).item() == pytest.approx(-math.log((pa[0, 1] + pb[0, 1]) / 2))


def test_tta_on_inputs_that_are_not_images_is_refused():
    with pytest.raises(ValueError, match=r'needs image batches \(N x C x H x W\), got inputs of shape \(8, 2\)'):
        tta_views(torch.randn(8, 2), flip=True, scales=[])
    assert len(tta_views(torch.randn(8, 2), flip=False, scales=[])) == 1  # no TTA: any input passes


def test_eval_outputs_for_model_and_average_with_tta():
    flip_sensitive = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    images = torch.rand(5, 3, 4, 4)
    out = eval_outputs({'': flip_sensitive, 'ema': flip_sensitive}, images, flip=True, scales=[])
    assert set(out) == {'logit', 'logit_tta', 'logit_ema', 'logit_ema_tta'}
    expected = average_probabilities([flip_sensitive(images), flip_sensitive(images.flip(-1))])
    assert torch.allclose(out['logit_tta'], expected, atol=1e-6)
    assert torch.equal(out['logit'], flip_sensitive(images))


def test_metric_reports_each_variant_and_skips_ignored_samples():
    metric = ImageClassificationMetric()
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    wrong = torch.tensor([[0.0, 5.0], [0.0, 5.0], [0.0, 5.0]])
    labels = torch.tensor([0, 1, IGNORE_LABEL])  # the third is an unreadable val file's placeholder
    result = metric.reduce_mean([metric.eval({'logit': logits, 'logit_tta': wrong}, labels)])
    assert result['samples'] == 2
    assert result['acc1'] == 100.0 and result['acc1_tta'] == 50.0
    assert result['loss_tta'] == pytest.approx((F.cross_entropy(wrong[:2], labels[:2])).item(), rel=1e-6)
    diag = DiagnosticMetric('acc1_tta', 2, sampler=[7, 8, 9])
    diag.reduce_mean([diag.eval({'logit': logits, 'logit_tta': wrong}, labels)])
    assert diag.last_diagnostics.confusion.sum() == 2
    assert diag.gt({'acc1_tta': 60.0}, {'acc1_tta': 50.0})


def test_policy_eval_gives_tta_and_ema_variants_and_ema_is_checkpointed():
    policy = make_policy(eval=dict(tta=dict(flip=True, scales=[])), ema=dict(enabled=True, decay=0.5, every_n_iters=1))
    batch = fixed_batch()
    for _ in range(3):
        policy.learn_mode.forward(batch)
    out = policy.eval_mode.forward(batch[0])
    assert set(out) == {'logit', 'logit_tta', 'logit_ema', 'logit_ema_tta'}
    assert not torch.allclose(out['logit'], out['logit_ema'])  # the average lags behind the trained weights
    state = policy.learn_mode.state_dict()
    fresh = make_policy(ema=dict(enabled=True, decay=0.5, every_n_iters=1))
    fresh.learn_mode.load_state_dict(state)
    for a, b in zip(fresh._ema.module.state_dict().values(), policy._ema.module.state_dict().values()):
        assert torch.equal(a, b)
    plain = make_policy()
    with pytest.raises(ValueError, match='no EMA weights'):
        make_policy(ema=dict(enabled=True, decay=0.5, every_n_iters=1)).learn_mode.load_state_dict(
            plain.learn_mode.state_dict())


def test_policy_trains_on_mixed_batches():
    torch.manual_seed(0)
    policy = make_policy(mix=dict(mixup_alpha=0.2, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, stop_epoch=None))
    mixer, mixed, seen = policy._mixer, [], []

    def recording_mixer(images, target, epoch):
        mixed.append(mixer(images, target, epoch))
        return mixed[-1]

    policy._mixer = recording_mixer
    policy._model.register_forward_hook(lambda module, inputs, logits: seen.append((inputs[0], logits.detach())))
    batch = fixed_batch()
    out = policy.learn_mode.forward(batch)
    (images, target), = mixed
    (model_input, logits), = seen
    assert torch.equal(model_input, images) and not torch.equal(images, batch[0].float())  # the model saw the mix
    assert target.shape == (8, 4) and torch.allclose(target.sum(dim=1), torch.ones(8))
    assert (target > 0).sum(dim=1).max() == 2  # each row: its own class and its partner's
    # the loss and accuracy of the step are those of the logits against the soft targets, by hand
    assert out['loss'] == pytest.approx(-(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean().item(), rel=1e-5)
    assert out['acc1'] == pytest.approx(100.0 * (logits.argmax(1) == target.argmax(1)).float().mean().item())


def test_resnet_d_and_blur_pool_structure():
    plain, d = create_model('resnet18', 10), create_model('resnet18d', 10)
    stem = d.backbone.conv1
    assert [m.kernel_size for m in stem if isinstance(m, nn.Conv2d)] == [(3, 3)] * 3
    shortcut = d.backbone.layer2[0].downsample
    assert isinstance(shortcut[0], nn.AvgPool2d) and shortcut[1].stride == (1, 1)
    extra = sum(p.numel() for p in d.parameters()) - sum(p.numel() for p in plain.parameters())
    # stem: 3x3 convs 3->32, 32->32, 32->64 and two BN(32) replace the 7x7 3->64 conv
    assert extra == (27 * 32 + 288 * 32 + 288 * 64 + 4 * 32) - 147 * 64
    blurred = create_model('resnet18', 10, blur_pool=True)
    wrapped = [m for m in blurred.modules() if isinstance(m, BlurConv2d)]
    assert len(wrapped) == 6  # layer2-4: the strided 3x3 conv and the strided 1x1 shortcut of each first block
    blur = BlurPool(1)
    impulse = torch.zeros(1, 1, 5, 5)
    impulse[0, 0, 2, 2] = 16.0
    assert torch.equal(blur(impulse)[0, 0, 1:4, 1:4], torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]))


def test_activation_option_swaps_every_relu_of_a_resnet():
    silu = create_model('resnet18', 10, activation='silu')
    kinds = {type(m) for m in silu.modules()}
    assert nn.SiLU in kinds and nn.ReLU not in kinds
    # bn1's + one shared module in each of the 8 basic blocks of torchvision's ResNet-18
    assert sum(isinstance(m, nn.SiLU) for m in silu.modules()) == 1 + 8
    # timm's ResNet-D takes it as act_layer: 2 in the deep stem, bn1's, two modules in each basic block
    timm_silu = create_model('resnet18d', 10, activation='silu')
    assert sum(isinstance(m, nn.SiLU) for m in timm_silu.modules()) == 2 + 1 + 2 * 8
    assert not any(isinstance(m, nn.ReLU) for m in timm_silu.modules())
    block = silu.backbone.layer1[0].relu
    x = torch.tensor([-1.0, 0.0, 2.0])
    assert torch.allclose(block(x.clone()), x / (1 + torch.exp(-x)))  # x * sigmoid(x): -0.2689, 0, 1.7616
    for own in ('relu', None):  # None: the policy config's default, "the model's own"
        same = create_model('resnet18', 10, activation=own)
        assert sum(isinstance(m, nn.ReLU) for m in same.modules()) == 1 + 8
    with pytest.raises(ValueError, match="activation must be one of .*'gelu'"):
        create_model('resnet18', 10, activation='gelu')


def test_loader_follows_the_progressive_resize_schedule_in_persistent_workers(tiny_image_folder):
    from dizoo_imgcls.config import default_config
    from dizoo_imgcls.data import build_loaders

    data_cfg = default_config().data
    data_cfg.update(root=tiny_image_folder, image_size=48, num_workers=2, auto_augment='trivialaugment',
                    progressive_resize=dict(start_scale=0.33, ramp_epochs=[1, 3]))
    data = build_loaders(data_cfg, batch_size=8, eval_batch_size=8)
    sizes = {}
    for epoch in (1, 2, 3, 2):
        data.train_sampler.set_epoch(epoch)
        shapes = {tuple(images.shape[-2:]) for images, _ in data.train_loader}
        sizes.setdefault(epoch, shapes)
        assert shapes == sizes[epoch]  # the same epoch gives the same size every time it is seen
    assert sizes == {1: {(16, 16)}, 2: {(32, 32)}, 3: {(48, 48)}}
    assert {tuple(images.shape[-2:]) for images, _ in data.val_loader} == {(48, 48)}


def test_auto_augment_is_reproduced_per_sample_seed():
    from dizoo_imgcls.data.sampler import EpochSeededDataset

    class Source(torch.utils.data.Dataset):
        preset = TrainPreset(24, auto_augment='randaugment', magnitude=15)

        def __len__(self):
            return 4

        def __getitem__(self, index):
            g = torch.Generator().manual_seed(index)
            return self.preset(torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()), index

    a, b = EpochSeededDataset(Source(), seed=3), EpochSeededDataset(Source(), seed=3)
    assert torch.equal(a[5][0], b[5][0])  # epoch 1, sample 1: same seed, same RandAugment ops
    assert not torch.equal(a[5][0], a[1][0])  # epoch 0 vs epoch 1 of the same image differ
    with pytest.raises(ValueError, match='auto_augment'):
        TrainPreset(24, auto_augment='autoaugment')


def test_a_variant_metric_key_needs_its_variant_and_bad_settings_fail_before_training():
    from dizoo_imgcls.config import default_config
    from dizoo_imgcls.config import check_run_settings

    cfg = default_config()
    for key, value, message in (('exp_name', 123, 'exp_name must be a non-empty string'),
                                ('eval_every', 0, 'eval_every must be a positive'),
                                ('policy.eval.metric_key', 'top1', 'metric_key must be one of acc1, acc5, loss')):
        bad = default_config()
        *path, last = key.split('.')
        node = bad
        for part in path:
            node = node[part]
        node[last] = value
        with pytest.raises(ValueError, match=message):
            check_run_settings(bad)
    cfg.policy.eval.metric_key = 'acc1_ema'
    with pytest.raises(ValueError, match='ema.enabled=True'):
        check_run_settings(cfg)
    cfg.policy.learn.ema.enabled = True
    check_run_settings(cfg)
    cfg.policy.eval.metric_key = 'acc1_ema_tta'
    with pytest.raises(ValueError, match='tta.flip=True'):
        check_run_settings(cfg)
    cfg.policy.eval.tta.flip = True
    check_run_settings(cfg)


def val_probabilities(path, weights, scale_px):
    """Softmax of a checkpoint's model (or EMA) on its run's val images, as the run evaluates them (one batch,
    channels_last, its autocast): ``{'': plain, '_tta': mean over image, mirror, rescaled copy, 'labels': ...}``."""
    from dizoo_imgcls.data import build_datasets
    from dizoo_imgcls.policy.image_classification import resolve_amp_dtype
    from dizoo_imgcls.checkpoint import load_model_from_checkpoint

    model, config, _ = load_model_from_checkpoint(path, weights)
    model = model.to(memory_format=torch.channels_last)
    _, val_set = build_datasets(config['data'])
    images = torch.stack([val_set[i][0] for i in range(len(val_set))]).contiguous(memory_format=torch.channels_last)
    views = [images, images.flip(-1), F.interpolate(images.float(), size=(scale_px, scale_px), mode='bilinear',
                                                    align_corners=False).contiguous(memory_format=torch.channels_last)]
    amp = resolve_amp_dtype(config['policy']['learn']['amp'], 'cpu')
    with torch.no_grad(), torch.autocast('cpu', dtype=amp or torch.bfloat16, enabled=amp is not None):
        probs = [torch.softmax(model(view).float(), dim=1) for view in views]
    return {'': probs[0], '_tta': torch.stack(probs).mean(dim=0),
            'labels': torch.tensor([val_set[i][1] for i in range(len(val_set))])}


def accuracy_bounds(probs, labels, tie=1e-4):
    """Top-1 accuracy in %, counting an image whose two highest probabilities are within ``tie`` as either right or
    wrong (another order of the same float operations may break such a tie the other way): ``(low, high)``."""
    top = probs.topk(2, dim=1)
    right, unsure = top.indices[:, 0] == labels, top.values[:, 0] - top.values[:, 1] < tie
    return 100.0 * (right & ~unsure).sum().item() / len(labels), 100.0 * (right | unsure).sum().item() / len(labels)


@pytest.mark.slow  # > ~10 s on 2 cores
def test_short_run_with_every_technique_enabled(tiny_image_folder, tmp_path):
    """Everything at once through the entry: timm's ResNet-D with its anti-aliasing (BlurPool), RandAugment,
    progressive resizing, a larger test resolution, Mixup/CutMix, label smoothing, EMA, flip + multi-scale TTA
    deciding the best checkpoint."""
    from test_entry import run_tiny

    everything = ['policy.model.name=timm/resnet18d', 'policy.model.blur_pool=True', 'data.auto_augment=randaugment',
                  'data.progressive_resize.start_scale=0.5', 'data.progressive_resize.ramp_epochs=[1,2]',
                  'data.eval_image_size=40', 'policy.learn.mix.mixup_alpha=0.2', 'policy.learn.mix.cutmix_alpha=1.0',
                  'policy.learn.mix.stop_epoch=1', 'policy.learn.label_smoothing=0.1',
                  'policy.learn.ema.enabled=True', 'policy.learn.ema.decay=0.9', 'policy.eval.tta.flip=True',
                  'policy.eval.tta.scales=[1.25]', 'policy.eval.metric_key=acc1_ema_tta']
    result = run_tiny(tiny_image_folder, str(tmp_path), 'all', *[a for s in everything for a in ('--set', s)])
    summary = json.loads((tmp_path / 'all' / 'summary.json').read_text())
    assert summary['eval_samples'] == 15 and summary['model'] == 'timm/resnet18d'
    assert 'acc1_ema_tta' in result.stdout
    last, = (tmp_path / 'all' / 'ckpt').glob('epoch_2_iter_*.pth.tar')
    # The final evaluation (the summary's) is that of the last weights and of their EMA on the 15 val images at
    # 40 px, each without and with TTA (mean softmax over the image, its mirror and a 1.25x = 48 px copy): its
    # losses and accuracies, computed here.
    final = torch.load(last, weights_only=True)['history'][-1]
    for variant in ('', '_tta', '_ema', '_ema_tta'):
        assert summary['acc1' + variant] == final['acc1' + variant]
    for weights, prefix in (('model', ''), ('ema', '_ema')):
        probabilities = val_probabilities(str(last), weights, scale_px=48)
        labels = probabilities.pop('labels')
        for tta, probs in probabilities.items():
            variant = prefix + tta
            loss = -probs[torch.arange(len(labels)), labels].log().mean().item()
            assert final['loss' + variant] == pytest.approx(loss, rel=1e-4), variant
            low, high = accuracy_bounds(probs, labels)
            assert low <= final['acc1' + variant] <= high, (variant, low, high, final)
    state = torch.load(last, weights_only=True)
    assert int(state['policy']['ema']['n_averaged']) == state['last_iter']  # one EMA update per step
    assert len(state['history']) == 2  # the EMA + TTA metric decided the best checkpoint, TTA in every eval
    # the timm model comes back from its checkpoint for predict/export, with its anti-aliasing
    from dizoo_imgcls.checkpoint import load_model_from_checkpoint

    model, _, classes = load_model_from_checkpoint(str(last))
    assert type(model.backbone).__module__ == 'timm.models.resnet' and len(classes) == 3
    assert type(model.backbone.maxpool[1]).__name__ == 'ReplicatePadBlurPool2d'
    with torch.no_grad():
        restored = model.eval()(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert restored.shape == (2, 3) and torch.isfinite(restored).all()
    assert state['best']['metric']['acc1_ema_tta'] == max(h['acc1_ema_tta'] for h in state['history'])
