"""Seeing the training: progress bar vs plain lines, data-wait share and memory scalars, the diagnostic metric,
TensorBoard image panels, and summary.json provenance."""
import io
import json
import os
import re
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from ding.worker import MetricSerialEvaluator
from easydict import EasyDict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboardX import SummaryWriter

from conftest import REPO, free_port
from dizoo_imgcls import hooks
from dizoo_imgcls.data import ClassificationData, DataCapabilities, DistributedSampler, PixelMap
from dizoo_imgcls.hooks import TrainLoggerHook, use_progress_bar
from dizoo_imgcls.metric import DiagnosticMetric, EvalDiagnostics, Mistake
from dizoo_imgcls.runtime import setup_logging
from dizoo_imgcls.summary import config_sha256, git_commit, git_dirty, package_versions, peak_rss_mb
from dizoo_imgcls.tb_visuals import (IMAGE_TAGS, TensorBoardVisuals, confusion_image, image_grid, per_class_tags,
                                     spread_indices)
from test_entry import run_tiny


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_for_rank_0_on_an_interactive_terminal():
    assert use_progress_bar(Terminal(), 0, {'TERM': 'xterm'})
    assert not use_progress_bar(io.StringIO(), 0, {'TERM': 'xterm'})  # a pipe or file: plain lines
    assert not use_progress_bar(Terminal(), 1, {'TERM': 'xterm'})  # other ranks never draw
    assert not use_progress_bar(Terminal(), 0, {'TERM': 'xterm', 'CI': 'true'})
    assert not use_progress_bar(Terminal(), 0, {'TERM': 'dumb'})
    assert not use_progress_bar(object(), 0, {})  # no isatty at all


class RecordingWriter:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))

    def flush(self):
        pass


def run_hook(hook, iterations, monkeypatch, wall_s=1.0, step_s=0.75):
    """Feed the hook ``iterations`` steps of ``wall_s`` seconds each, ``step_s`` of them in the policy."""
    clock = iter(np.arange(0.0, wall_s * (iterations + 1), wall_s).tolist())
    monkeypatch.setattr(hooks, 'time', SimpleNamespace(perf_counter=lambda: next(clock)))  # the hook's clock only
    engine = SimpleNamespace(last_iter=SimpleNamespace(val=0), log_buffer={})
    hook.restart_clock()
    for i in range(iterations):
        engine.log_buffer['scalar'] = dict(loss=1.0 / (i + 1), acc1=50.0, lr=0.1, batch_size=8, step_time=step_s)
        hook(engine)
        engine.last_iter.val += 1


def test_plain_lines_epoch_summaries_and_train_scalars(tmp_path, capsys, monkeypatch):
    setup_logging(str(tmp_path))
    tb = RecordingWriter()
    hook = TrainLoggerHook(tb, log_every=2, total_iters=10, iters_per_epoch=5, progress_bar=False)
    run_hook(hook, 10, monkeypatch)
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if ' iter ' in line]) == 5  # iterations 2, 4, 6, 8, 10
    summaries = [line for line in lines if ' done in ' in line]
    assert len(summaries) == 2 and 'epoch 1 done in 0:00:05' in summaries[0]
    assert '8.0 img/s' in summaries[0] and 'data wait 25%' in summaries[0] and 'MiB' in summaries[0]
    assert '\r' not in ''.join(lines)
    assert [v for _, v in tb.scalars['train/data_wait_share']] == pytest.approx([0.25] * 5)
    assert [s for s, _ in tb.scalars['train/loss']] == [2, 4, 6, 8, 10]
    assert all(v > 10 for _, v in tb.scalars['train/peak_rss_mb'])  # a Python process with torch: > 10 MiB
    assert 'train/cuda_max_allocated_mb' not in tb.scalars  # no CUDA used
    assert hook.data_wait_share == pytest.approx(0.25) and hook.img_per_sec == pytest.approx(8.0)


