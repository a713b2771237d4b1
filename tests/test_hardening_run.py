"""Faults of a training run, through real processes, real signals and real files (issue 23): a NaN loss, a
double start, a full disk, stale temp files, SIGTERM, a damaged newest checkpoint, damaged checkpoint files,
exp_name outside output_dir, a run that fails before it trains. Most runs use the OVERFIT data (coordinates in
memory, a small MLP): a process takes a few seconds, a checkpoint ~0.4 MB."""
import errno
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_main
from dizoo_imgcls.checkpoint import (CheckpointError, DiskWriteError, atomic_torch_save, load_checkpoint,
                                     step_checkpoints)
from dizoo_imgcls.config import build_config, load_config_file
from dizoo_imgcls.runtime import LazyWriter, write_json

ENTRY = os.path.join(REPO, 'entry', 'imagenet_res18_main.py')
CONFIG = os.path.join(REPO, 'config', 'overfit_mlp_config.py')
# 30 x 100 px word, 4 iterations of 256 coordinates per epoch
TINY = ['data.options.image_hw=[30,100]', 'policy.model.coord_hw=[30,100]', 'data.options.samples_per_epoch=1024',
        'log_every=100']
ENV = dict(os.environ, OMP_NUM_THREADS='1')


def cli_args(out, exp, *overrides, resume=None):
    """The command line after ``python entry/imagenet_res18_main.py``."""
    args = ['--config', CONFIG, '--exp-name', exp, '--set', f'output_dir={out}']
    for item in TINY + list(overrides):
        args += ['--set', item]
    return args + (['--resume', resume] if resume else [])


def entry_args(out, exp, *overrides, resume=None):
    return [sys.executable, ENTRY] + cli_args(out, exp, *overrides, resume=resume)


