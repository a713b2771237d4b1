"""Exact resume and SIGKILL safety, on a small generated folder, through real processes."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from dizoo_imgcls.checkpoint import CheckpointError, load_checkpoint, step_checkpoints
from dizoo_imgcls.config import build_config, load_config_file
from dizoo_imgcls.train import train

ENTRY = os.path.join(REPO, 'entry', 'imagenet_res18_main.py')
DEFAULT_CONFIG = os.path.join(REPO, 'config', 'imagenet_res18_config.py')
SMALL_RUN = ['data.image_size=32', 'data.num_workers=0', 'policy.learn.batch_size=8', 'policy.learn.warmup_epochs=1',
             'policy.learn.amp="none"', 'deterministic=True', 'log_every=100']


def small_cfg(root, out, epochs, exp_name, *extra):
    """The config the entry builds from its default config file and these --set overrides."""
    cfg = build_config(load_config_file(DEFAULT_CONFIG), SMALL_RUN + [f'policy.learn.train_epoch={epochs}', f'output_dir="{out}"',
                                        f'exp_name="{exp_name}"', *extra])
    cfg.data.root = root
    return cfg


@pytest.mark.slow  # > ~10 s on 2 cores
def test_stopped_after_epoch_2_and_resumed_matches_uninterrupted_epoch_3(tiny_image_folder, tmp_path):
    mixup = 'policy.learn.mix.mixup_alpha=0.2'  # its draws come from torch's global RNG, saved in the checkpoint
    full = train(small_cfg(tiny_image_folder, tmp_path, 3, 'full', mixup))
    # The "interrupted" run: same recipe, its epoch-2 checkpoint taken from a run cut short after epoch 2.
    # It loads with 2 worker processes: augmentation depends on (seed, epoch, index) only, not on workers.
    cut = train(small_cfg(tiny_image_folder, tmp_path, 3, 'cut', mixup, 'checkpoint.keep_last=0',
                          'data.num_workers=2'))
    epoch2 = [p for p in step_checkpoints(os.path.join(cut['exp_dir'], 'ckpt')) if 'epoch_2_' in p][0]
    for path in step_checkpoints(os.path.join(cut['exp_dir'], 'ckpt')):
        if path != epoch2:
            os.remove(path)
    resumed = train(small_cfg(tiny_image_folder, tmp_path, 3, 'cut', mixup, 'resume="auto"', 'data.num_workers=2'))
    assert resumed['exp_dir'] == cut['exp_dir']
    assert resumed['acc1'] == full['acc1'] and resumed['loss'] == full['loss']
    history = load_checkpoint(step_checkpoints(os.path.join(cut['exp_dir'], 'ckpt'))[-1])['history']
    assert [h['epoch'] for h in history] == [1, 2, 3]


@pytest.mark.slow  # > ~10 s on 2 cores
def test_mid_epoch_resume_continues_from_the_saved_iteration(tiny_image_folder, tmp_path):
    full = train(small_cfg(tiny_image_folder, tmp_path, 2, 'full'))
    run = train(small_cfg(tiny_image_folder, tmp_path, 2, 'mid', 'checkpoint.every_n_iters=3',
                          'checkpoint.keep_last=0'))
    ckpts = step_checkpoints(os.path.join(run['exp_dir'], 'ckpt'))
    mid = [p for p in ckpts if os.path.basename(p) == 'iter_6.pth.tar'][0]  # 5 batches/epoch: epoch 2, batch 1
    state = load_checkpoint(mid)
    assert state['position'] == {'epoch': 1, 'batch': 1} and state['last_iter'] == 6
    for path in ckpts:
        if path != mid:
            os.remove(path)
    started = time.time()
    resumed = train(small_cfg(tiny_image_folder, tmp_path, 2, 'mid', 'resume="auto"'))
    elapsed = time.time() - started
    final = load_checkpoint(step_checkpoints(os.path.join(run['exp_dir'], 'ckpt'))[-1])
    assert final['last_iter'] == 10  # 4 more iterations, not a repeated epoch
    assert resumed['acc1'] == full['acc1'] and resumed['loss'] == full['loss']
    # The summary covers the whole run: the 6 iterations before the checkpoint and the 4 after it
    assert resumed['train_images'] == full['train_images'] == 2 * 37 == final['clock']['train_images']
    assert state['clock']['train_images'] == 37 + 8  # epoch 1 (4 batches of 8 and one of 5), then a batch of 8
    # the first part's time up to its checkpoint plus this process's: without the first part, at most elapsed
    assert elapsed < resumed['wall_seconds'] <= state['clock']['wall_seconds'] + elapsed + 0.01  # (rounded)
    assert resumed['train_img_per_sec'] == pytest.approx(74 / final['clock']['train_seconds'], rel=0.01)


@pytest.mark.slow  # > ~10 s on 2 cores
def test_resume_from_an_older_checkpoint_keeps_both_histories_and_a_finished_run_is_left_alone(tiny_image_folder,
                                                                                                 tmp_path):
    run = train(small_cfg(tiny_image_folder, tmp_path, 3, 'hist'))
    exp, ckpt = run['exp_dir'], os.path.join(run['exp_dir'], 'ckpt')
    names = [os.path.basename(p) for p in step_checkpoints(ckpt)]
    assert names == ['epoch_1_iter_5.pth.tar', 'epoch_2_iter_10.pth.tar', 'epoch_3_iter_15.pth.tar']
    assert load_config_file(os.path.join(exp, 'total_config.py'))['resume'] is None  # re-running it starts afresh
    summary = open(os.path.join(exp, 'summary.json')).read()
    # resuming the finished run trains nothing and leaves its summary as it was
    again = train(small_cfg(tiny_image_folder, tmp_path, 3, 'hist', 'resume="auto"'))
    assert again == json.loads(summary) and open(os.path.join(exp, 'summary.json')).read() == summary
    # back to epoch 1: the old epochs 2-3 (and the best checkpoint, if later) are moved aside, not deleted, and
    # the new epochs 2-3 are the ones kept (before, pruning removed them as soon as they were written)
    old_epoch3 = load_checkpoint(os.path.join(ckpt, 'epoch_3_iter_15.pth.tar'))['policy']['model']
    train(small_cfg(tiny_image_folder, tmp_path, 3, 'hist', f'resume="{os.path.join(ckpt, names[0])}"',
                    'policy.learn.amp="none"'))
    aside = os.path.join(ckpt, 'superseded_at_iter_5')
    assert {'epoch_2_iter_10.pth.tar', 'epoch_3_iter_15.pth.tar'} <= set(os.listdir(aside))
    assert [os.path.basename(p) for p in step_checkpoints(ckpt)] == names
    new_epoch3 = load_checkpoint(os.path.join(ckpt, 'epoch_3_iter_15.pth.tar'))
    assert new_epoch3['history'][-1]['epoch'] == 3 and os.path.isfile(os.path.join(ckpt, 'ckpt_best.pth.tar'))
    assert all(torch.equal(old_epoch3[k], v) for k, v in new_epoch3['policy']['model'].items())  # deterministic
    # TensorBoard shows each step once: what the superseded run logged after iteration 5 is purged.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(exp, 'tb'))
    events.Reload()
    assert len(os.listdir(os.path.join(exp, 'tb'))) >= 2  # the first run's event file and the resumed one's
    assert [e.step for e in events.Scalars('eval/acc1')] == [5, 10, 15]


def test_resume_with_another_schedule_or_model_is_refused_and_changes_nothing(tiny_image_folder, tmp_path):
    run = train(small_cfg(tiny_image_folder, tmp_path, 1, 'sched'))
    config_file = os.path.join(run['exp_dir'], 'total_config.py')
    written = open(config_file).read()
    events = sorted(os.listdir(os.path.join(run['exp_dir'], 'tb')))
    with pytest.raises(CheckpointError, match='different settings.*train_epoch: 1 -> 2'):
        train(small_cfg(tiny_image_folder, tmp_path, 2, 'sched', 'resume="auto"'))
    with pytest.raises(CheckpointError, match="different settings.*policy.model.name: 'resnet18' -> 'resnet34'"):
        train(small_cfg(tiny_image_folder, tmp_path, 1, 'sched', 'resume="auto"', 'policy.model.name="resnet34"'))
    with pytest.raises(CheckpointError, match="optimizer: 'sgd' -> 'adamw'; seed: 0 -> 7"):  # every change named
        train(small_cfg(tiny_image_folder, tmp_path, 1, 'sched', 'resume="auto"', 'policy.learn.optimizer="adamw"',
                        'seed=7'))
    with pytest.raises(CheckpointError, match="does not fit policy.model.name='resnet18'.*size mismatch"):
        train(small_cfg(tiny_image_folder, tmp_path, 1, 'sched', 'resume="auto"', 'policy.model.num_classes=50'))
    assert open(config_file).read() == written  # the refused runs did not overwrite the run's config
    assert sorted(os.listdir(os.path.join(run['exp_dir'], 'tb'))) == events  # nor add empty event files
    assert os.path.exists(os.path.join(run['exp_dir'], 'summary.json'))


def _start(root, out, epochs):
    args = [sys.executable, ENTRY, '--data-root', root, '--exp-name', 'killed', '--resume', 'auto',
            '--set', f'output_dir={out}', '--set', f'policy.learn.train_epoch={epochs}',
            '--set', 'checkpoint.every_n_iters=2', '--set', 'checkpoint.keep_last=2']
    for item in SMALL_RUN:
        args += ['--set', item]
    # Ctrl-C as in a terminal: a background job of a shell script (as CI may be) inherits SIGINT ignored
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _kill_during_write(proc, ckpt_dir, deadline):
    """SIGKILL the moment a checkpoint temp file exists; True if it was caught mid-write."""
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpt_dir) and any(n.startswith('.') and '.tmp-' in n for n in os.listdir(ckpt_dir)):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    return False


@pytest.mark.slow  # > ~10 s on 2 cores
def test_sigkill_at_random_moments_never_loses_or_repeats_an_epoch(tiny_image_folder, tmp_path):
    epochs, rng = 4, random.Random(0)
    # The reference goes through the same entry, in a process of its own: fp32 results depend on the thread count
    ref = _start(tiny_image_folder, tmp_path / 'ref', epochs)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    reference = json.loads((tmp_path / 'ref' / 'killed' / 'summary.json').read_text())
    out, ckpt_dir = tmp_path / 'runs', tmp_path / 'runs' / 'killed' / 'ckpt'
    caught_mid_write = False
    for attempt in range(3):  # one kill while a checkpoint is being written, two at random moments
        proc = _start(tiny_image_folder, out, epochs)
        if attempt == 0:
            caught_mid_write = _kill_during_write(proc, str(ckpt_dir), time.time() + 120)
        else:
            time.sleep(rng.uniform(6.0, 12.0))  # start-up takes a few seconds; then training is under way
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert caught_mid_write, 'never saw a checkpoint being written'
    proc = _start(tiny_image_folder, out, epochs)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    final = load_checkpoint(step_checkpoints(str(ckpt_dir))[-1])
    assert [h['epoch'] for h in final['history']] == list(range(1, epochs + 1))
    summary = json.loads((out / 'killed' / 'summary.json').read_text())
    assert summary['epochs'] == epochs
    assert summary['acc1'] == reference['acc1'] and summary['loss'] == pytest.approx(reference['loss'], abs=0)


def test_experiment_folder_of_torchrun_jobs_and_of_checkpoints_kept_elsewhere(tmp_path, monkeypatch):
    from easydict import EasyDict

    from dizoo_imgcls.runtime import experiment_dir

    cfg = EasyDict(output_dir=str(tmp_path / 'runs'), exp_name='T', resume=None)
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'none')  # torchrun's default run id: the same for every job
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '0')
    first = experiment_dir(cfg)
    assert first == str(tmp_path / 'runs' / 'T')
    (tmp_path / 'runs' / 'T' / 'summary.json').write_text('{}')
    second = experiment_dir(cfg)  # a new job, not a restart: it must not write into the first job's folder
    assert second != first and os.path.basename(second).startswith('T_')
    third = experiment_dir(cfg)  # started within the same second as the second: a folder of its own
    assert len({first, second, third}) == 3 and os.path.isdir(third)
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '1')  # torchrun restarted the latest job
    assert experiment_dir(cfg) == third

    monkeypatch.delenv('TORCHELASTIC_RUN_ID')
    kept = tmp_path / 'elsewhere' / 'sub'
    kept.mkdir(parents=True)
    cfg.resume = str(kept / 'model.pth.tar')  # not EXP/ckpt/FILE: writing into its grandparent would be a surprise
    assert os.path.dirname(experiment_dir(cfg)) == str(tmp_path / 'runs')
    cfg.resume = str(tmp_path / 'runs' / 'T' / 'ckpt' / 'epoch_1_iter_5.pth.tar')
    assert experiment_dir(cfg) == first


@pytest.mark.slow  # > ~10 s on 2 cores
def test_ctrl_c_names_the_checkpoint_to_resume_from(tiny_image_folder, tmp_path):
    proc = _start(tiny_image_folder, tmp_path, 20)
    ckpt_dir = tmp_path / 'killed' / 'ckpt'
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpt_dir.is_dir() and step_checkpoints(str(ckpt_dir))):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = proc.stderr.read()
    newest = step_checkpoints(str(ckpt_dir))[-1]
    assert 'Traceback' not in err and f'interrupted; the newest checkpoint is {newest}' in err, err[-2000:]
    load_checkpoint(newest)  # complete: written atomically


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')  # the dropped exception itself
def test_a_ctrl_c_that_python_drops_in_a_destructor_is_still_seen():
    from dizoo_imgcls.signals import interrupt_guard

    class Finalizer:
        def __del__(self):  # a KeyboardInterrupt raised in here is printed as "Exception ignored" and lost
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes, here
                pass

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever ran pytest
    try:
        with interrupt_guard() as interrupted:
            assert not interrupted()
            Finalizer()  # collected at once: the exception is dropped, the run would go on
            assert interrupted()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # started with Ctrl-C ignored: left ignored
        with interrupt_guard() as interrupted:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN and not interrupted()
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_resume_auto_continues_the_experiment_folder_with_the_newest_checkpoint(tmp_path):
    # A second run of an experiment whose folder was taken writes to exp_YYMMDD_HHMMSS; --resume auto must
    # continue that one when it was the last to checkpoint, not the older run in exp/.
    from dizoo_imgcls.runtime import experiment_dir, newest_run_folder

    def run_folder(name, written, checkpoint='epoch_1_iter_5.pth.tar'):
        ckpt = tmp_path / name / 'ckpt'
        ckpt.mkdir(parents=True)
        if checkpoint:
            (ckpt / checkpoint).write_bytes(b'x')
            os.utime(ckpt / checkpoint, (written, written))
        return str(tmp_path / name)

    base = str(tmp_path / 'exp')
    assert newest_run_folder(base) == base  # nothing yet: a fresh start in exp/
    run_folder('exp', 1000)
    assert newest_run_folder(base) == base
    second = run_folder('exp_261123_101500', 2000)
    run_folder('exp_261123_101500_2', 500)  # older
    run_folder('exp_261123_111500', 9000, checkpoint=None)  # started, never checkpointed
    run_folder('exp_large', 9000)  # another experiment whose name starts alike
    run_folder('exp_261123_1015', 9000)  # not a timestamp this code writes
    assert newest_run_folder(base) == second
    cfg = build_config(load_config_file(DEFAULT_CONFIG), [f'output_dir="{tmp_path}"', 'exp_name="exp"',
                                                          'resume="auto"'])
    assert experiment_dir(cfg) == second