def test_progress_bar_mode_one_bar_per_epoch_and_lines_only_in_the_log_file(tmp_path, capsys, monkeypatch):
    setup_logging(str(tmp_path))
    terminal = Terminal()
    hook = TrainLoggerHook(RecordingWriter(), log_every=2, total_iters=10, iters_per_epoch=5, progress_bar=True,
                           stream=terminal)
    run_hook(hook, 10, monkeypatch)
    bars = terminal.getvalue()
    assert 'epoch 1/2' in bars and 'epoch 2/2' in bars and '5/5' in bars
    assert 'img/s' in bars and 'eta' in bars and 'loss' in bars
    console = capsys.readouterr().out
    assert ' iter ' not in console and console.count(' done in ') == 2  # summaries only
    log_file = (tmp_path / 'train.log').read_text()
    assert log_file.count(' iter ') == 5 and log_file.count(' done in ') == 2


def test_hook_never_draws_on_other_ranks():
    assert not TrainLoggerHook(RecordingWriter(), 1, 10, 5, rank=1, progress_bar=True).progress_bar


def test_diagnostic_metric_confusion_and_most_confident_mistakes_by_dataset_index():
    sampler = DistributedSampler(6, num_replicas=2, rank=1, shuffle=False)  # this rank sees indices 1, 3, 5
    metric = DiagnosticMetric('acc1', num_classes=3, sampler=sampler, keep_mistakes=1)
    logits = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 5.0], [0.0, 4.0, 0.0]])
    for _ in range(2):  # a second pass starts from scratch
        result = metric.reduce_mean([metric.eval(logits[:2], torch.tensor([1, 0])),
                                     metric.eval(logits[2:], torch.tensor([2]))])
    assert result['acc1'] == pytest.approx(100 / 3)
    diagnostics = metric.last_diagnostics
    assert diagnostics.confusion.tolist() == [[0, 0, 1], [0, 1, 0], [0, 1, 0]]
    p_top = float(torch.softmax(logits[1], 0).max())
    assert diagnostics.mistakes == [Mistake(pytest.approx(p_top), 3, 0, 2)]  # 2nd sample of rank 1 = index 3
    accuracy = diagnostics.per_class_accuracy().tolist()
    assert accuracy[0] == 0.0 and accuracy[1] == 100.0 and accuracy[2] == 0.0


