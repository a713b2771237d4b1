"""``python -m dizoo_imgcls.prepare resize``: a pre-resized copy with the same files, classes and labels."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from dizoo_imgcls.data import DATA_CONFIG, build_datasets
from dizoo_imgcls.data.resized_copy import INFO_FILE, target_size
from dizoo_imgcls.prepare import main as prepare_main


def gradient(width, height):
    """A smooth picture, so a resize of it can be checked against Pillow's own to a few grey levels."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1).astype(np.uint8)


@pytest.fixture
def source(tmp_path):
    root = tmp_path / 'data'
    for split in ('train', 'val'):
        for cls in ('n01', 'n02'):
            (root / split / cls).mkdir(parents=True)
    Image.fromarray(gradient(200, 120)).save(root / 'train' / 'n01' / 'big.jpg', quality=95)
    Image.fromarray(gradient(40, 30)).save(root / 'train' / 'n01' / 'small.jpg')
    Image.fromarray(gradient(150, 100)).convert('RGBA').save(root / 'train' / 'n02' / 'alpha.png')
    Image.fromarray(gradient(90, 240)).save(root / 'val' / 'n01' / 'tall.jpg')
    Image.fromarray(gradient(64, 64)).save(root / 'val' / 'n02' / 'square.jpg')
    (root / 'train' / 'n02' / 'broken.jpg').write_bytes((root / 'train' / 'n01' / 'big.jpg').read_bytes()[:300])
    (root / 'train' / 'n02' / '.DS_Store').write_bytes(b'\0' * 8)
    (root / 'train' / 'n03_empty').mkdir()
    (root / 'synset_words.txt').write_text('n01 tench\nn02 crane\nn03_empty parachute\n')
    return root


def resize(root, out, *extra):
    return prepare_main(['resize', '--root', str(root), '--out', str(out), '--short-side', '48', '--workers', '2',
                         *extra])


def test_copy_has_the_same_files_classes_and_labels_at_the_new_size(source, tmp_path, capsys):
    out = tmp_path / 'copy'
    assert resize(source, out) == 0
    printed = capsys.readouterr().out
    assert '6 images: 4 resized, 1 linked (already small enough), 0 up to date, 1 unreadable' in printed
    assert f"unreadable, left out: {source / 'train' / 'n02' / 'broken.jpg'}" in printed

    sizes = {str(p.relative_to(out)): Image.open(p).size for p in out.rglob('*') if p.suffix in ('.jpg', '.png')}
    assert sizes == {'train/n01/big.jpg': (80, 48), 'train/n01/small.jpg': (40, 30), 'train/n02/alpha.png': (72, 48),
                     'val/n01/tall.jpg': (48, 128), 'val/n02/square.jpg': (48, 48)}
    assert Image.open(out / 'train' / 'n02' / 'alpha.png').format == 'JPEG'  # name kept, content re-encoded
    assert os.path.samefile(out / 'train' / 'n01' / 'small.jpg', source / 'train' / 'n01' / 'small.jpg')
    assert (out / 'train' / 'n03_empty').is_dir() and (out / 'synset_words.txt').is_file()
    resized = np.asarray(Image.open(out / 'train' / 'n01' / 'big.jpg'), dtype=np.float32)
    expected = np.asarray(Image.fromarray(gradient(200, 120)).resize((80, 48), Image.BICUBIC), dtype=np.float32)
    assert np.abs(resized - expected).mean() < 3.0

    info = json.loads((out / INFO_FILE).read_text())
    assert (info['short_side'], info['quality'], info['images']) == (48, 90, 5)
    original = build_datasets(dict(DATA_CONFIG, root=str(source)))
    copy = build_datasets(dict(DATA_CONFIG, root=str(out)))
    for before, after in zip(original, copy):
        assert after.classes == before.classes == ['n01', 'n02', 'n03_empty']
        labels = {before.paths[i]: int(before.targets[i]) for i in range(len(before))}
        assert {after.paths[i]: int(after.targets[i]) for i in range(len(after))} == {
            path: label for path, label in labels.items() if not path.endswith('broken.jpg')}


def test_second_run_writes_only_what_changed_and_drops_what_is_gone(source, tmp_path, capsys):
    out = tmp_path / 'copy'
    assert resize(source, out) == 0
    before = (out / 'val' / 'n01' / 'tall.jpg').stat().st_mtime_ns
    capsys.readouterr()
    assert resize(source, out) == 0
    assert '0 resized, 0 linked (already small enough), 5 up to date' in capsys.readouterr().out
    assert (out / 'val' / 'n01' / 'tall.jpg').stat().st_mtime_ns == before

    Image.fromarray(gradient(300, 96)).save(source / 'train' / 'n01' / 'big.jpg')  # changed: written again
    os.remove(source / 'val' / 'n02' / 'square.jpg')  # gone: removed from the copy
    (out / 'train' / 'n01' / 'left.jpg.tmp123').write_bytes(b'half a file')  # what a killed build leaves
    os.rmdir(source / 'train' / 'n03_empty')  # a class gone: its folder must not stay in the copy's class index
    assert resize(source, out) == 0
    assert '1 resized, 0 linked (already small enough), 3 up to date, 1 unreadable (left out), 2 stale removed' \
        in capsys.readouterr().out
    assert sorted(os.listdir(out / 'train')) == ['n01', 'n02']
    assert Image.open(out / 'train' / 'n01' / 'big.jpg').size == (150, 48)
    assert not (out / 'val' / 'n02' / 'square.jpg').exists()
    assert not (out / 'train' / 'n01' / 'left.jpg.tmp123').exists()


