"""DDP under torchrun on CPU (gloo, 2 processes): same updates as one process, exact eval, one writer,
fast failure when a rank dies, resume after torchrun restarts the job."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time

import psutil
import pytest
import torch
import torch.multiprocessing as mp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import _ddp_equivalence as ddp_equivalence
from conftest import REPO, free_port
from test_resume import SMALL_RUN

pytestmark = pytest.mark.slow  # torchrun with 2 processes: every test over 10 s on 2 cores

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
ENTRY = os.path.join(REPO, 'entry', 'imagenet_res18_main.py')


def run(args, timeout=300, **kwargs):
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)


def entry_args(root, out, exp_name, epochs, *extra):
    args = [ENTRY, '--data-root', root, '--exp-name', exp_name, '--set', f'output_dir={out}',
            '--set', f'policy.learn.train_epoch={epochs}']
    for item in SMALL_RUN + list(extra):
        args += ['--set', item]
    return args


def _equivalence_rank(rank, world_size, port, out_path):
    """One rank of ``_ddp_equivalence.main`` in a forked process, with the environment torchrun would give it."""
    if world_size > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR='127.0.0.1',
                          MASTER_PORT=str(port))
    ddp_equivalence.main(out_path)


def test_two_process_steps_equal_one_process_on_the_combined_batch(tmp_path):
    # Forked processes (gloo) rather than torchrun: this compares numbers, and each process starts from this one's
    # imports instead of paying ~5 s of CPU for its own; the tests below run the real torchrun.
    single, double = tmp_path / 'single.pt', tmp_path / 'double.pt'
    mp.start_processes(_equivalence_rank, args=(1, 0, str(single)), nprocs=1, start_method='fork')
    mp.start_processes(_equivalence_rank, args=(2, free_port(), str(double)), nprocs=2, start_method='fork')
    a, b = torch.load(single), torch.load(double)
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5, rtol=1e-4), key
    init = torch.load(str(single) + '.init')
    for key in ('backbone.conv1.weight', 'backbone.fc.weight'):  # the steps really trained (both runs agree)
        assert (a[key] - init[key]).abs().max() > 1e-3, key


MIXUP = ['policy.learn.mix.mixup_alpha=0.2', 'policy.learn.mix.cutmix_alpha=1.0']  # per-rank RNG streams


def test_two_process_run_exact_eval_and_exactly_one_writer(tiny_image_folder, tmp_path):
    private_tmp = tmp_path / 'tmp'  # where rank 1 keeps DI-engine's logs while it runs
    private_tmp.mkdir()
    # Unreadable files, which either rank may meet: counted over both, each named in train.log.
    bad = [os.path.join(tiny_image_folder, 'train', cls, f'bad{i}.jpg') for i in range(2)
           for cls in ('a_red', 'b_green', 'c_blue')]
    for path in bad:
        with open(path, 'wb') as f:
            f.write(b'not a JPEG')
    train_files = 12 * 3 + 1 + len(bad)  # odd: the ranks' shards (22 / 21) end in batches of 6 and 5
    result = run(TORCHRUN + entry_args(tiny_image_folder, tmp_path, 'ddp', 2, *MIXUP), timeout=600,
                 env=dict(os.environ, TMPDIR=str(private_tmp)))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert not [n for n in os.listdir(private_tmp) if n.startswith('dizoo_imgcls_rank')]  # removed at the end
    assert 'DDP over 2 processes (gloo)' in result.stdout
    exp = tmp_path / 'ddp'
    summary = json.loads((exp / 'summary.json').read_text())
    assert summary['world_size'] == 2 and summary['eval_samples'] == 15  # 15 val images: not divisible by 2
    assert summary['epochs'] == 2
    assert summary['train_images'] == 2 * train_files  # not 2 x 3 steps x 16
    events = [n for n in os.listdir(exp / 'tb') if n.startswith('events.out.tfevents')]
    assert len(events) == 1
    accumulator = EventAccumulator(str(exp / 'tb'))
    accumulator.Reload()
    tags = accumulator.Tags()['scalars']
    assert not [t for t in tags if t.startswith('evaluator_')] and 'eval/acc1' in tags  # DI-engine's copies: off
    assert accumulator.Scalars('data/skipped')[-1].value == len(bad)
    log = (exp / 'train.log').read_text()
    # each named, at most once per rank (both may meet a file in the same epoch, before they compare notes)
    assert all(1 <= log.count(path + ':') <= 2 for path in bad), log
    assert not [n for n in os.listdir(tmp_path) if '.torchrun-' in n]  # the restart marker of a finished job
    assert sorted(os.listdir(exp / 'ckpt')) == ['ckpt_best.pth.tar', 'epoch_1_iter_3.pth.tar', 'epoch_2_iter_6.pth.tar']
    assert [p.name for p in (exp / 'log').iterdir()] and not list(tmp_path.glob('*rank1*'))
    # The same checkpoint evaluated by one process gives the same numbers as the 2-process evaluation.
    final = exp / 'ckpt' / 'epoch_2_iter_6.pth.tar'
    single = run([sys.executable, ENTRY, '--eval-only', '--resume', str(final), '--data-root', tiny_image_folder])
    assert single.returncode == 0, single.stderr[-2000:]
    match = re.search(r'acc1 ([\d.]+) acc5 ([\d.]+) loss ([\d.]+) \((\d+) images\)', single.stdout)
    assert float(match.group(1)) == pytest.approx(summary['acc1'], abs=0.01)
    assert float(match.group(3)) == pytest.approx(summary['loss'], abs=1e-4)
    assert int(match.group(4)) == 15
    # Its reports: the confusion matrix counts every val image once (5 per class), its diagonal is the acc1.
    with open(exp / 'eval' / 'confusion_matrix.csv') as f:
        rows = list(csv.reader(f))
    matrix = [[int(v) for v in row[1:]] for row in rows[1:]]
    assert [sum(row) for row in matrix] == [5, 5, 5] and rows[0][1:] == [row[0] for row in rows[1:]]
    assert 100 * sum(matrix[i][i] for i in range(3)) / 15 == pytest.approx(float(match.group(1)), abs=0.01)
    with open(exp / 'eval' / 'per_class_accuracy.csv') as f:
        per_class = list(csv.DictReader(f))
    assert [(int(r['samples']), int(r['correct'])) for r in per_class] == [(5, matrix[i][i]) for i in range(3)]
    assert all(float(r['acc1']) == pytest.approx(100 * int(r['correct']) / 5) for r in per_class)
    # Resumed under torchrun from the epoch-1 checkpoint, kept elsewhere: each rank gets back its own Mixup/CutMix
    # stream, so epoch 2 is the uninterrupted run's.
    kept = tmp_path / 'kept.pth.tar'
    shutil.copy(exp / 'ckpt' / 'epoch_1_iter_3.pth.tar', kept)
    resumed = run(TORCHRUN + entry_args(tiny_image_folder, tmp_path, 'ddp_resumed', 2, *MIXUP, f'resume="{kept}"'),
                  timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    again = json.loads((tmp_path / 'ddp_resumed' / 'summary.json').read_text())
    assert again['loss'] == pytest.approx(summary['loss'], abs=1e-6) and again['acc1'] == summary['acc1']


def test_fewer_val_images_than_processes_is_refused_up_front(tiny_image_folder, tmp_path):
    for cls in ('a_red', 'b_green', 'c_blue'):
        shutil.rmtree(os.path.join(tiny_image_folder, 'val', cls))
    os.makedirs(os.path.join(tiny_image_folder, 'val', 'a_red'))
    shutil.copy(os.path.join(tiny_image_folder, 'train', 'a_red', '0.jpg'),
                os.path.join(tiny_image_folder, 'val', 'a_red', '0.jpg'))
    result = run(TORCHRUN + entry_args(tiny_image_folder, tmp_path, 'one_val', 1), timeout=300)
    assert result.returncode != 0
    assert '1 validation image(s) for 2 processes' in result.stdout + result.stderr
    assert 'ZeroDivisionError' not in result.stdout + result.stderr


def _rank_process(launcher: subprocess.Popen, rank: int, deadline: float) -> psutil.Process:
    while time.time() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get('RANK') == str(rank) and 'imagenet_res18_main' in ' '.join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError(f'rank {rank} never started')


def _wait_for(path, deadline):
    while time.time() < deadline and not os.path.exists(path):
        time.sleep(0.2)
    assert os.path.exists(path), f'{path} never appeared'


def test_killed_rank_fails_the_job_fast_naming_the_rank(tiny_image_folder, tmp_path):
    args = TORCHRUN + entry_args(tiny_image_folder, tmp_path, 'dies', 200)
    launcher = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(tmp_path / 'dies' / 'ckpt' / 'epoch_1_iter_3.pth.tar', time.time() + 240)
        _rank_process(launcher, 1, time.time() + 30).kill()
        killed_at = time.time()
        output, _ = launcher.communicate(timeout=90)
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    assert time.time() - killed_at < 60
    assert re.search(r'rank\s*:\s*1\b', output), output[-3000:]


def test_torchrun_restart_resumes_from_the_last_checkpoint(tiny_image_folder, tmp_path):
    # The kill follows the epoch-2 checkpoint within ~0.5 s; 10 more epochs take several seconds, and a kill
    # that came too late would fail the 'resumed from' assertion, not pass unnoticed.
    epochs = 12
    args = TORCHRUN[:3] + ['--max-restarts=1'] + TORCHRUN[3:] + entry_args(tiny_image_folder, tmp_path, 'elastic',
                                                                             epochs)
    launcher = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(tmp_path / 'elastic' / 'ckpt' / 'epoch_2_iter_6.pth.tar', time.time() + 240)
        _rank_process(launcher, 1, time.time() + 30).kill()
        output, _ = launcher.communicate(timeout=400)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, output[-3000:]
    assert 'resumed from' in output and 'epoch_' in output
    summary = json.loads((tmp_path / 'elastic' / 'summary.json').read_text())
    assert summary['epochs'] == epochs
    assert [d.name for d in tmp_path.iterdir() if d.name.startswith('elastic')] == ['elastic']  # no second folder
