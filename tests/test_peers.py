"""benchmarks/peers.py end to end on the generated 3-class folder: our default recipe and fastai's Imagenette recipe
(xresnet18), one epoch at 32 px, the peer held to our wall time; and the peer script's budget cut on its own.
fastai is an optional extra ('.[peers]'): without it these tests skip."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip('fastai', reason="fastai is not installed (optional extra: pip install -e '.[peers]')")
pytestmark = pytest.mark.slow

PEERS = os.path.join(REPO, 'benchmarks', 'peers.py')
PEER = os.path.join(REPO, 'benchmarks', '_fastai_imagenette.py')


def test_peers_reports_ours_and_fastai_with_consistent_ratios(tiny_image_folder, tmp_path):
    out_file = tmp_path / 'result.json'
    cmd = [sys.executable, PEERS, '--data-root', tiny_image_folder, '--epochs', '1', '--size', '32', '--device', 'cpu',
           '--arch', 'xresnet18', '--set', 'policy.learn.batch_size=8', '--set', 'data.num_workers=0',
           '--peer-arg=--bs=8', '--peer-arg=--workers=0', '--raw-warmup', '1', '--raw-steps', '2',
           '--output-dir', str(tmp_path / 'runs'), '--out', str(out_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # stdout holds the JSON only; the runs' logs go to stderr
    assert result == json.loads(out_file.read_text())
    assert result['peer_budget'] == 'ours' and result['versions']['fastai']
    ours, peer, ratios = result['ours'], result['peers']['xresnet18'], result['ratios']['xresnet18']

    assert ours['model'] == 'timm/resnet18d' and ours['precision'] == 'fp32' and ours['epochs'] == 1
    assert 0 <= peer['top1'] <= peer['top5'] <= 100 and peer['top5_k'] == 3  # top-5 of 3 classes: top-3
    assert peer['eval_samples'] == 3 * 5 and peer['train_images'] == 3 * 12 + 1 and peer['num_classes'] == 3
    assert peer['images_trained'] == 32  # 37 images, batch 8, fastai drops the last partial training batch
    assert peer['train_img_per_sec'] == pytest.approx(peer['images_trained'] / (peer['train_minutes'] * 60), rel=0.1)
    assert (peer['precision'], peer['channels_last'], peer['num_workers']) == ('fp32', True, 0)
    assert peer['raw_step']['batch_size'] == 8 and peer['raw_step']['image_size'] == 32 and peer['raw_img_per_sec'] > 0
    from fastai.vision.models.xresnet import xresnet18
    assert peer['params'] == sum(p.numel() for p in xresnet18(n_out=3).parameters())
    assert peer['wall_minutes'] > 0 and peer['peak_rss_largest_process_mb'] > 0

    # held to our wall: the budget is our measured wall, and one epoch (the recipe's all) fitted or was forced
    budget = peer['budget']
    assert budget['budget_seconds'] == pytest.approx(ours['wall_minutes'] * 60, abs=0.2)
    assert peer['epochs_trained'] == budget['epochs_trained'] == 1 and budget['epoch_seconds_estimate'] > 0
    assert peer['within_our_wall'] == (peer['wall_minutes'] <= ours['wall_minutes'])
    # all epochs trained: the full-schedule time is this run's, less the probe a full run does without
    assert peer['projected_full_schedule_wall_minutes'] == pytest.approx(
        peer['script_wall_minutes'] - budget['probe_seconds'] / 60, abs=0.01)

    assert ratios['top5_ours_over_peer'] == pytest.approx(ours['top5'] / peer['top5'], abs=1e-3)
    if peer['top1']:
        assert ratios['top1_ours_over_peer'] == pytest.approx(ours['top1'] / peer['top1'], abs=1e-3)
    assert ratios['speedup_wall_peer_over_ours'] == pytest.approx(peer['wall_minutes'] / ours['wall_minutes'],
                                                                  abs=1e-3)
    assert ratios['train_img_per_sec_ours_over_peer'] == pytest.approx(
        ours['train_img_per_sec'] / peer['train_img_per_sec'], abs=1e-3)
    assert ratios['raw_img_per_sec_ours_over_peer'] == pytest.approx(
        ours['raw_img_per_sec'] / peer['raw_img_per_sec'], abs=1e-3)


def test_peer_over_budget_trains_one_epoch_and_projects_the_full_schedule(tiny_image_folder, tmp_path):
    """A budget shorter than the imports: no epoch fits, one is trained (a 1-epoch flat-cos schedule), and the
    full 3-epoch time is projected from its measured fit time."""
    out = tmp_path / 'peer.json'
    cmd = [sys.executable, PEER, '--data-root', tiny_image_folder, '--arch', 'xresnet18', '--epochs', '3',
           '--size', '32', '--bs', '8', '--workers', '0', '--budget-seconds', '0.5', '--probe-batches', '1',
           '--out', str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peer = json.loads(out.read_text())
    assert peer['budget']['epochs_that_fit'] <= 0 and peer['epochs_trained'] == 1 and peer['epochs_recipe'] == 3
    assert peer['images_trained'] == 32
    expected = peer['script_wall_minutes'] - peer['budget']['probe_seconds'] / 60 + 2 * peer['fit_minutes']
    assert peer['projected_full_schedule_wall_minutes'] == pytest.approx(expected, abs=0.01)


def test_unknown_arch_is_refused_before_any_run(tiny_image_folder, tmp_path):
    proc = subprocess.run([sys.executable, PEERS, '--data-root', tiny_image_folder, '--arch', 'xse_resnext5O',
                           '--output-dir', str(tmp_path / 'runs')], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == ''
    assert "--arch 'xse_resnext5O' is not a model of fastai.vision.models.xresnet" in proc.stderr
    assert not (tmp_path / 'runs').exists()
