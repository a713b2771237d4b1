"""Training options that had no test of what they do: stop_value, eval_every, the best checkpoint by acc1 or by
loss (also across a resume), grad_clip_norm, bn_eval, Bottleneck ResNets with their zero-init, the fp16 gradient
scaler. The runs train the OVERFIT MLP in process (a fraction of a second each); where the point is how the run
reacts to a sequence of evaluation results, the results are scripted instead of hoped for from a few steps."""
import copy
import math
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dizoo_imgcls.checkpoint import load_checkpoint, step_checkpoints
from dizoo_imgcls.config import default_config
from dizoo_imgcls.metric import ImageClassificationMetric
from dizoo_imgcls.model import build_model_from_cfg, create_model
from dizoo_imgcls.policy import ImageClassificationPolicy
from dizoo_imgcls.train import train
from test_hardening_run import in_process_cfg
from test_policy import fixed_batch, make_policy


def script_results(monkeypatch, key, values):
    """From now on, evaluation i reports ``values[i]`` as ``key`` (the rest of each result is the real one); returns
    the values not used yet."""
    left = list(values)
    real = ImageClassificationMetric.reduce_mean

    def scripted(self, inputs):
        result = real(self, inputs)
        result[key] = left.pop(0)
        return result

    monkeypatch.setattr(ImageClassificationMetric, 'reduce_mean', scripted)
    return left


def run(tmp_path, exp, *overrides):
    torch.set_num_threads(1)  # the MLP's steps are tiny: threads only add overhead (conftest restores the count)
    return train(in_process_cfg(tmp_path, exp, 'checkpoint.keep_last=0', *overrides))


def train_log(summary):
    with open(os.path.join(summary['exp_dir'], 'train.log')) as f:
        return f.read()


def checkpoint_histories(summary):
    """``{epoch: [epochs in that epoch checkpoint's history]}``."""
    found = {}
    for path in step_checkpoints(os.path.join(summary['exp_dir'], 'ckpt')):
        state = load_checkpoint(path)
        found[state['position']['epoch']] = [h['epoch'] for h in state['history']]
    return found


# ----- the run's reactions to its evaluations -----
def test_a_run_stops_after_the_epoch_that_reaches_stop_value_and_says_so(tmp_path, monkeypatch):
    left = script_results(monkeypatch, 'acc1', [60.0, 95.0, 99.0, 99.0])
    summary = run(tmp_path, 'stop', 'policy.learn.train_epoch=4', 'policy.eval.evaluator.stop_value=90')
    assert summary['epochs'] == 2 and left == [99.0, 99.0]  # epoch 1 (60 < 90) went on, epoch 2 (95) stopped
    assert checkpoint_histories(summary) == {1: [1], 2: [1, 2]}  # no epoch 3 was trained
    assert 'stop_value 90 reached at epoch 2' in train_log(summary)
    assert summary['acc1'] == 95.0 and summary['best_epoch'] == 2
    # the stopping evaluation is the run's final one: the OVERFIT picture of the final model is written
    assert os.path.isfile(os.path.join(summary['exp_dir'], 'prediction.png'))


def test_eval_every_2_evaluates_the_even_epochs_and_the_last(tmp_path):
    summary = run(tmp_path, 'every2', 'policy.learn.train_epoch=5', 'eval_every=2')
    assert checkpoint_histories(summary) == {1: [], 2: [2], 3: [2], 4: [2, 4], 5: [2, 4, 5]}
    assert re.findall(r'eval epoch (\d+):', train_log(summary)) == ['2', '4', '5']
    history = load_checkpoint(step_checkpoints(os.path.join(summary['exp_dir'], 'ckpt'))[-1])['history']
    first_best = next(h['epoch'] for h in history if h['acc1'] == max(e['acc1'] for e in history))
    assert summary['epochs'] == 5 and summary['best_epoch'] == first_best


def test_metric_key_loss_keeps_the_lowest_loss_epoch_as_ckpt_best(tmp_path, monkeypatch):
    script_results(monkeypatch, 'loss', [0.9, 0.4, 0.7, 0.5])
    summary = run(tmp_path, 'loss', 'policy.learn.train_epoch=4', 'policy.eval.metric_key=loss')
    best = load_checkpoint(os.path.join(summary['exp_dir'], 'ckpt', 'ckpt_best.pth.tar'))
    assert best['position']['epoch'] == 2 and best['best']['metric']['loss'] == 0.4
    assert summary['best_epoch'] == 2 and summary['best_metrics']['loss'] == 0.4 and summary['loss'] == 0.5
    assert train_log(summary).count('saved ckpt_best') == 2  # epoch 1 (the first) and epoch 2 (lower); not 3, 4