def test_diagnostic_metric_in_dingengine_evaluator_equals_the_plain_metric(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    loader = torch.utils.data.DataLoader(list(zip(torch.arange(10.0).view(10, 1), labels)), batch_size=4)

    class Policy:  # right on the first 6 samples, wrong on the rest, more confident the higher the index
        def forward(self, x):
            idx = x.view(-1).long()
            predicted = torch.where(idx < 6, labels[idx], (labels[idx] + 1) % 3)
            return torch.nn.functional.one_hot(predicted, 3) * (1.0 + idx.view(-1, 1))

        def reset(self):
            pass

    metric = DiagnosticMetric(num_classes=3, keep_mistakes=3)
    evaluator = MetricSerialEvaluator(EasyDict(eval_freq=1, stop_value=101.0, multi_gpu=False), [loader, metric],
                                      Policy(), exp_name='exp')
    _, result = evaluator.eval(None, train_iter=1)
    assert result['acc1'] == pytest.approx(60.0) and result['samples'] == 10
    assert metric.last_diagnostics.confusion.sum() == 10 and metric.last_diagnostics.confusion.trace() == 6
    assert [m.index for m in metric.last_diagnostics.mistakes] == [9, 8, 7]  # the 3 most confident of 6..9


def _two_rank_worker(rank, port, out_path):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    logits, labels = torch.randn(7, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    sampler = DistributedSampler(7, 2, rank, shuffle=False)
    shard = list(sampler)
    metric = DiagnosticMetric(num_classes=4, sampler=sampler, keep_mistakes=3)
    metric.reduce_mean([metric.eval(logits[shard], labels[shard])])
    if rank == 0:
        torch.save({'confusion': metric.last_diagnostics.confusion,
                    'mistakes': [m.index for m in metric.last_diagnostics.mistakes]}, out_path)
    dist.destroy_process_group()


def test_two_ranks_give_the_single_process_confusion_and_mistakes(tmp_path):
    # fork: the ranks start from this process's imports instead of paying ~5 s of CPU each for their own
    mp.start_processes(_two_rank_worker, args=(free_port(), str(tmp_path / 'out.pt')), nprocs=2, start_method='fork')
    two = torch.load(tmp_path / 'out.pt')
    metric = DiagnosticMetric(num_classes=4, keep_mistakes=3)
    logits, labels = torch.randn(7, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    metric.reduce_mean([metric.eval(logits, labels)])
    assert torch.equal(two['confusion'], metric.last_diagnostics.confusion)
    assert two['mistakes'] == [m.index for m in metric.last_diagnostics.mistakes]


def test_pictures_have_the_right_size_and_captions_do_not_blank_the_image():
    images = [np.full((32, 32, 3), 60 * i, np.uint8) for i in range(5)]
    grid = image_grid(images, ['a', 'b\nc', 'd', 'e', 'f'], columns=4, tile_px=64)
    assert grid.shape[1] == 4 * 64 + 3 * 2 and grid.dtype == np.uint8
    assert (grid[10:50, 66 + 10:66 + 50] == 60).all()  # 2nd tile: the image, enlarged
    small = confusion_image(torch.tensor([[3, 1], [0, 4]]), ['tench', 'church'])
    big = confusion_image(torch.eye(200, dtype=torch.int64), [str(i) for i in range(200)])
    assert small.ndim == 3 and big.shape == (400, 400, 3)
    assert per_class_tags(['crane', 'crane', 'great white shark']) == [
        'eval_per_class/crane', 'eval_per_class/crane_1', 'eval_per_class/great_white_shark']
    assert spread_indices(100, 4) == [0, 33, 66, 99] and spread_indices(2, 16) == [0, 1]


def _fake_data(images, labels, are_images=True, pixel_map=None):
    dataset = list(zip(images, labels))
    loader = SimpleNamespace(dataset=dataset)
    return ClassificationData(loader, loader, None, None, ['n01', 'n02'], display_names=['tench', 'church'],
                              capabilities=DataCapabilities(images=are_images), pixel_map=pixel_map)


def _log_visuals(tmp_path, data, metric, iteration):
    """Log the start-of-run grid and one eval's panels, then read the event file back."""
    with SummaryWriter(str(tmp_path)) as tb:
        visuals = TensorBoardVisuals(tb, data, metric)
        visuals.log_training_images(0)
        visuals.after_eval(policy=None, step=iteration, exp_dir=str(tmp_path), final=False)
    events = EventAccumulator(str(tmp_path), size_guidance={'images': 0})
    events.Reload()
    return events


def test_visuals_write_training_grid_confusion_per_class_and_mistakes(tmp_path):
    images = [torch.full((3, 24, 24), 40 * i, dtype=torch.uint8) for i in range(6)]
    data = _fake_data(images, [0, 0, 0, 1, 1, 1])
    metric = DiagnosticMetric(num_classes=2)
    metric.last_diagnostics = EvalDiagnostics(torch.tensor([[3, 0], [1, 2]]), [Mistake(0.9, 4, 1, 0)])
    events = _log_visuals(tmp_path, data, metric, iteration=7)
    assert set(events.Tags()['images']) == {IMAGE_TAGS[k] for k in ('train_grid', 'confusion', 'mistakes')}
    assert events.Scalars('eval_per_class/tench')[0].value == 100.0
    assert events.Scalars('eval_per_class/church')[0].value == pytest.approx(200 / 3)
    assert events.Images(IMAGE_TAGS['mistakes'])[0].step == 7


def test_visuals_skip_data_that_are_not_images(tmp_path):
    data = _fake_data([torch.tensor([1.0, 2.0])] * 4, [0, 1, 0, 1], are_images=False)  # the OVERFIT coordinates
    metric = DiagnosticMetric(num_classes=2)
    metric.last_diagnostics = EvalDiagnostics(torch.tensor([[1, 1], [0, 2]]), [Mistake(0.8, 1, 0, 1)])
    events = _log_visuals(tmp_path, data, metric, iteration=1)
    assert events.Tags()['images'] == [IMAGE_TAGS['confusion']]


def test_pixel_map_draws_the_target_once_and_class0_probability_after_each_eval(tmp_path, caplog):
    """A val set that is one picture's pixels (the OVERFIT source's PixelMap): the panel runs the eval policy on
    every pixel and draws P(class 0), white = 1, as TensorBoard images and, after the last eval, a PNG."""
    classes = np.array([[0, 1, 1], [0, 0, 1]])
    coords = torch.tensor([[y, x] for y in range(2) for x in range(3)], dtype=torch.float32)

    class EvalPolicy:  # logit(class 0) - logit(class 1) = 1 - x: P(class 0) = sigmoid(1 - x)
        def forward(self, batch):
            return {'logit': torch.stack([1 - batch[:, 1], torch.zeros(len(batch))], dim=1)}

        def get_attribute(self, name):
            assert name == 'eval_model'
            return SimpleNamespace(coord_hw=(20, 30))

    data = _fake_data([], [], are_images=False, pixel_map=PixelMap(coords, classes))
    with SummaryWriter(str(tmp_path / 'tb')) as tb:
        visuals = TensorBoardVisuals(tb, data, DiagnosticMetric(num_classes=2))
        visuals.after_eval(EvalPolicy(), step=3, exp_dir=str(tmp_path), final=False)
        assert not (tmp_path / 'prediction.png').exists()  # written after the last evaluation only
        visuals.after_eval(EvalPolicy(), step=6, exp_dir=str(tmp_path), final=True)
    # sigmoid(1), sigmoid(0), sigmoid(-1) = 0.731, 0.5, 0.269 -> rint(255 p) = 186, 128 (127.5 to even), 69
    expected = np.array([[186, 128, 69], [186, 128, 69]], dtype=np.uint8)
    with Image.open(tmp_path / 'prediction.png') as png:
        assert png.mode == 'L' and np.array_equal(np.asarray(png), expected)
    assert 'policy.model.coord_hw=[20, 30] but the image is [2, 3] px' in caplog.text
    # class 0 on 3 of 6 pixels: the names are the data's display names
    assert 'pixel map: 2x3 px (tench 50.0%, church 50.0%); predicting tench everywhere scores 50.0%' in caplog.text
    events = EventAccumulator(str(tmp_path / 'tb'), size_guidance={'images': 0})
    events.Reload()
    target = events.Images(IMAGE_TAGS['pixel_target'])
    predictions = events.Images(IMAGE_TAGS['pixel_prediction'])
    assert [e.step for e in target] == [3] and [e.step for e in predictions] == [3, 6]

    def pixels(event):
        return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert('L'))
    assert np.array_equal(pixels(target[0]), np.where(classes == 0, 255, 0))  # class 0 white
    assert np.array_equal(pixels(predictions[-1]), expected)


def head_from_files(work_tree):
    """The commit HEAD names, read from the ``.git`` folder's files (not through git); None without one."""
    git_dir = os.path.join(work_tree, '.git')
    if not os.path.isdir(git_dir):
        return None
    with open(os.path.join(git_dir, 'HEAD')) as f:
        head = f.read().strip()
    if not head.startswith('ref: '):
        return head  # a detached HEAD holds the commit itself
    ref = head[len('ref: '):]
    if os.path.isfile(os.path.join(git_dir, ref)):
        with open(os.path.join(git_dir, ref)) as f:
            return f.read().strip()
    with open(os.path.join(git_dir, 'packed-refs')) as f:
        return next(line.split()[0] for line in f if line.split()[1:] == [ref])


def test_provenance_helpers(tmp_path):
    a = {'x': 1, 'y': {'b': [1, 2], 'a': None}}
    assert config_sha256(a) == config_sha256({'y': {'a': None, 'b': (1, 2)}, 'x': 1})
    assert config_sha256(a) != config_sha256({'x': 2, 'y': {'b': [1, 2], 'a': None}})
    assert re.fullmatch(r'[0-9a-f]{64}', config_sha256(a))
    if not os.path.isfile(os.path.join(REPO, '.git')):  # (a linked work tree keeps HEAD elsewhere)
        assert git_commit() == head_from_files(REPO)  # this package's work tree, or None outside one
    assert git_commit(str(tmp_path)) is None and git_dirty(str(tmp_path)) is None  # not a work tree, no exception
    repo = tmp_path / 'repo'
    (repo / 'sub').mkdir(parents=True)
    git = ['git', '-C', str(repo), '-c', 'user.name=t', '-c', 'user.email=t@t']
    subprocess.run(git + ['init', '-q'], check=True)
    (repo / 'code.py').write_text('a = 1\n')
    subprocess.run(git + ['add', 'code.py'], check=True)
    subprocess.run(git + ['commit', '-q', '-m', 'c'], check=True)
    first = head_from_files(str(repo))
    assert re.fullmatch(r'[0-9a-f]{40}', first) and git_commit(str(repo)) == git_commit(str(repo / 'sub')) == first
    (repo / 'notes.txt').write_text('untracked files do not change what runs\n')
    assert git_dirty(str(repo)) is False
    (repo / 'code.py').write_text('a = 2\n')
    assert git_dirty(str(repo)) is True
    subprocess.run(git + ['commit', '-q', '-a', '-m', 'd'], check=True)
    assert git_commit(str(repo)) == head_from_files(str(repo)) != first and git_dirty(str(repo)) is False
    assert package_versions()['torch'] == torch.__version__.split('+')[0]
    if os.path.isfile('/proc/self/status'):  # Linux: the kernel's own count of the peak, in KiB
        with open('/proc/self/status') as f:
            hwm_kib = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
        assert peak_rss_mb() == pytest.approx(hwm_kib / 1024, rel=0.05)


@pytest.mark.slow  # > ~10 s on 2 cores
def test_short_run_writes_panels_summary_and_plain_console(tiny_image_folder, tmp_path):
    result = run_tiny(tiny_image_folder, tmp_path, 'obs')
    assert '\r' not in result.stdout and result.stdout.count(' done in 0:') == 2  # no TTY: plain lines
    exp = tmp_path / 'obs'
    summary = json.loads((exp / 'summary.json').read_text())
    assert summary['best_metrics']['acc1'] == summary['best_acc1'] and summary['metric_key'] == 'acc1'
    from dizoo_imgcls.checkpoint import load_checkpoint
    best = load_checkpoint(str(exp / 'ckpt' / 'ckpt_best.pth.tar'))  # records itself as the best, in its history
    assert best['best']['epoch'] == best['history'][-1]['epoch'] == best['position']['epoch']
    assert best['best']['metric']['acc1'] == best['history'][-1]['acc1']
    assert summary['versions'] == package_versions()  # the run's interpreter and packages are this process's
    if not os.path.isfile(os.path.join(REPO, '.git')):
        assert summary['git_commit'] == head_from_files(REPO)
    assert summary['git_dirty'] == git_dirty()
    assert summary['config_sha256'] == config_sha256(_compiled_config(exp))
    events = EventAccumulator(str(exp / 'tb'), size_guidance={'images': 0})
    events.Reload()
    tags = events.Tags()
    # The run's data-wait share is the wall-time-weighted mean of its logging windows' shares (the windows cover
    # every iteration), so it lies between their extremes; its peak memory is taken last, at or above theirs.
    windows = [e.value for e in events.Scalars('train/data_wait_share')]
    assert len(windows) == 5 and min(windows) - 2e-4 <= summary['train_data_wait_share'] <= max(windows) + 2e-4
    peaks = [e.value for e in events.Scalars('train/peak_rss_mb')]
    assert peaks == sorted(peaks) and peaks[-1] - 0.1 <= summary['peak_rss_mb'] <= 2 * peaks[-1]
    assert {'train/data_wait_share', 'train/peak_rss_mb', 'eval_per_class/a_red', 'eval_per_class/c_blue'} \
        <= set(tags['scalars'])
    assert {IMAGE_TAGS['train_grid'], IMAGE_TAGS['confusion']} <= set(tags['images'])
    hparams = EventAccumulator(str(exp / 'tb' / 'hparams'))
    hparams.Reload()
    assert hparams.Scalars('hparam/acc1')[0].value == pytest.approx(summary['acc1'])


def _compiled_config(exp):
    """The config the run saved (total_config.py), loaded back."""
    from dizoo_imgcls.config import load_config_file
    return load_config_file(str(exp / 'total_config.py'))
