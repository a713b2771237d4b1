"""entry/predict.py and entry/export.py on a real (briefly trained) checkpoint and real image files."""
import csv
import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from dizoo_imgcls.checkpoint import (CHECKPOINT_FORMAT, atomic_torch_save, checkpoint_class_names, load_checkpoint,
                                     load_model_from_checkpoint, step_checkpoints)
from dizoo_imgcls.config import build_config
from dizoo_imgcls.data import build_datasets
from dizoo_imgcls.model import IMAGENET_MEAN, IMAGENET_STD
from dizoo_imgcls.predict import EvalReader
from dizoo_imgcls.train import train

COLOURS = {'a_red': (200, 30, 30), 'b_green': (30, 200, 30), 'c_blue': (30, 30, 200)}
DISPLAY = ['red', 'green', 'blue']
IMAGE_PX = 32


def load_entry(name):
    spec = importlib.util.spec_from_file_location(f'_entry_{name}', os.path.join(REPO, 'entry', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def colour_image(colour, rng, size=(40, 48)):
    return np.clip(np.array(colour) + rng.normal(0, 20, (*size, 3)), 0, 255).astype(np.uint8)


@contextmanager
def logging_restored(name='dizoo_imgcls'):
    """A run in this process sets up its logger (console + train.log); the tests after it get the logger back."""
    log = logging.getLogger(name)
    saved = log.handlers[:], log.level, log.propagate
    try:
        yield
    finally:
        for handler in log.handlers[:]:
            log.removeHandler(handler)
            if handler not in saved[0]:
                handler.close()
        for handler in saved[0]:
            log.addHandler(handler)
        log.setLevel(saved[1])
        log.propagate = saved[2]


@pytest.fixture(scope='module')
def checkpoint_path(tmp_path_factory):
    """The last checkpoint of a real run, as the run writes it: a ResNet-18 trained in process for one epoch (6 steps)
    on generated colour = class images at 32 px, with an EMA of its weights and the display names of a synset-word
    file."""
    root, out = tmp_path_factory.mktemp('colours'), tmp_path_factory.mktemp('runs')
    rng = np.random.default_rng(0)
    for split, count in (('train', 24), ('val', 2)):
        for cls, colour in COLOURS.items():
            for i in range(count):
                save_colour(root / split / cls / f'{i}.jpg', colour, rng, (IMAGE_PX, IMAGE_PX))
    (root / 'LOC_synset_mapping.txt').write_text(''.join(f'{c} {d}\n' for c, d in zip(COLOURS, DISPLAY)))
    settings = [f'data.root="{root}"', f'output_dir="{out}"', 'exp_name="colours"', f'data.image_size={IMAGE_PX}',
                'data.num_workers=0', 'policy.cuda=False', 'policy.learn.batch_size=12', 'policy.learn.train_epoch=1',
                'policy.learn.warmup_epochs=0', 'policy.learn.amp="none"', 'policy.learn.lr_per_256=1.0',
                'policy.learn.ema.enabled=True', 'policy.learn.ema.decay=0.5']
    with logging_restored():
        summary = train(build_config({}, settings))
    assert summary['acc1'] == 100.0  # the colours were learned (the tests below rely on it)
    return step_checkpoints(os.path.join(summary['exp_dir'], 'ckpt'))[-1]


def save_colour(path, colour, rng, size=(40, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(colour_image(colour, rng, size)).save(path)


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """ImageNet layout: one train image per class (the class index) and a val split with small and large
    JPEGs (the 200x160 one is decoded at 1/4 scale with data.jpeg_draft), a PNG and a grayscale PNG."""
    root = tmp_path_factory.mktemp('data')
    rng = np.random.default_rng(1)
    for cls, colour in COLOURS.items():
        save_colour(root / 'train' / cls / '0.jpg', colour, rng)
    save_colour(root / 'val' / 'a_red' / 'big.jpg', COLOURS['a_red'], rng, (200, 160))
    save_colour(root / 'val' / 'a_red' / 'red.jpg', COLOURS['a_red'], rng)
    save_colour(root / 'val' / 'b_green' / 'green.png', COLOURS['b_green'], rng)
    save_colour(root / 'val' / 'c_blue' / 'blue.jpg', COLOURS['c_blue'], rng, (64, 40))
    Image.fromarray(np.full((40, 48), 128, np.uint8), mode='L').save(root / 'val' / 'c_blue' / 'gray.png')
    return root


@pytest.fixture(scope='module')
def mixed_dir(tmp_path_factory):
    """Good images (one in a sub-folder); bad ones: a truncated JPEG, an empty PNG, a text file named .png;
    never read: a .txt file and a hidden file (the training reader skips both too)."""
    root = tmp_path_factory.mktemp('mixed')
    rng = np.random.default_rng(2)
    save_colour(root / 'red.jpg', COLOURS['a_red'], rng)
    save_colour(root / 'green.png', COLOURS['b_green'], rng)
    save_colour(root / 'sub' / 'blue.jpg', COLOURS['c_blue'], rng)
    (root / 'broken.jpg').write_bytes((root / 'red.jpg').read_bytes()[:300])  # a JPEG cut short
    (root / 'empty.png').write_bytes(b'')
    (root / 'fake.png').write_text('text saved under an image name')
    (root / 'notes.txt').write_text('no image extension')
    (root / '._red.jpg').write_bytes(b'macOS resource fork')
    return root


GOOD = ['green.png', 'red.jpg', os.path.join('sub', 'blue.jpg')]
BAD = {'broken.jpg': 'damaged image data', 'empty.png': 'empty file (0 bytes)',
       'fake.png': 'not an image'}


def run_predict(capsys, *argv):
    code = load_entry('predict').main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_top1_is_the_models_argmax_on_the_training_val_pipeline(checkpoint_path, data_root, capsys):
    code, out, err = run_predict(capsys, '--checkpoint', checkpoint_path, '--input', str(data_root / 'val'),
                                 '--topk', '10', '--format', 'json', '--batch-size', '2')
    assert code == 0 and err == ''
    records = json.loads(out)
    model, config, _ = load_model_from_checkpoint(checkpoint_path)
    assert config['data']['jpeg_draft']
    # The val split exactly as training built it; its order (class, then path) is predict's sorted order here.
    _, val_set = build_datasets({**config['data'], 'root': str(data_root)})
    assert len(records) == len(val_set) == 5
    for record, (pixels, target) in zip(records, val_set):
        top = record['predictions']
        assert [p['rank'] for p in top] == [1, 2, 3]  # topk clamped to the 3 classes
        assert sum(p['probability'] for p in top) == pytest.approx(1.0, abs=1e-5)
        with torch.no_grad():
            expected = torch.softmax(model(pixels.unsqueeze(0)), dim=1)[0]
        assert top[0]['class_index'] == int(expected.argmax())
        assert top[0]['class_name'] == DISPLAY[top[0]['class_index']]
        for p in top:
            assert p['probability'] == pytest.approx(float(expected[p['class_index']]), abs=1e-5)
        if 'gray' not in record['path']:
            assert top[0]['class_index'] == target  # the colours were learned


def test_bad_files_are_reported_once_each_and_the_rest_predicted_as_csv(checkpoint_path, mixed_dir, capsys):
    code, out, err = run_predict(capsys, '--checkpoint', checkpoint_path, '--input', str(mixed_dir),
                                 '--topk', '2', '--format', 'csv')
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [os.path.relpath(r['path'], mixed_dir) for r in rows[::2]] == GOOD  # sorted, recursive
    assert [r['rank'] for r in rows] == ['1', '2'] * len(GOOD)
    assert all(0.0 <= float(r['probability']) <= 1.0 and r['class_name'] in DISPLAY for r in rows)
    lines = err.strip().splitlines()
    assert len(lines) == len(BAD), err
    for line, (name, reason) in zip(lines, sorted(BAD.items())):
        assert line.startswith(f'skipped {mixed_dir / name}: {reason}'), line


def test_table_for_one_file_names_the_image_and_its_classes(checkpoint_path, mixed_dir, capsys):
    image = str(mixed_dir / 'red.jpg')
    code, out, err = run_predict(capsys, '--checkpoint', checkpoint_path, '--input', image, '--topk', '1')
    assert code == 0 and err == ''
    lines = out.strip().splitlines()
    assert lines[0] == image and len(lines) == 2
    assert lines[1].split()[:2] == ['1.', 'red'] and lines[1].endswith('%')


def test_nothing_predictable_exits_1(checkpoint_path, mixed_dir, tmp_path, capsys):
    code, out, err = run_predict(capsys, '--checkpoint', checkpoint_path, '--input', str(mixed_dir / 'broken.jpg'))
    assert code == 1 and out == ''
    assert 'broken.jpg' in err and 'no image could be predicted' in err
    # an input that is not there is a command-line mistake: exit 2 (issue 23)
    code, out, err = run_predict(capsys, '--checkpoint', checkpoint_path,
                                 '--input', str(mixed_dir / 'broken.jpg'), str(tmp_path / 'missing'))
    assert code == 2 and out == ''
    assert 'broken.jpg' in err and 'missing: no such file or folder' in err and 'no image could be predicted' in err


class RunsCode:
    """Unpickling this runs ``os.system``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def malicious_checkpoint(folder):
    marker, bad = folder / 'pwned', folder / 'evil.pth.tar'
    torch.save({'format': CHECKPOINT_FORMAT, 'config': RunsCode(marker)}, bad)
    return bad, marker


def test_malicious_checkpoint_is_refused_by_predict_process_with_exit_2(tmp_path):
    bad, marker = malicious_checkpoint(tmp_path)
    result = subprocess.run([sys.executable, os.path.join(REPO, 'entry', 'predict.py'), '--checkpoint', str(bad),
                             '--input', str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2 and not marker.exists() and result.stdout == ''
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and 'refusing' in lines[0], result.stderr
    torch.load(bad, weights_only=False)  # the file really is malicious: an unsafe load runs its code
    assert marker.exists()


def test_malicious_checkpoint_is_refused_by_export_with_exit_2(tmp_path, capsys):
    bad, marker = malicious_checkpoint(tmp_path)
    out_file = tmp_path / 'x.onnx'
    code = load_entry('export').main(['--checkpoint', str(bad), '--format', 'onnx', '--output', str(out_file)])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists() and not out_file.exists()
    assert len(err.strip().splitlines()) == 1 and str(bad) in err and 'refusing' in err


def write_bad_checkpoint(kind, path, good_path):
    if kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'garbage':
        path.write_bytes(b'not a torch file')
    elif kind == 'truncated':
        path.write_bytes(open(good_path, 'rb').read()[:5000])
    elif kind == 'state_dict':  # loads safely, but is not our layout
        torch.save({'weight': torch.zeros(2)}, path)
    else:  # our layout, but resnet18 weights under a resnet34 config
        state = load_checkpoint(good_path)
        state['config']['policy']['model']['name'] = 'resnet34'
        torch.save(state, path)


@pytest.mark.parametrize('kind, says', [('empty', ''), ('garbage', ''), ('truncated', ''),
                                        ('state_dict', 'is not a dizoo_imgcls checkpoint'),
                                        ('other_model', "cannot rebuild model 'resnet34'")])
def test_damaged_or_foreign_checkpoint_is_one_line_and_exit_2(checkpoint_path, tmp_path, capsys, kind, says):
    bad = tmp_path / 'bad.pth.tar'
    write_bad_checkpoint(kind, bad, checkpoint_path)
    code, out, err = run_predict(capsys, '--checkpoint', str(bad), '--input', str(tmp_path))
    assert code == 2 and out == ''
    assert len(err.strip().splitlines()) == 1 and str(bad) in err and says in err, err
    code = load_entry('imagenet_res18_main').main(['--eval-only', '--resume', str(bad), '--data-root', str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(bad) in err and says in err, err


def test_eval_only_needs_no_train_folder_and_reports_beside_a_loose_checkpoint(checkpoint_path, data_root, tmp_path,
                                                                               capsys):
    held_out = tmp_path / 'test_set'  # a held-out test folder: val/ only
    held_out.mkdir()
    os.symlink(data_root / 'val', held_out / 'val')
    loose = tmp_path / 'models' / 'best.pth.tar'  # not in an experiment's ckpt/ folder
    loose.parent.mkdir()
    loose.write_bytes(open(checkpoint_path, 'rb').read())
    code = load_entry('imagenet_res18_main').main(['--eval-only', '--resume', str(loose), '--data-root',
                                                   str(held_out), '--set', 'data.num_workers=0'])
    assert code == 0, capsys.readouterr().err
    with open(tmp_path / 'models' / 'eval' / 'confusion_matrix.csv') as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == DISPLAY and [sum(int(v) for v in row[1:]) for row in rows[1:]] == [2, 1, 2]  # 5 val images
    code = load_entry('imagenet_res18_main').main(['--eval-only', '--resume', str(loose), '--data-root',
                                                   str(held_out), '--seed', '3'])
    assert code == 2 and 'drop --seed' in capsys.readouterr().err  # settings come from the checkpoint


def test_a_fine_tuned_checkpoint_predicts_without_the_weights_it_started_from(checkpoint_path, tmp_path):
    state = load_checkpoint(checkpoint_path)
    state['config']['policy']['model']['pretrained'] = str(tmp_path / 'deleted_imagenet_weights.pth')
    moved = tmp_path / 'fine_tuned.pth.tar'
    torch.save(state, moved)
    model, _, _ = load_model_from_checkpoint(str(moved))
    reference, _, _ = load_model_from_checkpoint(checkpoint_path)
    images = torch.randint(0, 256, (2, 3, IMAGE_PX, IMAGE_PX), dtype=torch.uint8)
    assert torch.equal(model(images), reference(images))


def test_a_head_larger_than_the_class_list_predicts_with_its_extra_outputs_named(checkpoint_path, mixed_dir,
                                                                                  data_root, tmp_path, capsys):
    # Training accepts policy.model.num_classes above the folder's class count; such a checkpoint must predict.
    state = load_checkpoint(checkpoint_path)
    state['class_names'], state['display_names'] = list(COLOURS)[:2], list(DISPLAY)[:2]
    wide = tmp_path / 'wide.pth.tar'
    torch.save(state, wide)
    code, out, err = run_predict(capsys, '--checkpoint', str(wide), '--input', str(mixed_dir), '--topk', '3',
                                 '--format', 'json')
    assert code == 0, err
    names = {p['class_name'] for record in json.loads(out) for p in record['predictions']}
    assert names <= set(DISPLAY[:2]) | {'(unused output 2)'} and '(unused output 2)' in names
    two_classes = tmp_path / 'two' / 'val'  # --eval-only on a val folder of the two named classes
    two_classes.mkdir(parents=True)
    for name in list(COLOURS)[:2]:
        (two_classes / name).symlink_to(data_root / 'val' / name)
    code = load_entry('imagenet_res18_main').main(['--eval-only', '--resume', str(wide), '--data-root',
                                                   str(tmp_path / 'two'), '--set', 'data.num_workers=0'])
    assert code == 0, capsys.readouterr().err
    with open(tmp_path / 'eval' / 'confusion_matrix.csv') as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == DISPLAY[:2] + ['(unused output 2)'] and len(rows) == 4
    state['class_names'] = state['display_names'] = list(COLOURS) + ['extra']  # more names than outputs
    torch.save(state, wide)
    code, out, err = run_predict(capsys, '--checkpoint', str(wide), '--input', str(mixed_dir))
    assert code == 2 and 'policy.model.num_classes is 3 but 4 class names are stored' in err


def run_exported(fmt, path, images):
    if fmt == 'torchscript':
        return torch.jit.load(path)(images)
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])


@pytest.mark.filterwarnings('ignore:`torch.jit.load` is deprecated')
@pytest.mark.parametrize('fmt, suffix', [('torchscript', '.pt'), ('onnx', '.onnx')])
def test_export_reloads_and_matches_pytorch_on_another_batch_size(checkpoint_path, tmp_path, capsys, fmt, suffix):
    out_file = str(tmp_path / f'model{suffix}')
    code = load_entry('export').main(['--checkpoint', checkpoint_path, '--format', fmt, '--output', out_file])
    out, err = capsys.readouterr()
    assert code == 0, err
    printed = float(out.split('(traced with 2): ')[1].split()[0])
    assert 0.0 <= printed < 1e-4
    model, _, _ = load_model_from_checkpoint(checkpoint_path)
    images = torch.randint(0, 256, (5, 3, IMAGE_PX, IMAGE_PX), dtype=torch.uint8)  # traced 2, verified 3
    with torch.no_grad():
        expected = model(images)
    actual = run_exported(fmt, out_file, images)
    assert actual.shape == (5, 3)
    assert (actual - expected).abs().max().item() < 1e-4
    meta = json.loads(open(out_file + '.json').read())
    assert meta['class_names'] == DISPLAY and meta['export_format'] == fmt
    assert meta['input']['dtype'] == 'uint8' and meta['input']['shape'] == ['batch', 3, IMAGE_PX, IMAGE_PX]
    assert meta['preprocessing']['resize_shorter_side_px'] == round(IMAGE_PX / 0.875)
    assert meta['preprocessing']['mean'] == pytest.approx(IMAGENET_MEAN)
    assert meta['preprocessing']['std'] == pytest.approx(IMAGENET_STD)
    assert meta['verification']['max_abs_diff_vs_pytorch_fp32'] == pytest.approx(printed, rel=1e-2, abs=1e-12)


@pytest.mark.filterwarnings('ignore:`torch.jit.load` is deprecated')
@pytest.mark.parametrize('fmt, suffix', [('torchscript', '.pt'), ('onnx', '.onnx')])
@pytest.mark.parametrize('name, options', [('timm/resnet18d', dict(activation='silu')),
                                           ('timm/resnet18d', dict(activation='mish', blur_pool=True,
                                                                   block_args=dict(attn_layer='se'),
                                                                   self_attention=True))])
@pytest.mark.slow  # > ~10 s on 2 cores
def test_the_imagenette_recipes_model_exports_too(tmp_path, fmt, suffix, name, options):
    """timm's ResNet-18-D with SiLU (config/imagenette_res18_config.py): deep stem, average-pool shortcuts and SiLU all
    survive tracing / ONNX (SiLU has no ONNX op of its own before opset 24: it becomes x * Sigmoid(x)); so do the
    recipe search's Mish, SE blocks, MaxBlurPool stem and self-attention (its spectral norm included)."""
    from dizoo_imgcls.export import export_onnx, export_torchscript, verify_export
    from dizoo_imgcls.model import create_model

    torch.manual_seed(0)
    model = create_model(name, 3, zero_init_residual=False, **options).eval()
    torch.nn.init.normal_(model.backbone.fc.weight, 0, 10.0)  # logits of order 1 (the init gives ~0.01)
    for module in model.modules():
        if hasattr(module, 'gamma'):  # self-attention's gamma, which starts at 0 (the identity)
            module.gamma.data.fill_(1e-4)
    path = str(tmp_path / f'model{suffix}')
    (export_onnx if fmt == 'onnx' else export_torchscript)(model, torch.randint(0, 256, (2, 3, 64, 64),
                                                                                 dtype=torch.uint8), path)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert verify_export(model, fmt, path, images) < 1e-4
    with torch.no_grad():
        assert model(images).std().item() > 0.1  # logits that differ, not a constant that trivially matches


def test_export_that_misses_the_tolerance_writes_nothing_and_exits_1(checkpoint_path, tmp_path, capsys,
                                                                     monkeypatch):
    from dizoo_imgcls import export

    args = ['--checkpoint', checkpoint_path, '--format', 'torchscript']
    monkeypatch.setattr(export, 'MAX_ABS_DIFF', 0.0)  # no difference is below 0: verification must fail
    out_file = tmp_path / 'model.pt'
    assert load_entry('export').main(args + ['--output', str(out_file)]) == 1
    err = capsys.readouterr().err
    assert 'differs from PyTorch' in err and str(out_file) in err
    assert os.listdir(tmp_path) == []  # no model, no sidecar, no temporary file

    # A failed re-export leaves the earlier verified model and its sidecar as they were.
    monkeypatch.undo()
    assert load_entry('export').main(args + ['--output', str(out_file)]) == 0
    good = out_file.read_bytes(), (tmp_path / 'model.pt.json').read_text()
    monkeypatch.setattr(export, 'MAX_ABS_DIFF', 0.0)
    assert load_entry('export').main(args + ['--output', str(out_file)]) == 1
    assert (out_file.read_bytes(), (tmp_path / 'model.pt.json').read_text()) == good
    assert sorted(os.listdir(tmp_path)) == ['model.pt', 'model.pt.json']


def test_folder_names_are_shown_when_the_checkpoint_has_no_display_names():
    state = {'class_names': ['n01440764', 'n02102040'], 'display_names': None}
    assert checkpoint_class_names(state, 'x.pth.tar') == ['n01440764', 'n02102040']
    state['display_names'] = ['tench', 'English springer']
    assert checkpoint_class_names(state, 'x.pth.tar') == ['tench', 'English springer']


def test_ema_weights_predict_and_export_when_asked(checkpoint_path, data_root, tmp_path, capsys):
    state = torch.load(checkpoint_path, weights_only=True)
    ema, _, _ = load_model_from_checkpoint(checkpoint_path, 'ema')
    trained, _, _ = load_model_from_checkpoint(checkpoint_path)
    averaged = {k[len('module.'):]: v for k, v in state['policy']['ema'].items() if k.startswith('module.')}
    for name, value in ema.state_dict().items():
        assert torch.equal(value, averaged[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(ema.state_dict().values(), trained.state_dict().values()))

    image = next(p for p in sorted((data_root / 'val').rglob('*.jpg')))
    code, out, _ = run_predict(capsys, '--checkpoint', checkpoint_path, '--input', str(image), '--format', 'json',
                               '--weights', 'ema', '--topk', '3')
    assert code == 0
    pixels = EvalReader(state['config']['data'])(str(image))
    with torch.no_grad():
        expected = torch.softmax(ema(pixels.unsqueeze(0)), dim=1)[0]
    for p in json.loads(out)[0]['predictions']:
        assert p['probability'] == pytest.approx(float(expected[p['class_index']]), abs=1e-5)

    plain = tmp_path / 'plain.pth.tar'
    del state['policy']['ema']
    atomic_torch_save(state, str(plain))
    code, _, err = run_predict(capsys, '--checkpoint', str(plain), '--input', str(image), '--weights', 'ema')
    assert code == 2 and 'holds no EMA weights' in err and len(err.strip().splitlines()) == 1


def test_bad_options_inputs_and_outputs_are_one_line_errors(checkpoint_path, tmp_path, capsys):
    code, out, err = run_predict(capsys, '--checkpoint', checkpoint_path, '--input', str(tmp_path), '--device', 'gpu')
    assert code == 2 and 'Traceback' not in err and '--device gpu' in err
    with pytest.raises(SystemExit) as exit_info:  # argparse: exit 2 with a usage line
        load_entry('predict').parse_args(['--checkpoint', checkpoint_path, '--input', '.', '--workers', '-1'])
    assert exit_info.value.code == 2 and '>= 0' in capsys.readouterr().err
    # a symlink loop inside an input folder: that folder is reported, not a traceback
    looped = tmp_path / 'looped' / 'a'
    looped.mkdir(parents=True)
    save_colour(looped / 'red.jpg', COLOURS['a_red'], np.random.default_rng(3))
    os.symlink('..', looped / 'back')
    code, out, err = run_predict(capsys, '--checkpoint', checkpoint_path, '--input', str(tmp_path / 'looped'))
    assert code == 1 and f'skipped {tmp_path / "looped"}:' in err and 'Traceback' not in err
    # export to a path that is a folder
    code = load_entry('export').main(['--checkpoint', checkpoint_path, '--format', 'torchscript', '--output',
                                      str(tmp_path)])
    assert code == 1 and 'is a folder' in capsys.readouterr().err


def test_weights_that_give_nan_are_named_not_printed_as_nan(checkpoint_path, mixed_dir, tmp_path, capsys):
    state = load_checkpoint(checkpoint_path)
    state['policy']['model']['backbone.fc.bias'][:] = float('nan')  # what a diverged run leaves
    diverged = tmp_path / 'diverged.pth.tar'
    torch.save(state, diverged)
    code, out, err = run_predict(capsys, '--checkpoint', str(diverged), '--input', str(mixed_dir / 'red.jpg'),
                                 '--format', 'json')
    assert code == 1 and json.loads(out) == [] and 'not finite' in err


def test_file_names_that_are_not_utf8_are_printed_escaped_not_fatal(checkpoint_path, mixed_dir, tmp_path):
    folder = tmp_path / 'latin1'
    folder.mkdir()
    for name in (b'a.jpg', b'caf\xe9.jpg', b'z.jpg'):  # valid Linux names, not valid UTF-8
        with open(os.path.join(os.fsencode(folder), name), 'wb') as f:
            f.write((mixed_dir / 'red.jpg').read_bytes())
    result = subprocess.run([sys.executable, os.path.join(REPO, 'entry', 'predict.py'), '--checkpoint',
                             checkpoint_path, '--input', str(folder), '--format', 'csv', '--topk', '1'],
                            capture_output=True, cwd=REPO, env=dict(os.environ, PYTHONIOENCODING='utf-8'))
    assert result.returncode == 0, result.stderr.decode(errors='replace')[-2000:]
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 4 and 'caf\\udce9.jpg' in lines[2] and lines[3].startswith(str(folder / 'z.jpg'))