def test_ckpt_best_is_never_replaced_by_a_worse_result_also_after_a_resume(tmp_path, monkeypatch):
    left = script_results(monkeypatch, 'acc1', [50.0, 80.0, 60.0, 70.0])
    summary = run(tmp_path, 'worse', 'policy.learn.train_epoch=4')
    path = os.path.join(summary['exp_dir'], 'ckpt', 'ckpt_best.pth.tar')
    best = load_checkpoint(path)
    assert best['position']['epoch'] == 2 and best['best']['metric']['acc1'] == 80.0
    assert summary['best_epoch'] == 2 and summary['best_acc1'] == 80.0
    assert train_log(summary).count('saved ckpt_best') == 2
    with open(path, 'rb') as f:
        written = f.read()
    assert left == []
    # Resumed after epoch 2, the run knows its best (80) from the checkpoint: epochs 3 and 4 (60, 70) stay below.
    left += [60.0, 70.0]
    epoch2 = [p for p in step_checkpoints(os.path.join(summary['exp_dir'], 'ckpt')) if 'epoch_2_' in p][0]
    again = run(tmp_path, 'worse', 'policy.learn.train_epoch=4', f'resume="{epoch2}"')
    assert again['exp_dir'] == summary['exp_dir'] and again['epochs'] == 4 and left == []
    assert again['best_epoch'] == 2 and again['best_acc1'] == 80.0
    with open(path, 'rb') as f:
        assert f.read() == written


# ----- what one step does -----
def flat_norm(tensors):
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)).item()


def gradients_by_hand(model, batch):
    """The cross-entropy gradients of a copy of ``model`` on ``batch``, in parameter order."""
    copy_ = copy.deepcopy(model)
    F.cross_entropy(copy_(batch[0]).float(), batch[1]).backward()
    return [p.grad.detach().clone() for p in copy_.parameters()]


def gradients_at_the_step(policy):
    """The gradients the optimizer steps with, recorded at each of its steps."""
    seen = []
    policy._optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append([p.grad.detach().clone() for p in policy._model.parameters()]))
    return seen


@pytest.mark.parametrize('limit_over_norm', [0.25, 4.0], ids=['clips', 'below_the_limit'])
def test_grad_clip_norm_scales_the_gradients_down_to_the_limit(limit_over_norm):
    batch = fixed_batch()
    torch.manual_seed(0)
    norm = flat_norm(gradients_by_hand(make_policy()._model, batch))
    torch.manual_seed(0)  # the same weights again
    policy = make_policy(grad_clip_norm=limit_over_norm * norm)
    by_hand = gradients_by_hand(policy._model, batch)
    assert flat_norm(by_hand) == pytest.approx(norm, rel=1e-6)
    stepped = gradients_at_the_step(policy)
    out = policy.learn_mode.forward(batch)
    assert out['grad_norm'] == pytest.approx(norm, rel=1e-3)  # reported: the norm before clipping
    factor = min(1.0, limit_over_norm)  # clip_grad_norm_: x limit / norm when above the limit, else untouched
    assert flat_norm(stepped[0]) == pytest.approx(factor * norm, rel=1e-3)
    for grad, reference in zip(stepped[0], by_hand):
        assert torch.allclose(grad, factor * reference, rtol=1e-3, atol=1e-3 * norm / 100)


def batchnorm_statistics(model):
    return {name: value.clone() for name, value in model.state_dict().items()
            if name.endswith(('running_mean', 'running_var', 'num_batches_tracked'))}


