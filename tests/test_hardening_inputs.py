"""Bad inputs refused in one line before anything is written (issue 23: items 3, 4, 9 and 11's input parts):
writers that would overwrite their own input, image sizes, unreadable splits, config value types, and the
predict entry's file names, missing inputs and non-regular files."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_main
from dizoo_imgcls.checkpoint import CHECKPOINT_FORMAT, atomic_torch_save, rng_state, to_plain
from dizoo_imgcls.config import ConfigError, build_config, default_config
from dizoo_imgcls.data.check import UnreadableSplitError, check_split_readable
from dizoo_imgcls.data.folder import ImageFolderSplit
from dizoo_imgcls.data.transforms import EvalPreset
from dizoo_imgcls.policy import ImageClassificationPolicy

CLASSES = ['a_red', 'b_green']
COLOURS = [(200, 30, 30), (30, 200, 30)]
SMALL_RUN = ['--set', 'data.image_size=32', '--set', 'policy.learn.batch_size=4', '--set', 'policy.eval.batch_size=4',
             '--set', 'data.num_workers=0', '--set', 'policy.cuda=False', '--set', 'policy.learn.train_epoch=1']


def save_image(path, colour, size=(24, 28)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(np.clip(np.array(colour) + rng.normal(0, 10, (*size, 3)), 0, 255).astype(np.uint8)).save(path)


@pytest.fixture
def data_root(tmp_path):
    """Two classes, 4 train and 2 val JPEGs each."""
    for split, count in (('train', 4), ('val', 2)):
        for cls, colour in zip(CLASSES, COLOURS):
            for i in range(count):
                save_image(tmp_path / 'data' / split / cls / f'{i}.jpg', colour)
    return tmp_path / 'data'


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A real (untrained) checkpoint of a small ResNet-18 at 32 px, in the documented layout."""
    torch.manual_seed(0)
    cfg = default_config()
    cfg.data.image_size = 32
    cfg.policy.cuda = False
    cfg.policy.model.num_classes = len(CLASSES)
    cfg.policy.learn.update(dict(batch_size=4, iters_per_epoch=1, train_epoch=1, amp='none'))
    policy = ImageClassificationPolicy(cfg.policy, enable_field=['learn'])
    state = {'format': CHECKPOINT_FORMAT, 'policy': policy.learn_mode.state_dict(), 'last_iter': 1,
             'position': {'epoch': 1, 'batch': 0}, 'rng': rng_state(), 'best': {'metric': None, 'epoch': 0},
             'history': [], 'config': to_plain(cfg), 'class_names': list(CLASSES), 'display_names': None}
    path = tmp_path_factory.mktemp('ckpt') / 'ckpt_best.pth.tar'
    atomic_torch_save(state, str(path))
    return path


def one_error_line(err, *words):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in err, err
    for word in words:
        assert word in lines[0], err
    return lines[0]


# ---- 3: writers refuse to overwrite their own input ----

def test_export_refuses_an_output_that_is_the_checkpoint(checkpoint, tmp_path, capsys):
    before = checkpoint.read_bytes()
    os.symlink(checkpoint, tmp_path / 'link.pth.tar')
    os.symlink(checkpoint, tmp_path / 'weights.json')  # --output weights: its sidecar would be the checkpoint
    spellings = [os.path.join(str(checkpoint.parent), '.', '..', checkpoint.parent.name, checkpoint.name),
                 str(tmp_path / 'link.pth.tar'), str(tmp_path / 'weights')]
    for output in [str(checkpoint)] + spellings:  # itself, another spelling, a symlink, the sidecar
        code, out, err = run_main(capsys, 'export', '--checkpoint', checkpoint, '--format', 'torchscript',
                                   '--output', output)
        assert code == 2, err
        one_error_line(err, output, 'is the checkpoint')
    assert checkpoint.read_bytes() == before
    assert sorted(os.listdir(checkpoint.parent)) == [checkpoint.name]


