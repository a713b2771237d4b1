"""Bad files never crash a run: each is read correctly (mode conversions) or skipped, logged once, replaced,
and counted across loader worker processes; --check-data names every one."""
import io
import json
import logging
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from dizoo_imgcls.checkpoint import load_checkpoint, step_checkpoints
from dizoo_imgcls.data.decode import _jpeg_region, read_image_file, simplejpeg
from dizoo_imgcls.data.folder import DataLayoutError, ImageFolderSplit, class_index
from dizoo_imgcls.data.transforms import EvalPreset, TrainPreset
from conftest import run_main
from test_entry import run_entry

RED = (200, 30, 30)
CLASSES = {'a_red': RED, 'b_green': (30, 200, 30), 'c_blue': (30, 30, 200)}
# simplejpeg comes with install_requires; where it is missing, 'auto' decodes with Pillow and only that path runs.
DECODERS = ['pil', pytest.param('simplejpeg', marks=pytest.mark.skipif(simplejpeg is None, reason='no simplejpeg')),
            pytest.param('region', marks=pytest.mark.skipif(_jpeg_region is None or simplejpeg is None,
                                                            reason='the C extension was not built'))]


def jpeg_bytes(colour=RED, size=(48, 40), mode='RGB') -> bytes:
    buffer = io.BytesIO()
    Image.new('RGB', size, colour).convert(mode).save(buffer, 'JPEG', quality=90)
    return buffer.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height``: Pillow sees the size without decoding anything."""
    buffer = io.BytesIO()
    Image.new('L', (1, 1)).save(buffer, 'PNG')
    data = bytearray(buffer.getvalue())
    ihdr = struct.pack('>II', width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack('>I', zlib.crc32(b'IHDR' + ihdr))
    return bytes(data)


def jpeg_bomb(width: int, height: int) -> bytes:
    data = bytearray(jpeg_bytes())
    sof = data.index(b'\xff\xc0')
    data[sof + 5:sof + 9] = struct.pack('>HH', height, width)
    return bytes(data)


def write_good_images(root, split: str, count: int) -> None:
    for cls, colour in CLASSES.items():
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (folder / f'{i}.jpg').write_bytes(jpeg_bytes(colour))


def make_bad_corpus(root) -> dict:
    """An ImageNet-layout folder with every kind of awkward file; returns {'bad': [paths], 'odd_ok': [paths]}."""
    write_good_images(root, 'train', 4)
    write_good_images(root, 'val', 2)
    folder = root / 'train' / 'a_red'
    bad = {
        'zero.jpg': b'',
        'truncated.jpg': jpeg_bytes(size=(160, 120))[:400],
        'text.jpg': b'this is a text file, not a JPEG\n',
        'bomb.png': png_bomb(10000, 10000),
        'bomb.jpg': jpeg_bomb(12000, 12000),
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    os.symlink(str(root / 'nowhere.jpg'), folder / 'broken_link.jpg')
    os.symlink('self_link.jpg', folder / 'self_link.jpg')  # a link to itself (ELOOP): unreadable, not a crash
    os.mkfifo(root / 'pipe')
    os.symlink(str(root / 'pipe'), folder / 'pipe.jpg')  # reading it would block forever: not listed
    Image.new('RGB', (48, 40), RED).convert('CMYK').save(folder / 'cmyk.jpg', 'JPEG')
    Image.new('RGBA', (48, 40), RED + (128,)).save(folder / 'rgba.png')
    palette = Image.new('RGB', (48, 40), RED).convert('P')
    palette.info['transparency'] = 0
    palette.save(folder / 'palette.png', transparency=0)
    Image.fromarray(np.full((40, 48), 0x8000, np.uint16)).save(folder / 'gray16.png')
    (folder / '.DS_Store').write_bytes(b'\x00\x00\x00\x01Bud1')
    (folder / '._0.jpg').write_bytes(b'\x00\x05\x16\x07 AppleDouble')  # macOS resource fork, hidden
    (root / 'train' / 'd_empty').mkdir()
    (root / 'val' / 'a_red' / 'truncated_val.jpg').write_bytes(jpeg_bytes(size=(160, 120))[:300])
    odd_ok = [folder / n for n in ('cmyk.jpg', 'rgba.png', 'palette.png', 'gray16.png')]
    unreadable = folder / 'no_permission.jpg'
    unreadable.write_bytes(jpeg_bytes())
    unreadable.chmod(0)
    train_bad = [str(folder / n) for n in bad] + [str(folder / 'broken_link.jpg'), str(folder / 'self_link.jpg')]
    if not os.access(unreadable, os.R_OK):  # root reads a chmod-000 file anyway: then it is a good image
        train_bad.append(str(unreadable))
    return {'train_bad': train_bad, 'val_bad': [str(root / 'val' / 'a_red' / 'truncated_val.jpg')],
            'odd_ok': [str(p) for p in odd_ok]}


@pytest.fixture
def corpus(tmp_path):
    return tmp_path, make_bad_corpus(tmp_path)


def train_split(root, decoder='auto'):
    return ImageFolderSplit(str(root / 'train'), class_index(str(root / 'train')), TrainPreset(32), decoder=decoder)


@pytest.mark.parametrize('decoder', DECODERS)
def test_bad_files_are_skipped_logged_once_replaced_and_counted(corpus, caplog, decoder):
    root, files = corpus
    dataset = train_split(root, decoder)
    assert dataset.classes == ['a_red', 'b_green', 'c_blue', 'd_empty']  # the empty class keeps its index
    listed = {dataset.path(i) for i in range(len(dataset))}
    assert not any(os.path.basename(p).startswith('.') for p in listed)
    assert str(root / 'train' / 'a_red' / 'pipe.jpg') not in listed
    with caplog.at_level(logging.WARNING, logger='dizoo_imgcls'):
        for _ in range(2):
            items = [dataset[i] for i in range(len(dataset))]
    assert all(img.shape == (3, 32, 32) and img.dtype == torch.uint8 for img, _ in items)
    assert dataset.skipped_files() == len(files['train_bad'])
    messages = [r.getMessage() for r in caplog.records]
    for path in files['train_bad']:
        assert sum(path + ':' in m for m in messages) == 1, (path, messages)
    assert not any(p + ':' in m for p in files['odd_ok'] for m in messages)


@pytest.mark.parametrize('decoder', DECODERS)
def test_odd_modes_are_read_as_the_right_rgb(corpus, decoder):
    root, files = corpus
    expected = {'cmyk.jpg': RED, 'rgba.png': RED, 'palette.png': RED, 'gray16.png': (128, 128, 128)}
    for path in files['odd_ok']:
        pixels = read_image_file(path, decoder).decode(1)
        assert pixels.shape == (40, 48, 3) and pixels.dtype == np.uint8
        assert np.abs(pixels.reshape(-1, 3).mean(0) - expected[os.path.basename(path)]).max() < 4, path
        out = EvalPreset(32, 1.0)(read_image_file(path, decoder))
        assert out.shape == (3, 32, 32)


def test_count_is_shared_by_worker_processes(corpus):
    root, files = corpus
    dataset = train_split(root)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True, shuffle=True)
    for _ in range(2):
        sizes = [images.shape for images, _ in loader]
        assert sum(s[0] for s in sizes) == len(dataset) and all(s[1:] == (3, 32, 32) for s in sizes)
    assert dataset.skipped_files() == len(files['train_bad'])


@pytest.mark.slow  # > ~10 s on 2 cores
def test_training_survives_the_corpus_and_names_each_bad_file_once(corpus, tmp_path):
    root, files = corpus
    result = run_entry(
        '--data-root', str(root), '--exp-name', 'bad', '--set', f'output_dir={tmp_path / "runs"}',
        '--set', 'data.image_size=32', '--set', 'policy.learn.batch_size=4', '--set', 'policy.learn.train_epoch=2',
        '--set', 'policy.learn.warmup_epochs=0', '--set', 'data.num_workers=2', '--set', 'log_every=2')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for path in files['train_bad'] + files['val_bad']:
        assert result.stdout.count(path + ':') == 1, (path, result.stdout[-3000:])
    summary = json.loads((tmp_path / 'runs' / 'bad' / 'summary.json').read_text())
    assert summary['epochs'] == 2 and summary['num_classes'] == 4
    # an unreadable val file is left out of the metrics (not replaced by a neighbour that would count twice)
    val_files = len(ImageFolderSplit(str(root / 'val'), class_index(str(root / 'train')), allow_empty=True))
    assert files['val_bad'] and summary['eval_samples'] == val_files - len(files['val_bad'])
    assert f"{len(files['train_bad'])} unreadable training file(s) skipped" in result.stdout
    events = EventAccumulator(str(tmp_path / 'runs' / 'bad' / 'tb'))
    events.Reload()
    skipped = [(e.step, e.value) for e in events.Scalars('data/skipped')]
    epoch_ends = [load_checkpoint(p)['last_iter'] for p in step_checkpoints(str(tmp_path / 'runs' / 'bad' / 'ckpt'))]
    assert len(epoch_ends) == 2 and epoch_ends[0] > 2  # the iteration axis of train/loss, not epochs 1 and 2
    assert [step for step, _ in skipped] == epoch_ends and skipped[-1][1] == len(files['train_bad'])

    (root / 'val' / 'd_empty').mkdir(exist_ok=True)
    check = run_entry('--check-data', '--data-root', str(root))
    assert check.returncode == 1, check.stdout + check.stderr
    reported = [line for line in check.stdout.splitlines() if line.startswith('unreadable: ')]
    assert sorted(line.split(': ')[1] for line in reported) == sorted(files['train_bad'] + files['val_bad'])
    assert 'empty class folder: ' + str(root / 'train' / 'd_empty') in check.stdout
    assert 'empty class folder: ' + str(root / 'val' / 'd_empty') in check.stdout
    assert 'Traceback' not in check.stderr


def test_a_symlink_loop_in_a_class_folder_is_a_layout_error_not_a_crash(tmp_path, capsys):
    write_good_images(tmp_path, 'train', 2)
    write_good_images(tmp_path, 'val', 1)
    loop = tmp_path / 'train' / 'a_red' / 'up'
    loop.symlink_to('..')  # a_red/up/a_red/up/...
    for args in (['--check-data'], ['--set', 'policy.learn.train_epoch=1']):
        code, out, err = run_main(capsys, 'imagenet_res18_main', '--data-root', tmp_path, '--set',
                                  f'output_dir={tmp_path / "runs"}', *args)
        assert code == 2, out + err
        assert 'a folder already listed (a symlink loop' in err and 'Traceback' not in err


def test_a_link_into_another_class_folder_is_a_layout_error(tmp_path):
    """Its images would be read under two labels."""
    write_good_images(tmp_path, 'train', 2)
    (tmp_path / 'train' / 'a_red' / 'more').symlink_to(tmp_path / 'train' / 'c_blue')
    with pytest.raises(DataLayoutError, match='a folder already listed'):
        train_split(tmp_path)
    os.remove(tmp_path / 'train' / 'a_red' / 'more')
    (tmp_path / 'train' / 'c_blue' / 'more').symlink_to(tmp_path / 'train' / 'a_red')  # listed later: same
    with pytest.raises(DataLayoutError, match='a folder already listed'):
        train_split(tmp_path)


def test_check_data_passes_a_clean_folder_without_training(tmp_path, capsys):
    write_good_images(tmp_path, 'train', 2)
    write_good_images(tmp_path, 'val', 1)
    code, out, err = run_main(capsys, 'imagenet_res18_main', '--check-data', '--data-root', tmp_path)
    assert code == 0, out + err
    assert 'checked 6 train + 3 val images' in out and '0 unreadable' in out
    assert not (tmp_path / 'experiments').exists()