def test_other_settings_or_a_foreign_folder_are_refused(source, tmp_path, capsys):
    out = tmp_path / 'copy'
    assert resize(source, out) == 0
    capsys.readouterr()
    assert prepare_main(['resize', '--root', str(source), '--out', str(out), '--short-side', '64']) == 2
    assert 'short_side 48 -> 64' in capsys.readouterr().err
    foreign = tmp_path / 'photos'
    foreign.mkdir()
    (foreign / 'holiday.jpg').write_bytes(b'x')
    assert resize(source, foreign) == 2
    assert f'{foreign} is not empty and holds no {INFO_FILE}' in capsys.readouterr().err
    assert (foreign / 'holiday.jpg').read_bytes() == b'x'
    assert resize(source, source / 'copy') == 2
    assert 'must lie outside --root' in capsys.readouterr().err
    assert resize(tmp_path / 'nowhere', tmp_path / 'copy2') == 2
    assert 'no training folder' in capsys.readouterr().err


def test_dry_run_counts_and_writes_nothing(source, tmp_path, capsys):
    out = tmp_path / 'copy'
    assert resize(source, out, '--dry-run') == 0
    assert '0 of 6 images up to date; dry run: nothing written' in capsys.readouterr().out
    assert not out.exists()


def test_target_size_keeps_the_aspect_ratio():
    assert target_size(500, 375, 256) == (341, 256)
    assert target_size(375, 500, 256) == (256, 341)
    assert target_size(1000, 3, 16) == (5333, 16)


class Killed(Exception):
    pass


class PoolKilledAtOnce:
    """Stands in for the process pool: the build dies before any image is written."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, *args):
        raise Killed


def test_a_killed_first_build_is_resumed_not_refused(source, tmp_path, monkeypatch, capsys):
    import dizoo_imgcls.data.resized_copy as resized_copy

    out = tmp_path / 'copy'
    monkeypatch.setattr(resized_copy, 'ProcessPoolExecutor', PoolKilledAtOnce)
    with pytest.raises(Killed):
        resized_copy.write_resized_copy(str(source), str(out), 48)
    info = json.loads((out / INFO_FILE).read_text())  # on disk before the first image
    assert (info['short_side'], info['complete']) == (48, False)
    monkeypatch.undo()
    (out / 'train' / 'n01' / 'big.jpg.tmp99').write_bytes(b'half an image')  # what a kill leaves
    assert resize(source, out) == 0
    assert '4 resized, 1 linked (already small enough), 0 up to date, 1 unreadable (left out), 1 stale removed' \
        in capsys.readouterr().out
    assert json.loads((out / INFO_FILE).read_text())['complete'] is True


def test_a_source_replaced_by_an_older_file_is_written_again(source, tmp_path, capsys):
    out = tmp_path / 'copy'
    assert resize(source, out) == 0
    src, dst = source / 'train' / 'n01' / 'big.jpg', out / 'train' / 'n01' / 'big.jpg'
    assert dst.stat().st_mtime_ns == src.stat().st_mtime_ns  # the copy carries its source's time
    Image.new('RGB', (100, 60), (255, 255, 0)).save(src)
    os.utime(src, (946684800, 946684800))  # 2000-01-01, as tar -x or rsync -a would leave it
    capsys.readouterr()
    assert resize(source, out) == 0
    assert '1 resized, 0 linked (already small enough), 4 up to date' in capsys.readouterr().out
    assert Image.open(dst).size == (80, 48) and Image.open(dst).getpixel((40, 24))[2] < 40  # yellow now


def test_no_val_classes_unreadable_settings_and_names_above_the_root(tmp_path, capsys):
    root = tmp_path / 'ILSVRC' / 'Data' / 'CLS-LOC'
    (root / 'train' / 'n01').mkdir(parents=True)
    (root / 'val').mkdir()
    Image.fromarray(gradient(100, 80)).save(root / 'train' / 'n01' / 'a.jpg')
    (tmp_path / 'LOC_synset_mapping.txt').write_text('n01 tench, Tinca tinca\n')  # Kaggle keeps it 3 levels up
    out = tmp_path / 'copy'
    assert resize(root, out) == 0
    assert (out / 'val').is_dir() and (out / 'LOC_synset_mapping.txt').is_file()
    assert build_datasets(dict(DATA_CONFIG, root=str(out)))[0].classes == ['n01']

    (out / INFO_FILE).write_text('{"source": "/da')  # truncated
    capsys.readouterr()
    assert resize(root, out) == 2
    assert f'{out / INFO_FILE} cannot be read' in capsys.readouterr().err
