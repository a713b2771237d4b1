"""The learning-rate finder: smoothing, early stop and suggestion on hand-made curves, then the real command."""
import csv
import importlib.util
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dizoo_imgcls.lr_find import (DEFAULT_END_LR, DEFAULT_START_LR, DEFAULT_STEPS, exp_lrs, group_lr_factors, set_lr,
                                  suggest, sweep)
from dizoo_imgcls.policy.optim import build_lr_scheduler
from test_entry import ENTRY, run_entry


def run_curve(losses, lrs, beta):
    """Sweep with a 'training step' that returns the next hand-made loss; also the LRs it was called with."""
    seen = []

    def step(lr):
        seen.append(lr)
        return losses[len(seen) - 1]

    return sweep(lrs, step, beta=beta), seen


def test_exp_lrs_are_geometric_from_start_to_end():
    lrs = exp_lrs(1e-4, 1e2, 61)
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e2) and len(lrs) == 61
    assert np.allclose(np.array(lrs[1:]) / np.array(lrs[:-1]), 10 ** 0.1)


def test_smoothing_is_bias_corrected_ema():
    points, _ = run_curve([1.0, 3.0, 3.0], exp_lrs(1e-3, 1e-1, 3), beta=0.98)
    # Bias correction: the first value is the loss itself, then the 0.98-weighted mean of all losses so far.
    assert [p.smoothed for p in points][:2] == pytest.approx([1.0, (0.98 * 1 + 3) / 1.98])
    assert points[2].smoothed == pytest.approx((0.98 ** 2 * 1 + 0.98 * 3 + 3) / (0.98 ** 2 + 0.98 + 1))