def test_export_over_its_checkpoint_in_a_real_process(checkpoint):
    """The plain case as a user runs it: exit status 2, one stderr line, the checkpoint unchanged."""
    before = checkpoint.read_bytes()
    result = subprocess.run([sys.executable, os.path.join(REPO, 'entry', 'export.py'), '--checkpoint',
                             str(checkpoint), '--format', 'torchscript', '--output', str(checkpoint)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2, result.stderr[-2000:]
    one_error_line(result.stderr, str(checkpoint), 'is the checkpoint')
    assert checkpoint.read_bytes() == before


def test_resized_copy_refuses_an_output_inside_its_source_also_through_a_link(data_root, tmp_path, capsys):
    from dizoo_imgcls.prepare import main as prepare_main

    before = sorted(p for p in os.listdir(data_root / 'train'))
    os.symlink(data_root / 'train', tmp_path / 'link_to_train')
    for out in (tmp_path / 'link_to_train' / 'copy', tmp_path / 'link_to_train'):  # would add a class to train/
        assert prepare_main(['resize', '--root', str(data_root), '--out', str(out), '--short-side', '16']) == 2
        one_error_line(capsys.readouterr().err, 'must lie outside --root')
    assert sorted(os.listdir(data_root / 'train')) == before
    # the other way round: the source inside the output folder (a later update would delete it as stale)
    assert prepare_main(['resize', '--root', str(data_root), '--out', str(tmp_path), '--short-side', '16']) == 2
    one_error_line(capsys.readouterr().err, 'must not hold --root')


def test_label_issues_refuse_outputs_in_the_data_or_over_the_checkpoint(data_root, checkpoint, tmp_path, capsys):
    for out_dir in (data_root / 'train' / 'reports', data_root / 'val'):
        code, out, err = run_main(capsys, 'find_label_issues', '--data-root', data_root, '--split', 'val',
                                   '--checkpoint', checkpoint, '--out-dir', out_dir)
        assert code == 2
        one_error_line(err, str(out_dir), 'class folder')
    assert sorted(os.listdir(data_root / 'train')) == CLASSES and sorted(os.listdir(data_root / 'val')) == CLASSES
    # a checkpoint saved under the report's name: the CSV would be written over it
    reports = tmp_path / 'reports'
    reports.mkdir()
    os.symlink(checkpoint, reports / 'label_issues.csv')
    before = checkpoint.read_bytes()
    code, out, err = run_main(capsys, 'find_label_issues', '--data-root', data_root, '--split', 'val',
                               '--checkpoint', reports / 'label_issues.csv', '--out-dir', reports)
    assert code == 2
    one_error_line(err, 'over the checkpoint')
    assert checkpoint.read_bytes() == before


# ---- 4: image sizes ----

@pytest.mark.parametrize('setting, says', [('data.image_size=0', ('data.image_size', '1..2048')),
                                           ('data.image_size=100000', ('data.image_size', '1..2048', '30 GB')),
                                           ('data.image_size=-3', ('data.image_size', '1..2048')),
                                           ('data.eval_image_size=0', ('data.eval_image_size', '1..2048')),
                                           ('data.eval_image_size=5000', ('data.eval_image_size', '1..2048')),
                                           ('data.progressive_resize.start_scale=2.0', ('start_scale', '(0, 1]')),
                                           ('policy.eval.tta.scales=[80.0]', ('policy.eval.tta.scales', '2048'))])
def test_bad_image_sizes_are_one_line_before_any_folder(data_root, tmp_path, capsys, setting, says):
    out = tmp_path / 'runs'
    code, _, err = run_main(capsys, 'imagenet_res18_main', '--data-root', data_root, *SMALL_RUN,
                             '--set', f'output_dir={str(out)!r}', '--set', setting)
    assert code == 2
    line = one_error_line(err, *says)
    assert not out.exists(), line


@pytest.mark.parametrize('size', ['-5', '0', '100000'])
def test_eval_only_refuses_bad_eval_sizes(data_root, checkpoint, capsys, size):
    code, _, err = run_main(capsys, 'imagenet_res18_main', '--eval-only', '--resume', checkpoint, '--data-root',
                             data_root, '--set', f'data.eval_image_size={size}')
    assert code == 2
    one_error_line(err, 'data.eval_image_size', size)
    assert not (checkpoint.parent / 'eval').exists()


def test_sizes_in_range_pass():
    cfg = build_config({'data': {'image_size': 2048, 'eval_image_size': 1}},
                       ['data.progressive_resize.start_scale=0.5'])
    assert cfg.data.image_size == 2048 and cfg.data.eval_image_size == 1


# ---- 9: unreadable splits found before the first epoch ----

def empty_all(folder):
    for dirpath, _, files in os.walk(folder):
        for name in files:
            open(os.path.join(dirpath, name), 'wb').close()


@pytest.mark.parametrize('split', ['val', 'train'])
def test_an_unreadable_split_is_one_line_before_training(data_root, tmp_path, capsys, split):
    empty_all(data_root / split)
    out = tmp_path / 'runs'
    code, _, err = run_main(capsys, 'imagenet_res18_main', '--data-root', data_root, *SMALL_RUN,
                             '--set', f'output_dir={str(out)!r}')
    assert code == 2
    one_error_line(err, 'no readable image in', str(data_root / split), 'empty file')
    assert not out.exists()


def test_some_unreadable_files_are_one_warning_and_no_error(data_root, caplog):
    (data_root / 'val' / 'a_red' / '0.jpg').write_bytes(b'')
    (data_root / 'val' / 'b_green' / '1.jpg').write_bytes(b'not an image')
    split = ImageFolderSplit(str(data_root / 'val'), {c: i for i, c in enumerate(CLASSES)}, EvalPreset(16),
                             replace_unreadable=False)
    with caplog.at_level(logging.WARNING, logger='dizoo_imgcls'):
        check_split_readable(split, 'val', all_headers=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith('2 of 4 val files') and '0.jpg: empty file' in warnings[0]


def test_a_split_whose_sample_fails_is_searched_for_one_readable_file(data_root):
    """All of the (1-file) sample is bad, one file outside it decodes: no error."""
    files = sorted((data_root / 'train').rglob('*.jpg'))
    for path in files[:-1]:
        path.write_bytes(b'\xff\xd8\xff truncated')
    split = ImageFolderSplit(str(data_root / 'train'), {c: i for i, c in enumerate(CLASSES)})
    check_split_readable(split, 'train', all_headers=False, sample=1)
    files[-1].write_bytes(b'')
    with pytest.raises(UnreadableSplitError, match=f'all {len(files)} train files'):
        check_split_readable(split, 'train', all_headers=False, sample=1)


# ---- 11: config value types, None overrides, predict's output and exit codes ----

def test_a_config_file_value_of_the_wrong_type_names_the_key(data_root, tmp_path, capsys):
    config = tmp_path / 'my_config.py'
    config.write_text("main_config = dict(policy=dict(learn=dict(batch_size='8')))\n")
    out = tmp_path / 'runs'
    code, _, err = run_main(capsys, 'imagenet_res18_main', '--config', config, '--data-root', data_root,
                             '--set', f'output_dir={str(out)!r}')
    assert code == 2 and not out.exists()
    one_error_line(err, str(config), 'policy.learn.batch_size', "'8'")
    with pytest.raises(ConfigError, match='data.hflip must be a bool'):
        build_config({'data': {'hflip': 'yes'}})
    # numbers stay numbers: a fractional warmup where the default is an int is fine
    assert build_config({'policy': {'learn': {'warmup_epochs': 0.25}}}).policy.learn.warmup_epochs == 0.25


def test_set_none_is_none_for_keys_that_default_to_none():
    cfg = build_config({'policy': {'model': {'activation': 'silu'}}, 'data': {'auto_augment': 'randaugment'}},
                       ['policy.model.activation=None', 'data.auto_augment=none', 'policy.learn.amp=none'])
    assert cfg.policy.model.activation is None and cfg.data.auto_augment is None
    assert cfg.policy.learn.amp == 'none'  # a text key with a text default keeps the word (the mode 'none')


def test_predict_prints_a_name_with_a_newline_on_one_line(checkpoint, tmp_path, capsys):
    name = tmp_path / 'two\nlines.jpg'
    save_image(name, COLOURS[0])
    code, out, err = run_main(capsys, 'predict', '--checkpoint', checkpoint, '--input', name, '--topk', '2')
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3 and lines[0] == repr(str(name)) and lines[1].lstrip().startswith('1.')
    # skipped files are one line each too
    (tmp_path / 'bad\nfile.jpg').write_bytes(b'')
    code, out, err = run_main(capsys, 'predict', '--checkpoint', checkpoint, '--input', tmp_path / 'bad\nfile.jpg')
    expected = 'skipped ' + repr(str(tmp_path / 'bad\nfile.jpg')) + ': empty file (0 bytes)'  # 'bad\\nfile.jpg'
    assert code == 1 and err.splitlines()[0] == expected and '\\n' in expected, err


def test_predict_exits_2_for_a_missing_or_non_regular_input(checkpoint, tmp_path, capsys):
    good = tmp_path / 'red.jpg'
    save_image(good, COLOURS[0])
    code, out, err = run_main(capsys, 'predict', '--checkpoint', checkpoint, '--input', tmp_path / 'missing.jpg')
    assert code == 2 and f'skipped {tmp_path / "missing.jpg"}: no such file or folder' in err
    os.symlink('/dev/urandom', tmp_path / 'random.jpg')
    os.symlink(tmp_path / 'gone.jpg', tmp_path / 'dangling.jpg')
    code, out, err = run_main(capsys, 'predict', '--checkpoint', checkpoint, '--input', tmp_path / 'random.jpg',
                               tmp_path / 'dangling.jpg', good)
    assert code == 2
    assert f'skipped {tmp_path / "random.jpg"}: not a regular file' in err
    assert f'skipped {tmp_path / "dangling.jpg"}: broken symbolic link' in err
    assert out.splitlines()[0] == str(good)  # the good input is still predicted
