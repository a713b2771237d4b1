"""The command line as a user runs it: real processes and real files; what it refuses before training, through its
``main`` in process (conftest.run_main)."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_main

ENTRY = os.path.join(REPO, 'entry', 'imagenet_res18_main.py')
MAIN = 'imagenet_res18_main'


def run_entry(*args, env=None, timeout=600):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, ENTRY, *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=REPO)


def run_tiny(data_root, out_dir, exp_name, *extra):
    """Two epochs on the generated 3-class folder at 32 px: the short real run several tests inspect."""
    args = ['--data-root', data_root, '--exp-name', exp_name, '--set', f'output_dir={out_dir}']
    for item in ('data.image_size=32', 'policy.learn.batch_size=8', 'policy.learn.train_epoch=2',
                 'policy.learn.warmup_epochs=0', 'data.num_workers=0', 'log_every=2'):
        args += ['--set', item]
    result = run_entry(*args, *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_missing_data_root_is_one_clear_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / 'nope'
    code, _, err = run_main(capsys, MAIN, '--data-root', missing, '--set', f'output_dir={tmp_path}')
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert str(missing) in lines[0] and '--demo' in lines[0] and 'train/<class>' in lines[0]


def test_no_data_root_at_all_points_to_the_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv('IMAGENET_ROOT', raising=False)
    code, _, err = run_main(capsys, MAIN, '--set', f'output_dir={tmp_path}')
    assert code == 2 and '--data-root' in err and '--demo' in err


def test_settings_that_cannot_run_are_refused_before_any_folder_is_made(tiny_image_folder, tmp_path, capsys):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    cases = [(['--resume', str(tmp_path / 'missing.pth.tar')], 'checkpoint not found'),
             (['--set', 'policy.model.blurpool=True'], "no option 'blurpool' (did you mean blur_pool?)"),
             (['--set', 'policy.model.name=resnet19'], "unknown model 'resnet19'"),
             (['--set', f'output_dir={blocker}'], 'cannot create the experiment folder'),
             (['--check-data', '--set', 'data.decoder=turbo'], 'data.decoder must be one of')]
    for i, (extra, says) in enumerate(cases):
        out = tmp_path / f'runs_{i}'  # each case its own: none may be made
        code, _, err = run_main(capsys, MAIN, '--data-root', tiny_image_folder, '--set', f'output_dir={out}', *extra)
        assert code == 2 and says in err, err
        assert not out.exists(), extra


def test_unknown_set_key_exits_2_naming_closest_key(tmp_path, capsys):
    code, _, err = run_main(capsys, MAIN, '--demo', '--set', 'policy.learn.lr_per256=0.1', '--set',
                            f'output_dir={tmp_path}')
    assert code == 2 and 'policy.learn.lr_per_256' in err


def test_val_class_unknown_to_train_is_a_clear_error(tiny_image_folder, tmp_path, capsys):
    os.makedirs(os.path.join(tiny_image_folder, 'val', 'zebra'))
    code, _, err = run_main(capsys, MAIN, '--data-root', tiny_image_folder, '--set', f'output_dir={tmp_path}')
    assert code == 2 and 'zebra' in err


@pytest.mark.slow  # > ~10 s on 2 cores
def test_short_run_on_generated_folder_writes_experiment(tiny_image_folder, tmp_path):
    result = run_tiny(tiny_image_folder, tmp_path, 'tiny', '--seed', '1')
    exp = tmp_path / 'tiny'
    summary = json.loads((exp / 'summary.json').read_text())
    assert summary['epochs'] == 2 and summary['eval_samples'] == 15 and summary['num_classes'] == 3
    assert json.loads((exp / 'classes.json').read_text()) == ['a_red', 'b_green', 'c_blue']
    from dizoo_imgcls.checkpoint import load_checkpoint
    from dizoo_imgcls.config import load_config_file
    saved = load_config_file(str(exp / 'total_config.py'))  # the run's settings, loadable again by --config
    assert (saved['seed'], saved['data']['root'], saved['data']['image_size'], saved['resume']) == (
        1, tiny_image_folder, 32, None)
    best = load_checkpoint(str(exp / 'ckpt' / 'ckpt_best.pth.tar'))
    assert best['position']['epoch'] == summary['best_epoch'] and best['best']['metric']['acc1'] == summary['best_acc1']
    assert f'tensorboard --logdir {exp / "tb"}' in result.stdout
    # a line every log_every=2 iterations, and one per epoch whose ETA runs out at the end
    per_epoch = int(re.search(r'(\d+) iterations per epoch', result.stdout).group(1))
    assert re.findall(r' iter (\d+)/(\d+) ', result.stdout) == [
        (str(i), str(2 * per_epoch)) for i in range(2, 2 * per_epoch + 1, 2)]
    epochs = re.findall(r'epoch (\d) done in \d:\d\d:\d\d: loss [\d.]+ acc1 [\d.]+, [\d.]+ img/s, data wait \d+%'
                        r'(?:, peak memory \d+ MiB)?, eta (\d:\d\d:\d\d)\n', result.stdout)
    assert [epoch for epoch, _ in epochs] == ['1', '2'] and epochs[-1][1] == '0:00:00', result.stdout
    # what the step runs on: amp='auto' is bf16 on a CPU with native bf16 dot products (AVX512-BF16 or AMX)
    bf16 = cpu_has_fast_bf16()
    precision = {True: 'bfloat16 autocast', False: 'fp32', None: '(bfloat16 autocast|fp32)'}[bf16]
    assert re.search(rf'training on cpu \(\d+ threads\), {precision}, channels_last\n', result.stdout), result.stdout


def cpu_has_fast_bf16():
    """Whether /proc/cpuinfo lists AVX512-BF16 or AMX tiles; None where there is no /proc/cpuinfo."""
    if not os.path.isfile('/proc/cpuinfo'):
        return None
    with open('/proc/cpuinfo') as f:
        flags = set(next((line for line in f if line.startswith('flags')), '').split())
    return bool(flags & {'avx512_bf16', 'amx_tile'})


@pytest.mark.slow  # > ~10 s on 2 cores
def test_the_demo_writes_the_digits_once_and_learns_them(tmp_path):
    from dizoo_imgcls.demo import prepare_digits

    cache = tmp_path / 'cache'
    root = prepare_digits(str(cache / 'digits'))
    files = {split: sorted(p.relative_to(cache / 'digits' / split).as_posix()
                           for p in (cache / 'digits' / split).rglob('*.png')) for split in ('train', 'val')}
    assert len(files['train']) + len(files['val']) == 1797 and len({f[2:] for f in files['train'] + files['val']}) == 1797
    assert len(files['val']) == sum(n // 5 for n in (178, 182, 177, 183, 181, 182, 181, 179, 174, 180))  # 1 in 5
    stamp = os.path.getmtime(os.path.join(root, 'val'))
    assert prepare_digits(str(cache / 'digits')) == root and os.path.getmtime(os.path.join(root, 'val')) == stamp
    damaged = tmp_path / 'damaged'  # a cache with a split deleted by hand is rebuilt, not used half
    (damaged / 'digits' / 'train' / '0').mkdir(parents=True)
    prepare_digits(str(damaged / 'digits'))
    assert len(list((damaged / 'digits').rglob('*.png'))) == 1797

    result = run_entry('--demo', '--set', f'output_dir={tmp_path / "runs"}', '--set', 'policy.learn.train_epoch=3',
                       env={'XDG_CACHE_HOME': str(cache)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(next((tmp_path / 'runs').rglob('summary.json')).read_text())
    assert summary['epochs'] == 3 and summary['eval_samples'] == len(files['val']) and summary['acc1'] >= 85