def test_suggestion_and_early_stop_on_a_hand_made_curve():
    lrs = exp_lrs(1e-4, 1e2, 61)  # lr[i] = 1e-4 * 10**(i/10)
    # flat, then the steepest drop between steps 22 and 23 (-0.4), minimum 0.75 at step 30, then the blow-up:
    # 3.1 at step 36 is the first loss above 4 x 0.75.
    losses = [2.0] * 20 + [1.9, 1.8, 1.6, 1.2, 1.0, 0.9, 0.85, 0.8, 0.78, 0.76, 0.75,
                           0.8, 0.9, 1.2, 1.8, 2.5, 3.1] + [50.0] * 24
    points, seen = run_curve(losses, lrs, beta=0.0)  # beta 0: smoothed == loss, so indices are exact by hand
    assert len(points) == 37 and seen == lrs[:37]  # stopped at step 36; no step after the divergence
    assert [p.smoothed for p in points] == losses[:37]
    s = suggest(points, skip_start=61 // 10)  # window: steps 6..31 (the last 5 are dropped)
    assert s.steep_step == 22 and s.steep_lr == pytest.approx(10 ** -1.8)
    assert s.min_step == 30 and s.min_lr_div10 == pytest.approx(1e-2)


def test_early_stop_with_real_smoothing_and_on_nan():
    lrs = exp_lrs(1e-5, 1.0, 30)
    points, seen = run_curve([1.0] * 10 + [1000.0] * 20, lrs, beta=0.98)
    weights = 0.98 ** np.arange(11)  # step 10: (1000 + sum 0.98**j, j=1..10) / sum 0.98**j, j=0..10 = 101.3
    assert len(seen) == 11 and points[-1].smoothed == pytest.approx((1000 + weights[1:].sum()) / weights.sum())
    points, seen = run_curve([1.0] * 5 + [float('nan')] * 25, lrs, beta=0.98)
    assert len(seen) == 6 and math.isnan(points[-1].smoothed)
    assert suggest(points, skip_start=0).steep_step < 5  # the NaN point is never suggested


def test_group_lrs_keep_their_ratio_through_scheduler_steps():
    head, backbone = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([dict(params=[head], lr=0.4), dict(params=[backbone], lr=0.04)], lr=0.4)
    scheduler = build_lr_scheduler(optimizer, 'cosine', total_iters=10, warmup_iters=5)  # warmup: lrs x 0.01
    factors = group_lr_factors(optimizer)
    assert factors == pytest.approx([1.0, 0.1])
    for lr in (1e-3, 2e-3):
        set_lr(optimizer, factors, lr)
        assert [g['lr'] for g in optimizer.param_groups] == pytest.approx([lr, lr * 0.1])
        optimizer.step()
        scheduler.step()  # changes the lrs; set_lr puts them back before the next step


def read_csv(path):
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.mark.slow  # > ~10 s on 2 cores
def test_lr_find_command_writes_csv_plot_tensorboard_and_suggestion(tiny_image_folder, tmp_path):
    start, end, steps, batch = 1e-6, 10.0, 30, 8
    result = run_entry('--data-root', tiny_image_folder, '--exp-name', 'tiny', '--lr-find',
                       '--lr-find-start', str(start), '--lr-find-end', str(end), '--lr-find-steps', str(steps),
                       '--set', f'output_dir={tmp_path}', '--set', 'data.image_size=32', '--set',
                       f'policy.learn.batch_size={batch}', '--set', 'data.num_workers=0', '--set',
                       'policy.learn.backbone_lr_factor=0.1', '--set', 'policy.learn.freeze_backbone_epochs=2')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'sweeping with the whole network trained' in result.stdout  # not the head alone
    exp = tmp_path / 'tiny_lr_find'
    assert not (tmp_path / 'tiny').exists() and not (exp / 'ckpt').exists()  # nothing of a training run

    rows = read_csv(exp / 'lr_find.csv')
    lrs = np.array([r['lr'] for r in rows])
    assert 5 <= len(rows) <= steps and [r['step'] for r in rows] == list(range(len(rows)))
    assert lrs[0] == pytest.approx(start)
    assert np.allclose(lrs[1:] / lrs[:-1], (end / start) ** (1 / (steps - 1)))  # geometric, increasing
    assert np.allclose([r['lr_per_256'] for r in rows], lrs * 256 / batch)

    smoothed, average = [], 0.0  # fastai's smoothing, recomputed from the raw losses
    for i, row in enumerate(rows):
        average = 0.98 * average + 0.02 * row['loss']
        smoothed.append(average / (1 - 0.98 ** (i + 1)))
    assert np.allclose(smoothed, [r['smoothed_loss'] for r in rows], equal_nan=True)
    diverged = [math.isnan(s) or s > 4 * np.nanmin(smoothed[:i + 1]) for i, s in enumerate(smoothed)]
    assert not any(diverged[:-1]) and (diverged[-1] or len(rows) == steps)

    finite = sum(math.isfinite(s) for s in smoothed)  # a NaN can only be the last point
    window = slice(steps // 10, finite - 5)  # drop the first 10% and the last 5 points, as fastai
    win_lr, win_smooth = lrs[window], np.array(smoothed[window])
    steep_lr = win_lr[np.argmin(np.diff(win_smooth) / np.diff(np.log(win_lr)))]
    min_lr = win_lr[np.argmin(win_smooth)] / 10
    out = result.stdout
    assert f'steepest descent (suggested): lr {steep_lr:.3g} = lr_per_256 {steep_lr * 256 / batch:.3g}' in out
    assert re.search(rf'min loss / 10: +lr {min_lr:.3g} = lr_per_256 {min_lr * 256 / batch:.3g}', out)
    assert f'--set policy.learn.lr_per_256={steep_lr * 256 / batch:.3g}' in out

    assert (exp / 'lr_find.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with Image.open(exp / 'lr_find.png') as png:
        assert png.width > 100 and png.height > 100
    events = EventAccumulator(str(exp / 'tb'), size_guidance={'images': 0, 'scalars': 0})
    events.Reload()
    assert {'lr_find/loss', 'lr_find/smoothed_loss'} <= set(events.Tags()['scalars'])
    assert 'lr_find/plot' in events.Tags()['images']
    assert [e.step for e in events.Scalars('lr_find/smoothed_loss')] == list(range(len(rows)))


@pytest.mark.parametrize('extra, message', [
    (['--lr-find-steps', '1'], '--lr-find-steps must be at least 2'),
    (['--lr-find-start', '1', '--lr-find-end', '0.5'], '--lr-find-end must be'),
    (['--resume', 'auto'], 'cannot resume'),
    (['--check-data'], 'drop --eval-only and --check-data'),
])
def test_bad_lr_find_input_is_one_line_and_exit_2(tiny_image_folder, tmp_path, capsys, extra, message):
    # In-process (main's return value is the exit status): these fail before any training step.
    code = entry_main()('--data-root', tiny_image_folder, '--lr-find', '--set', f'output_dir={tmp_path}', *extra)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / 'experiment_lr_find').exists()  # refused before any folder is made


def test_lr_find_options_without_lr_find_are_refused(tmp_path, capsys):
    assert entry_main()('--demo', '--lr-find-steps', '10', '--set', f'output_dir={tmp_path}') == 2
    assert 'only apply with --lr-find' in capsys.readouterr().err


def test_help_states_the_real_sweep_defaults(capsys):
    with pytest.raises(SystemExit):
        load_entry().parse_args(['--help'])
    help_text = ' '.join(capsys.readouterr().out.split())
    for flag, value in (('start', DEFAULT_START_LR), ('end', DEFAULT_END_LR), ('steps', DEFAULT_STEPS)):
        match = re.search(rf'--lr-find-{flag} \w+ --lr-find: [^(]*\(default ([^)]+)\)', help_text)
        assert match and float(match.group(1)) == value, flag


def load_entry():
    spec = importlib.util.spec_from_file_location('_entry_imagenet_res18_main', ENTRY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry_main():
    return lambda *argv: load_entry().main(list(argv))