def test_bn_eval_keeps_batchnorm_statistics_while_the_weights_train():
    torch.manual_seed(0)
    policy = make_policy(bn_eval=True)
    model = policy._model
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    before_stats, before = batchnorm_statistics(model), copy.deepcopy(model.state_dict())
    assert len(before_stats) == 3 * n_bn == 3 * 20  # ResNet-18: bn1 + 2 per block x 8 + 3 shortcut BNs
    modes = []
    model.backbone.bn1.register_forward_pre_hook(lambda module, inputs: modes.append(module.training))
    for seed in range(2):
        policy.learn_mode.forward(fixed_batch(seed))
    assert modes == [False, False] and model.backbone.layer1[0].conv1.training  # only the BNs in eval mode
    after = model.state_dict()
    assert all(torch.equal(before_stats[k], after[k]) for k in before_stats)
    for trained in ('backbone.conv1.weight', 'backbone.bn1.weight', 'backbone.fc.weight'):  # BN's affine too
        assert not torch.equal(before[trained], after[trained]), trained
    # without bn_eval, the same steps move the statistics
    torch.manual_seed(0)
    control = make_policy()
    control.learn_mode.forward(fixed_batch(0))
    moved = batchnorm_statistics(control._model)
    assert not torch.equal(moved['backbone.bn1.running_mean'], before_stats['backbone.bn1.running_mean'])
    assert int(moved['backbone.bn1.num_batches_tracked']) == 1


# ----- Bottleneck ResNets -----
def bottlenecks(model):
    return [m for m in model.modules() if type(m).__name__ == 'Bottleneck']


def block_is_identity(block):
    """A block whose residual branch adds nothing returns its shortcut through the final ReLU."""
    x = torch.rand(2, block.conv1.in_channels, 8, 8)  # non-negative, as after the previous block's ReLU
    with torch.no_grad():
        shortcut = block.downsample(x) if block.downsample is not None else x
        return torch.equal(block(x), torch.relu(shortcut))


@pytest.mark.parametrize('name', ['resnet50', 'resnet50d', 'timm/resnet50d'])
def test_bottleneck_resnets_build_and_start_every_block_as_identity(name):
    model_cfg = dict(default_config().policy.model, name=name, num_classes=7)  # the policy's zero_init_residual=True
    model = build_model_from_cfg(model_cfg).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 7)
    blocks = bottlenecks(model)
    assert len(blocks) == 3 + 4 + 6 + 3 and sum(b.downsample is not None for b in blocks) == 4
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)  # the last BN of each residual branch
    assert all(block_is_identity(b) for b in blocks)
    plain = create_model(name, 7, zero_init_residual=False).eval()  # the check can fail: MSRA's unit BN weights
    assert all(torch.all(b.bn3.weight == 1) for b in bottlenecks(plain))
    assert not any(block_is_identity(b) for b in bottlenecks(plain))


# ----- fp16 -----
@pytest.mark.skipif(not torch.cuda.is_available(), reason='fp16 autocast with a gradient scaler needs a GPU')
def test_fp16_step_goes_through_the_gradient_scaler_on_cuda():
    torch.manual_seed(0)
    cfg = default_config().policy
    cfg.cuda = True
    cfg.model.num_classes = 4
    cfg.learn.update(dict(batch_size=8, train_epoch=2, iters_per_epoch=5, warmup_epochs=0, amp='fp16',
                          lr_per_256=3.2, weight_decay=1e-4))
    policy = ImageClassificationPolicy(cfg, enable_field=['learn', 'eval'])
    assert isinstance(policy._scaler, torch.amp.GradScaler)
    assert 'float16 autocast + gradient scaler' in policy.describe_compute()
    batch = fixed_batch()
    fp32_norm = flat_norm(gradients_by_hand(policy._model, [t.cuda() for t in batch]))
    dtypes = []
    policy._model.backbone.fc.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    before, scale = policy._model.backbone.conv1.weight.detach().clone(), policy._scaler.get_scale()
    out = policy.learn_mode.forward(batch)
    assert dtypes == [torch.float16] and math.isfinite(out['loss'])
    moved = not torch.equal(before, policy._model.backbone.conv1.weight.detach())
    if math.isfinite(out['grad_norm']):
        # the optimizer stepped on unscaled gradients (x 65536 would be far off the fp32 norm); the scale stays
        assert moved and policy._scaler.get_scale() == scale
        assert out['grad_norm'] == pytest.approx(fp32_norm, rel=0.05)
    else:  # the scaled fp16 gradients overflowed: the step was skipped and the scale halved
        assert not moved and policy._scaler.get_scale() == scale / 2
    assert policy.learn_mode.state_dict()['grad_scaler']['scale'] == policy._scaler.get_scale()
