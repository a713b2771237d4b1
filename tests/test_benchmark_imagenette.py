"""benchmarks/imagenette.py end to end on the generated 3-class folder: ours and DI-engine's stock recipe, one
epoch at 32 px, and the JSON it reports."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torchvision

from conftest import REPO

BENCHMARK = os.path.join(REPO, 'benchmarks', 'imagenette.py')


@pytest.mark.slow  # > ~10 s on 2 cores
def test_benchmark_reports_both_runs_and_consistent_ratios(tiny_image_folder, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp('bench')
    out_file = out_dir / 'result.json'
    cmd = [sys.executable, BENCHMARK, '--data-root', tiny_image_folder, '--epochs', '1', '--size', '32',
           '--device', 'cpu', '--compare-stock', '--set', 'policy.learn.batch_size=8', '--set', 'data.num_workers=0',
           '--set', 'data.progressive_resize.start_scale=0.5',
           '--stock-arg=--num-workers=0', '--raw-warmup', '1', '--raw-steps', '2', '--output-dir', str(out_dir),
           '--out', str(out_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # stdout holds the JSON only; the runs' logs go to stderr
    assert result == json.loads(out_file.read_text())

    ours, stock, ratios = result['ours'], result['stock'], result['ratios']
    assert result['hardware']['cores'] >= 1 and result['hardware']['device'] == 'cpu'
    assert {'python', 'torch', 'torchvision', 'DI-engine', 'dizoo_imgcls_commit'} <= set(result['versions'])
    for run in (ours, stock):
        # exact accuracies over the 15 val images: whole images right (stock's rounded to 3 decimals)
        for key in ('top1', 'top5'):
            assert abs(run[key] * 15 / 100 - round(run[key] * 15 / 100)) < 1e-3, (key, run[key])
        assert run['top1'] <= run['top5']
        assert run['train_img_per_sec'] > 0 and run['wall_minutes'] > 0
        assert run['peak_rss_largest_process_mb'] > 0 and run['peak_rss_tree_sum_mb'] > 0
        assert str(out_dir) in run['exp_dir']
    assert ours['top5'] == 100.0  # 3 classes: the top 5 (clamped to 3) always holds the label
    # Every reported number is the run's own: ours from its summary.json, stock's speed from its image count.
    summary = json.loads((Path(ours['exp_dir']) / 'summary.json').read_text())
    assert (ours['top1'], ours['top5'], ours['top1_tta']) == (summary['acc1'], summary['acc5'], summary['acc1_tta'])
    assert (ours['train_img_per_sec'], ours['epochs'], ours['eval_samples']) == (
        summary['train_img_per_sec'], summary['epochs'], summary['eval_samples']) and summary['epochs'] == 1
    assert ours['raw_step']['batch_size'] == 8 and ours['raw_step']['timed_steps'] == 2
    assert ours['raw_step']['warmup_steps'] == 1
    assert 'top1_tta' in ours and ours['raw_img_per_sec'] > 0
    assert ours['model'] == 'timm/resnet18d' and ours['activation'] == 'silu' and ours['num_classes'] == 3
    # ResNet-D: torchvision's ResNet-18 with a stem of three 3x3 convs (3->32->32->64, two extra BN(32))
    stem_delta = (27 * 32 + 288 * 32 + 288 * 64 + 4 * 32) - 147 * 64
    assert ours['params'] == sum(p.numel() for p in torchvision.models.resnet18(num_classes=3).parameters()) + stem_delta
    # one epoch, progressive resizing from 16 px: the raw speed is measured where the run trained
    assert ours['train_sizes_by_epoch'] == [16] and list(ours['raw_img_per_sec_by_size']) == ['16']
    assert ours['efficiency'] == pytest.approx(ours['train_img_per_sec'] / ours['raw_img_per_sec'], abs=1e-3)
    assert stock['images_trained'] == stock['train_images'] == 3 * 12 + 1  # every image once, the grayscale PNG too
    # its speed is images / training time (train_minutes is rounded to 0.06 s)
    assert stock['train_img_per_sec'] == pytest.approx(stock['images_trained'] / (stock['train_minutes'] * 60),
                                                       rel=0.1)
    assert stock['eval_images'] == 3 * 5 and stock['num_outputs'] == 1000

    if stock['top1']:
        assert ratios['top1_ours_over_stock'] == pytest.approx(ours['top1'] / stock['top1'], abs=1e-3)
    else:  # one epoch at the stock warm-up LR (1e-4) rarely gets a val image right: no quotient then
        assert ratios['top1_ours_over_stock'] is None
    assert ratios['speedup_wall_stock_over_ours'] == pytest.approx(stock['wall_minutes'] / ours['wall_minutes'],
                                                                   abs=1e-3)
    assert ratios['train_img_per_sec_ours_over_stock'] == pytest.approx(
        ours['train_img_per_sec'] / stock['train_img_per_sec'], abs=1e-3)