def run_entry(out, exp, *overrides, resume=None, timeout=180):
    return subprocess.run(entry_args(out, exp, *overrides, resume=resume), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def start_entry(out, exp, *overrides, resume=None, **kwargs):
    return subprocess.Popen(entry_args(out, exp, *overrides, resume=resume), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def in_process_cfg(out, exp, *overrides):
    return build_config(load_config_file(CONFIG), TINY + [f'output_dir="{out}"', f'exp_name="{exp}"', *overrides])


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip() and 'WARNING' not in line]


def temp_files(folder):
    return [os.path.join(root, n) for root, _, names in os.walk(folder) for n in names if '.tmp' in n]


def all_finite(path):
    weights = load_checkpoint(path)['policy']['model']
    return all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def wait_for(predicate, timeout, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


# ----- 1. a non-finite loss -----
def test_nan_loss_stops_at_once_with_exit_3_naming_iteration_and_lr_and_saves_nothing(tmp_path):
    result = run_entry(tmp_path, 'nan', 'policy.learn.lr_per_256=1e12', 'policy.learn.train_epoch=3')
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert 'Traceback' not in result.stderr and len(lines) == 2, result.stderr
    assert re.match(r'error: training diverged at iteration \d+ \(epoch 1\): the loss is nan \(lr [\d.e+]+\); '
                    r'nothing was saved from this state$', lines[0]), lines[0]
    assert lines[1].startswith('no checkpoint was written before it: nothing to resume'), lines[1]
    exp = tmp_path / 'nan'
    assert not (exp / 'ckpt').exists() and not (exp / 'summary.json').exists()
    assert 'saved ckpt_best' not in result.stdout


def test_divergence_after_good_epochs_leaves_their_checkpoints_and_names_the_newest(tmp_path):
    # SGD with momentum 100: the velocity grows ~100x a step, finite for two epochs, then inf/NaN in the third
    result = run_entry(tmp_path, 'diverges', 'policy.learn.train_epoch=8', 'policy.learn.optimizer="sgd"',
                       'policy.learn.momentum=100', 'policy.learn.lr_per_256=0.01', 'checkpoint.keep_last=0')
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert 'Traceback' not in result.stderr and len(lines) == 2, result.stderr
    stopped_at = int(re.search(r'training diverged (?:at|by) iteration (\d+)', lines[0]).group(1))
    assert re.search(r'\(lr [\d.e+-]+\)', lines[0]), lines[0]
    ckpt = tmp_path / 'diverges' / 'ckpt'
    saved = step_checkpoints(str(ckpt))
    assert saved and sorted(os.listdir(ckpt)) == sorted([os.path.basename(p) for p in saved] + ['ckpt_best.pth.tar'])
    for path in saved + [str(ckpt / 'ckpt_best.pth.tar')]:  # complete, finite, and from before the divergence
        assert all_finite(path) and load_checkpoint(path)['last_iter'] < stopped_at, path
    assert lines[1] == (f'the newest complete checkpoint is {saved[-1]}; continue with: --resume {saved[-1]} (with '
                        'the same settings it will likely diverge again: lower policy.learn.lr_per_256, or set '
                        'policy.learn.grad_clip_norm)')
    assert not (tmp_path / 'diverges' / 'summary.json').exists() and not temp_files(tmp_path)


def test_the_loss_guard_checks_the_loss_only_so_skipped_fp16_steps_are_not_errors():
    from types import SimpleNamespace

    from dizoo_imgcls.hooks import LossGuardHook, TrainingDiverged

    def engine(loss, iteration, grad_norm=1.0):
        out = {'loss': loss, 'lr': 0.1, 'grad_norm': grad_norm}
        return SimpleNamespace(log_buffer={'scalar': out}, last_iter=SimpleNamespace(val=iteration - 1))

    guard = LossGuardHook(iters_per_epoch=10)
    guard(engine(2.3, 1, grad_norm=float('nan')))  # GradScaler skipped this step: its gradients overflowed
    guard(engine(1e30, 2))  # large but finite: only loss_spike_factor stops that
    with pytest.raises(TrainingDiverged, match=r'at iteration 13 \(epoch 2\): the loss is inf \(lr 0.1\)'):
        guard(engine(float('inf'), 13))
    spiky = LossGuardHook(spike_factor=10, window=30)
    for i in range(25):
        spiky(engine(1.0 + 0.01 * i, i + 1))
    spiky(engine(9.0, 26))  # below 10 x the median
    with pytest.raises(TrainingDiverged, match=r'loss 50 is above loss_spike_factor=10 x 1.1'):
        spiky(engine(50.0, 27))


def test_summary_json_is_strict_json_with_null_for_nan(tmp_path):
    path = tmp_path / 'summary.json'
    write_json(str(path), {'loss': float('nan'), 'best': {'loss': float('inf')}, 'history': [1.5, float('-inf')]})

    def refuse(constant):
        raise ValueError(f'not JSON: {constant}')

    assert json.loads(path.read_text(), parse_constant=refuse) == {'loss': None, 'best': {'loss': None},
                                                                    'history': [1.5, None]}
    assert os.listdir(tmp_path) == ['summary.json']


# ----- ties -----
def test_a_tie_never_replaces_the_best_but_reaches_a_stop_value():
    from dizoo_imgcls.metric import ImageClassificationMetric

    acc, loss = ImageClassificationMetric('acc1'), ImageClassificationMetric('loss')
    assert not acc.gt({'acc1': 89.0}, {'acc1': 89.0}) and not loss.gt({'loss': 0.3}, {'loss': 0.3})
    assert acc.gt({'acc1': 89.01}, {'acc1': 89.0}) and loss.gt({'loss': 0.29}, {'loss': 0.3})
    assert acc.gt({'acc1': 100.0}, 100.0) and loss.gt({'loss': 0.1}, 0.1)  # stop_value: reached, ties included
    assert not acc.gt({'acc1': math.nan}, None) and not acc.gt({'acc1': math.nan}, {'acc1': 10.0})
    assert acc.gt({'acc1': 10.0}, {'acc1': math.nan})


def test_chance_level_epochs_keep_the_first_best_also_after_a_resume(tmp_path):
    from dizoo_imgcls.train import train

    torch.set_num_threads(1)
    # An LR too small to move the model: every epoch predicts background everywhere, acc1 89.00 each time.
    frozen = ['policy.learn.lr_per_256=1e-12', 'policy.learn.train_epoch=3', 'checkpoint.keep_last=0']
    summary = train(in_process_cfg(tmp_path, 'ties', *frozen))
    history = load_checkpoint(step_checkpoints(os.path.join(summary['exp_dir'], 'ckpt'))[-1])['history']
    assert len({h['acc1'] for h in history}) == 1  # three equal results
    best = os.path.join(summary['exp_dir'], 'ckpt', 'ckpt_best.pth.tar')
    assert summary['best_epoch'] == 1 and load_checkpoint(best)['position']['epoch'] == 1
    written = os.path.getmtime(best)
    # resumed after epoch 1: the evaluator's best comes from the checkpoint, and epochs 2-3 tie with it again
    epoch1 = step_checkpoints(os.path.join(summary['exp_dir'], 'ckpt'))[0]
    again = train(in_process_cfg(tmp_path, 'ties', *frozen, f'resume="{epoch1}"'))
    assert again['best_epoch'] == 1 and os.path.getmtime(best) == written


# ----- 2. a second process on the same experiment -----
@pytest.mark.slow  # > 10 s on 2 cores
def test_second_run_of_a_running_experiment_exits_2_naming_pid_and_host(tmp_path):
    long_run = ['policy.learn.train_epoch=5000']  # killed by the test long before its end
    first = start_entry(tmp_path, 'exp', *long_run, resume='auto')
    try:
        assert wait_for(lambda: step_checkpoints(str(tmp_path / 'exp' / 'ckpt')), 120, first), first.stderr.read()
        # Paused, it still holds its lock (as a job the scheduler thinks lost) but no longer takes a core from
        # the runs below.
        first.send_signal(signal.SIGSTOP)
        started = time.time()
        second = run_entry(tmp_path, 'exp', *long_run, resume='auto', timeout=120)  # a scheduler's requeue
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert time.time() - started < 60
        lines = error_lines(second.stderr)
        assert len(lines) == 1 and 'Traceback' not in second.stderr, second.stderr
        assert f'{tmp_path / "exp"} is in use by process {first.pid} on {socket.gethostname()}' in lines[0]
        assert first.poll() is None  # the first run is still there, and its folder its own
        log = (tmp_path / 'exp' / 'train.log').read_text()
        assert log.count('experiment: ') == 1 and len(os.listdir(tmp_path / 'exp' / 'tb')) == 1
        # a new run (no --resume) of the same name gets a folder of its own, as before
        fresh = run_entry(tmp_path, 'exp', 'policy.learn.train_epoch=1')
        assert fresh.returncode == 0, fresh.stderr[-2000:]
        assert sorted(d.name for d in tmp_path.iterdir())[0] == 'exp' and len(list(tmp_path.iterdir())) == 2
    finally:
        first.kill()
        first.wait()
    # the lock died with its holder: the requeued run now continues the experiment
    resumed = run_entry(tmp_path, 'exp', *long_run, 'policy.learn.lr_per_256=1e12',
                        resume='auto')  # refused for the changed LR: but only after taking the lock
    assert 'in use' not in resumed.stderr and 'different settings' in resumed.stderr, resumed.stderr


def test_new_runs_claim_distinct_folders_atomically(tmp_path):
    from dizoo_imgcls.runtime import _claim_new_folder, release_experiment_dir

    claimed = []
    for _ in range(3):  # as three runs started in the same second
        claimed.append(_claim_new_folder(str(tmp_path / 'exp_240101_000000')))
    release_experiment_dir()
    assert [os.path.basename(p) for p in claimed] == ['exp_240101_000000', 'exp_240101_000000_2',
                                                      'exp_240101_000000_3']
    assert all(os.listdir(p) == ['.lock'] for p in claimed)


# ----- 5. a full disk -----
@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 3 MiB file system (tmpfs): root only; skipped where this sandbox cannot mount one (the patched
    write of test_a_failed_checkpoint_write_removes_its_temp_file still covers the writer)."""
    mount_point = tmp_path / 'disk'
    mount_point.mkdir()
    result = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here: {result.stderr.strip()}')
    yield mount_point
    subprocess.run(['umount', '-l', str(mount_point)], check=False)


def check_full_disk_failure(result, disk):
    assert result.returncode == 74, result.stdout[-2000:] + result.stderr[-2000:]
    assert 'Traceback' not in result.stderr and 'Logging error' not in result.stderr, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 2, result.stderr
    assert re.match(rf'error: cannot write {re.escape(str(disk))}/\S+: No space left on device '
                    r'\([\d.]+ (bytes|KiB|MiB) free there\)$', lines[0]), lines[0]
    newest = re.fullmatch(r'the newest complete checkpoint is (\S+); continue with: --resume (\S+) once there is '
                          r'space', lines[1])
    assert newest and newest.group(1) == newest.group(2), lines[1]
    assert load_checkpoint(newest.group(1))['format'] == 'dizoo_imgcls/1'
    assert not temp_files(disk)  # no half-written checkpoint or summary
    for path in step_checkpoints(str(disk / 'full' / 'ckpt')) + [str(disk / 'full' / 'ckpt' / 'ckpt_best.pth.tar')]:
        load_checkpoint(path)  # every checkpoint left is complete


def test_full_disk_at_a_checkpoint_is_one_line_with_the_resume_line(small_tmpfs):
    # ~1 MB checkpoints on 3 MiB: the best and two epoch checkpoints fit, the next one does not
    result = run_entry(small_tmpfs, 'full', 'policy.model.widths=[200,200,200]', 'policy.learn.train_epoch=6')
    check_full_disk_failure(result, small_tmpfs)
    assert re.search(r'cannot write \S+\.pth\.tar', result.stderr)


def test_disk_filling_up_during_training_stops_the_run_instead_of_hanging(small_tmpfs):
    # TensorBoard's writer thread dies on the full disk; the run used to block for ever on its queue
    proc = start_entry(small_tmpfs, 'full', 'policy.learn.train_epoch=500', 'log_every=1')
    try:
        assert wait_for(lambda: step_checkpoints(str(small_tmpfs / 'full' / 'ckpt')), 120, proc), proc.stderr.read()
        fill_disk(small_tmpfs)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    os.remove(small_tmpfs / 'filler')
    check_full_disk_failure(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), small_tmpfs)


def fill_disk(disk):
    with open(disk / 'filler', 'wb', buffering=0) as f:  # the rest of the disk, as another job's output would
        try:
            while True:
                f.write(b'\0' * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_tensorboard_events_of_a_failed_run_are_written_as_far_as_they_fit(small_tmpfs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = LazyWriter(str(small_tmpfs / 'tb'))
    writer.add_scalar('loss', 1.0, 0)
    writer.flush()
    fill_disk(small_tmpfs)
    for step in range(1, 6):  # fewer than tensorboardX's queue holds: its thread may not have written them yet
        writer.add_scalar('loss', float(step), step)
    writer.close_after_failure()  # the run's own error (say, a checkpoint that did not fit) is on its way up
    writer.flush()  # DI-engine's learner destructor at exit: nothing now
    writer.close()
    os.remove(small_tmpfs / 'filler')
    events = EventAccumulator(str(small_tmpfs / 'tb'))
    events.Reload()
    assert events.Scalars('loss')[0].value == 1.0  # what was written before stays readable


def test_a_writer_thread_that_died_unseen_is_not_reported_after_the_run_failed(tmp_path, monkeypatch):
    # The full disk was met by a checkpoint write first; the event writer's thread died of it too, unseen. The
    # learner's destructor used to raise it at exit: "Exception ignored ... Traceback" after the error line.
    from tensorboardX.event_file_writer import EventsWriter

    def full_disk(self, event):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def writer_whose_thread_died(folder):
        writer = LazyWriter(str(tmp_path / folder))
        writer.add_scalar('loss', 1.0, 0)
        writer.flush()
        with monkeypatch.context() as patch:
            patch.setattr(EventsWriter, 'write_event', full_disk)
            writer.add_scalar('loss', 2.0, 1)
            assert wait_for(lambda: writer.thread_error is not None, 10)
        return writer

    seen = writer_whose_thread_died('a')
    with pytest.raises(DiskWriteError, match='No space left on device'):  # in a running run: its error, once
        seen.flush()
    seen.flush()
    unseen = writer_whose_thread_died('b')
    unseen.close_after_failure()
    unseen.flush()
    unseen.close()


def test_a_failed_checkpoint_write_removes_its_temp_file(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt' / 'epoch_1_iter_4.pth.tar'
    atomic_torch_save({'w': torch.zeros(3)}, str(path))

    def save_on_a_full_disk(obj, f):  # as torch.save fails: some bytes written, then ENOSPC inside a RuntimeError
        f.write(b'x' * 10)
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError('[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0')

    monkeypatch.setattr(torch, 'save', save_on_a_full_disk)
    with pytest.raises(DiskWriteError, match=rf'cannot write {re.escape(str(path))}: No space left on device '
                                             r'\(.+ free there\)'):
        atomic_torch_save({'w': torch.ones(3)}, str(path))
    monkeypatch.undo()
    assert os.listdir(tmp_path / 'ckpt') == ['epoch_1_iter_4.pth.tar']  # no temp file; the old file as it was
    assert torch.equal(load_checkpoint(str(path))['w'], torch.zeros(3))
    monkeypatch.setattr(torch, 'save', lambda obj, f: f.write(object()))  # a bug, not the disk: its own traceback
    with pytest.raises(TypeError):
        atomic_torch_save({}, str(path))
    assert os.listdir(tmp_path / 'ckpt') == ['epoch_1_iter_4.pth.tar']


# ----- 6. temp files of killed writers -----
def test_stale_temp_files_of_dead_writers_are_swept_at_start_up(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    ckpt = tmp_path / 'exp' / 'ckpt'
    ckpt.mkdir(parents=True)
    stale = [ckpt / f'.ckpt_best.pth.tar.tmp-{dead.pid}', tmp_path / 'exp' / f'.summary.json.tmp-{dead.pid}']
    alive = ckpt / f'.epoch_1_iter_4.pth.tar.tmp-{os.getpid()}'  # a writer that still runs: left alone
    for path in stale + [alive]:
        path.write_bytes(b'\0' * 1000)
    result = run_entry(tmp_path, 'exp', 'policy.learn.train_epoch=1', resume='auto')
    assert result.returncode == 0, result.stderr[-2000:]
    assert not any(p.exists() for p in stale) and alive.exists()
    assert 'removed 2 temporary file(s) that killed runs left' in result.stdout


# ----- 7. SIGTERM -----
def sigterm_run(tmp_path, exp, group: bool):
    # 100 iterations an epoch: the signal lands inside epoch 2
    args = ['data.options.samples_per_epoch=25600', 'policy.learn.train_epoch=3', 'checkpoint.keep_last=0']
    if group:
        args.append('data.num_workers=2')
    proc = start_entry(tmp_path, exp, *args, resume='auto', start_new_session=group)
    try:
        assert wait_for(lambda: step_checkpoints(str(tmp_path / exp / 'ckpt')), 120, proc), proc.stderr.read()
        time.sleep(0.3)
        if group:  # as Slurm does: the whole job step, data-loader workers included
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        signalled = time.time()
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stdout[-2000:] + stderr[-2000:]
    assert time.time() - signalled < 30
    match = re.fullmatch(r'terminated \(SIGTERM\) at iteration (\d+); saved (\S+)\. Continue with: --resume (\S+)',
                         stderr.strip())
    assert match and match.group(2) == match.group(3), stderr
    state = load_checkpoint(match.group(2))
    assert state['last_iter'] == int(match.group(1)) == 100 * state['position']['epoch'] + state['position']['batch']
    assert state['position']['epoch'] >= 1 and int(match.group(1)) > 100  # later than the epoch-1 checkpoint
    resumed = run_entry(tmp_path, exp, 'data.options.samples_per_epoch=25600', 'policy.learn.train_epoch=3',
                        'checkpoint.keep_last=0', resume=match.group(2))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((tmp_path / exp / 'summary.json').read_text())
    final = load_checkpoint(step_checkpoints(str(tmp_path / exp / 'ckpt'))[-1])
    assert [h['epoch'] for h in final['history']] == [1, 2, 3]  # each epoch once, the partial one completed
    assert summary['train_images'] == 3 * 25600  # no batch lost or repeated


@pytest.mark.slow  # > 10 s on 2 cores
def test_sigterm_writes_a_mid_epoch_checkpoint_prints_the_resume_line_and_exits_143(tmp_path):
    sigterm_run(tmp_path, 'term', group=False)


@pytest.mark.slow  # > 10 s on 2 cores
def test_sigterm_to_the_whole_process_group_with_loader_workers(tmp_path):
    sigterm_run(tmp_path, 'term_group', group=True)


# ----- 8. --resume auto -----
def test_resume_auto_takes_ckpt_best_when_it_is_the_newest_and_names_a_damaged_newest_file(tmp_path):
    from dizoo_imgcls.train import train

    torch.set_num_threads(1)
    settings = ['policy.learn.train_epoch=3', 'checkpoint.keep_last=0']
    summary = train(in_process_cfg(tmp_path, 'auto', *settings))
    ckpt = os.path.join(summary['exp_dir'], 'ckpt')
    best = os.path.join(ckpt, 'ckpt_best.pth.tar')
    best_iter = load_checkpoint(best)['last_iter']
    # killed after writing ckpt_best, before the epoch checkpoint: only older step checkpoints (if any) remain
    for path in step_checkpoints(ckpt):
        if load_checkpoint(path)['last_iter'] >= best_iter:
            os.remove(path)
    os.remove(os.path.join(summary['exp_dir'], 'summary.json'))
    damaged = os.path.join(ckpt, 'iter_999.pth.tar')  # the newest by name, but cut short by a disk error
    with open(best, 'rb') as f:
        data = f.read()
    with open(damaged, 'wb') as f:
        f.write(data[:len(data) // 2])
    result = run_entry(tmp_path, 'auto', *settings, resume='auto')
    assert result.returncode == 0, result.stderr[-2000:]
    assert f'--resume auto: skipped {damaged} (cannot read checkpoint {damaged}: it is damaged or truncated' \
        in result.stdout, result.stdout
    assert f'resumed from {best}: epoch {best_iter // 4} done' in result.stdout
    assert 'starting from scratch' not in result.stdout
    final = load_checkpoint(step_checkpoints(ckpt)[-1])
    assert [h['epoch'] for h in final['history']] == [1, 2, 3]


# ----- 10. what a damaged checkpoint is -----
def test_checkpoint_load_errors_say_what_the_file_is(tmp_path):
    def message(content: bytes) -> str:
        path = tmp_path / 'x.pth.tar'
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(str(path))
        return str(info.value)

    assert 'is empty (0 bytes): not a checkpoint' in message(b'')
    random_bytes = message(bytes(range(7, 250)) * 40)
    assert 'is not a checkpoint: neither the zip archive torch.save writes nor a pickle' in random_bytes
    assert 'arbitrary code' not in random_bytes
    assert 'it looks like a JSON file' in message(json.dumps({'acc1': 90.0}).encode())
    real = tmp_path / 'real.pth.tar'
    atomic_torch_save({'w': torch.arange(10000.0)}, str(real))
    truncated = message(real.read_bytes()[:3000])
    assert 'it is damaged or truncated (3000 bytes; ' in truncated and 'arbitrary code' not in truncated
    # the security refusal itself is unchanged: test_checkpoint.py::test_malicious_pickle_is_refused...


# ----- 11. exp_name and folders of runs that never trained -----
def test_exp_name_outside_output_dir_is_refused_with_exit_2(tmp_path, capsys):
    out = tmp_path / 'a' / 'b' / 'out'
    code, _, err = run_main(capsys, 'imagenet_res18_main', *cli_args(out, '../../x', 'policy.learn.train_epoch=1'))
    assert code == 2, err[-2000:]
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: exp_name must name a folder inside output_dir") and \
        "'../../x'" in lines[0], err
    assert not (tmp_path / 'a' / 'x').exists() and not out.exists()


@pytest.mark.slow  # > 10 s on 2 cores
def test_a_run_that_fails_before_training_leaves_no_folder_so_the_next_gets_the_name(tmp_path):
    broken = tmp_path / 'weights.pth'
    broken.write_bytes(b'')  # the model's pretrained weights are loaded after the folder is made
    result = run_entry(tmp_path, 'exp', 'policy.learn.train_epoch=1', f'policy.model.pretrained="{broken}"')
    assert result.returncode == 2 and 'is empty (0 bytes)' in result.stderr, result.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ['weights.pth']  # nothing left behind
    fixed = run_entry(tmp_path, 'exp', 'policy.learn.train_epoch=1')
    assert fixed.returncode == 0 and (tmp_path / 'exp' / 'summary.json').exists(), fixed.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ['exp', 'weights.pth']
