"""End to end on real images: 3 Imagenette classes at 64 px through the entry, DI-engine learner and evaluator."""
import json

import pytest

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import make_subset
from test_entry import run_entry

CLASSES = ['n01440764', 'n03028079', 'n03888257']  # tench, church, parachute
REQUIRED_TAGS = {'train/loss', 'train/lr', 'train/acc1', 'train/img_per_sec', 'eval/acc1', 'eval/acc5', 'eval/loss'}


def test_three_class_imagenette_trains_well_above_chance(imagenette_root, tmp_path):
    root = make_subset(imagenette_root, str(tmp_path / 'data'), CLASSES, {'train': 260, 'val': 50})
    result = run_entry(
        '--config', 'config/imagenette_res18_config.py', '--data-root', root, '--exp-name', 'subset',
        '--set', f'output_dir={tmp_path / "runs"}', '--set', 'data.image_size=64',
        '--set', 'policy.learn.train_epoch=8', '--set', 'policy.learn.batch_size=32',
        '--set', 'policy.learn.warmup_epochs=1', '--set', 'log_every=5')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    exp = tmp_path / 'runs' / 'subset'
    summary = json.loads((exp / 'summary.json').read_text())
    assert summary['eval_samples'] == 150 and summary['num_classes'] == 3
    assert summary['acc1'] >= 65.0, summary  # chance is 33.3%
    assert summary['best_acc1'] >= summary['acc1']
    assert (exp / 'ckpt' / 'ckpt_best.pth.tar').stat().st_size > 1_000_000

    events = EventAccumulator(str(exp / 'tb'))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    assert REQUIRED_TAGS <= tags, REQUIRED_TAGS - tags
    eval_acc = [e.value for e in events.Scalars('eval/acc1')]
    assert len(eval_acc) == 8 and eval_acc[-1] == pytest.approx(summary['acc1'], abs=1e-4)
