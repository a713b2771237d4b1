"""The ways ImageNet arrives: a flat val folder with Kaggle's or the devkit's labels, sorted by
``python -m dizoo_imgcls.prepare imagenet``; synset mappings that give classes human names."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from dizoo_imgcls.data import DATA_CONFIG, build_loaders
from dizoo_imgcls.data.layouts import display_names
from dizoo_imgcls.prepare import main as prepare_main

# ILSVRC2012_IDs deliberately not in sorted synset order, as in the real devkit.
SYNSETS = {1: ('n03', 'parachute, chute'), 2: ('n01', 'tench, Tinca tinca'), 3: ('n02', 'crane')}
VAL_LABELS = [2, 1, 3, 3, 2, 1]  # ILSVRC2012_val_00000001 .. 06, by ID


def val_name(i: int) -> str:
    return f'ILSVRC2012_val_{i:08d}.JPEG'


def make_flat_imagenet(root) -> None:
    for wnid, _ in SYNSETS.values():
        (root / 'train' / wnid).mkdir(parents=True)
        Image.new('RGB', (24, 20), (90, 90, 90)).save(root / 'train' / wnid / f'{wnid}_1.JPEG')
    (root / 'val').mkdir()
    for i, _ in enumerate(VAL_LABELS, start=1):
        Image.new('RGB', (24, 20), (10 * i, 0, 0)).save(root / 'val' / val_name(i))


def write_kaggle_labels(folder, labels=VAL_LABELS) -> None:
    rows = [f'{val_name(i)[:-5]},{SYNSETS[label][0]} 1 2 20 18 {SYNSETS[label][0]} 3 4 9 9' for i, label in
            enumerate(labels, start=1)]
    # a blank line inside and two at the end, as a hand-edited file has them: skipped
    rows.insert(2, '')
    (folder / 'LOC_val_solution.csv').write_text('ImageId,PredictionString\n' + '\n'.join(rows) + '\n\n\n')
    mapping = sorted(SYNSETS.values())
    (folder / 'LOC_synset_mapping.txt').write_text(''.join(f'{wnid} {words}\n' for wnid, words in mapping))


def write_devkit(folder, synsets=SYNSETS) -> None:
    from scipy.io import savemat

    data = folder / 'ILSVRC2012_devkit_t12' / 'data'
    data.mkdir(parents=True)
    # trailing blank lines are skipped (one inside would shift every later label: refused)
    (data / 'ILSVRC2012_validation_ground_truth.txt').write_text(''.join(f'{i}\n' for i in VAL_LABELS) + '\n \n')
    fields = ['ILSVRC2012_ID', 'WNID', 'words', 'gloss', 'num_children', 'children', 'wordnet_height',
              'num_train_images']
    rows = [(i, wnid, words, 'gloss', 0, np.zeros(0), 0, 1) for i, (wnid, words) in synsets.items()]
    rows.append((1001, 'n00001740', 'entity', 'gloss', 3, np.array([1, 2, 3]), 18, 0))  # not a label
    savemat(str(data / 'meta.mat'), {'synsets': np.array(rows, dtype=[(f, 'O') for f in fields])})


def loaded_display_names(root) -> list:
    """The class names a training run on ``root`` would show."""
    return build_loaders(dict(DATA_CONFIG, root=str(root), image_size=16, num_workers=0), 2, 2).display_names


def val_tree(root) -> dict:
    return {cls: sorted(os.listdir(root / 'val' / cls)) for cls in sorted(os.listdir(root / 'val'))
            if (root / 'val' / cls).is_dir()}


def expected_tree() -> dict:
    tree = {}
    for i, label in enumerate(VAL_LABELS, start=1):
        tree.setdefault(SYNSETS[label][0], []).append(val_name(i))
    return tree


def test_kaggle_layout_is_sorted_idempotently_and_names_classes(tmp_path, capsys):
    cls_loc = tmp_path / 'ILSVRC' / 'Data' / 'CLS-LOC'  # Kaggle: labels three levels above train/ and val/
    make_flat_imagenet(cls_loc)
    write_kaggle_labels(tmp_path)
    assert prepare_main(['imagenet', '--root', str(cls_loc), '--dry-run']) == 0
    assert 'would link' in capsys.readouterr().out and val_tree(cls_loc) == {}

    assert prepare_main(['imagenet', '--root', str(cls_loc)]) == 0
    assert val_tree(cls_loc) == expected_tree()
    linked = cls_loc / 'val' / 'n01' / val_name(1)  # image 1 has ID 2 = n01
    assert os.path.samefile(linked, cls_loc / 'val' / val_name(1))  # a hard link: no second copy
    assert prepare_main(['imagenet', '--root', str(cls_loc)]) == 0
    assert '6 already sorted, 0 to sort' in capsys.readouterr().out
    assert val_tree(cls_loc) == expected_tree()

    cfg = dict(DATA_CONFIG, root=str(cls_loc), image_size=16, num_workers=0)
    data = build_loaders(cfg, batch_size=2, eval_batch_size=2)
    assert data.class_names == ['n01', 'n02', 'n03']
    assert data.display_names == ['tench', 'crane', 'parachute']
    assert len(data.val_loader.dataset) == 6  # the flat copies beside the class folders are not read twice
    assert sorted(data.val_loader.dataset.targets.tolist()) == sorted([0, 2, 1, 1, 0, 2])


def test_devkit_labels_follow_meta_mat_order_and_words_are_kept(tmp_path):
    make_flat_imagenet(tmp_path)
    write_devkit(tmp_path)
    assert prepare_main(['imagenet', '--root', str(tmp_path), '--move']) == 0
    assert val_tree(tmp_path) == expected_tree()
    assert not list((tmp_path / 'val').glob('*.JPEG'))  # moved, not linked
    assert prepare_main(['imagenet', '--root', str(tmp_path)]) == 0  # nothing flat left: still fine
    assert (tmp_path / 'synset_words.txt').read_text().splitlines()[0] == 'n01 tench, Tinca tinca'
    assert loaded_display_names(tmp_path) == ['tench', 'crane', 'parachute']


@pytest.mark.parametrize('break_it, message', [
    ('extra_image', 'have no label'),
    ('missing_image', 'that are not there'),
    ('unknown_class', 'does not have'),
])
def test_label_file_that_does_not_match_is_refused_before_any_change(tmp_path, capsys, break_it, message):
    make_flat_imagenet(tmp_path)
    labels = list(VAL_LABELS)
    if break_it == 'extra_image':
        Image.new('RGB', (8, 8)).save(tmp_path / 'val' / val_name(7))
    elif break_it == 'missing_image':
        os.remove(tmp_path / 'val' / val_name(6))
    else:
        os.rename(tmp_path / 'train' / 'n02', tmp_path / 'train' / 'n99')
    write_kaggle_labels(tmp_path, labels)
    assert prepare_main(['imagenet', '--root', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and 'LOC_val_solution.csv' in err, err
    assert val_tree(tmp_path) == {}


def test_label_files_saved_with_a_byte_order_mark_are_read(tmp_path):
    make_flat_imagenet(tmp_path)
    write_kaggle_labels(tmp_path)
    for name in ('LOC_val_solution.csv', 'LOC_synset_mapping.txt'):  # as Windows editors save "UTF-8"
        (tmp_path / name).write_text((tmp_path / name).read_text(), encoding='utf-8-sig')
    assert prepare_main(['imagenet', '--root', str(tmp_path)]) == 0
    assert val_tree(tmp_path) == expected_tree()
    assert loaded_display_names(tmp_path) == ['tench', 'crane', 'parachute']


@pytest.mark.parametrize('damage, message', [
    ('utf16_csv', 'LOC_val_solution.csv: not UTF-8 text'),
    ('utf16_ground_truth', 'ILSVRC2012_validation_ground_truth.txt: not UTF-8 text'),
    ('garbage_meta', "meta.mat: cannot read the devkit synset table, is it the ILSVRC2012 devkit's meta.mat?"),
])
def test_unreadable_label_files_are_named_without_a_traceback(tmp_path, capsys, damage, message):
    make_flat_imagenet(tmp_path)
    if damage == 'utf16_csv':  # Excel's "Unicode text"
        write_kaggle_labels(tmp_path)
        csv_file = tmp_path / 'LOC_val_solution.csv'
        csv_file.write_text(csv_file.read_text(), encoding='utf-16')
    else:
        write_devkit(tmp_path)
        data = tmp_path / 'ILSVRC2012_devkit_t12' / 'data'
        if damage == 'garbage_meta':
            (data / 'meta.mat').write_bytes(b'MATLAB 5.0 MAT-file, truncated')
        else:
            truth = data / 'ILSVRC2012_validation_ground_truth.txt'
            truth.write_text(truth.read_text(), encoding='utf-16')
    # In this process (an exception the command should have turned into a message fails the test with its
    # traceback); the command line's own process is tested below.
    capsys.readouterr()
    assert prepare_main(['imagenet', '--root', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err, err
    assert val_tree(tmp_path) == {}


@pytest.mark.parametrize('image, stray_folder', [(1, 'n03'), (2, 'n01')])
def test_a_stray_copy_in_another_class_folder_is_refused_whatever_the_folder_order(tmp_path, capsys, image,
                                                                                      stray_folder):
    # After sorting, a copy of an image dropped into a second class folder would be counted under two labels.
    make_flat_imagenet(tmp_path)
    write_kaggle_labels(tmp_path)
    assert prepare_main(['imagenet', '--root', str(tmp_path)]) == 0
    label = SYNSETS[VAL_LABELS[image - 1]][0]
    assert stray_folder != label
    (tmp_path / 'val' / stray_folder / val_name(image)).write_bytes((tmp_path / 'val' / val_name(image)).read_bytes())
    assert prepare_main(['imagenet', '--root', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f'{stray_folder}/{val_name(image)[:-5]} (label {label})' in err and 'another class folder' in err, err


def test_command_line_without_labels_says_what_it_looked_for(tmp_path):
    make_flat_imagenet(tmp_path)
    result = subprocess.run([sys.executable, '-m', 'dizoo_imgcls.prepare', 'imagenet', '--root', str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert 'LOC_val_solution.csv' in result.stderr and 'ILSVRC2012_validation_ground_truth.txt' in result.stderr


def test_shared_display_names_stay_unique():
    words = {'n02012849': 'crane', 'n03126707': 'crane', 'n01440764': 'tench, Tinca tinca'}
    assert display_names(['n01440764', 'n02012849', 'n03126707', 'n09999999'], words) == [
        'tench', 'crane (n02012849)', 'crane (n03126707)', 'n09999999']


def test_folder_without_mapping_has_no_display_names(tiny_image_folder):
    assert loaded_display_names(tiny_image_folder) is None


def test_an_image_labelled_twice_differently_is_refused(tmp_path, capsys):
    make_flat_imagenet(tmp_path)
    write_kaggle_labels(tmp_path)
    path = tmp_path / 'LOC_val_solution.csv'
    path.write_text(path.read_text().rstrip('\n') + f'\n{val_name(1)[:-5]},n03 1 2 3 4\n')  # image 1 is n01 above
    assert prepare_main(['imagenet', '--root', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f'{val_name(1)[:-5]} is labelled n03 here and n01 on an earlier line' in err, err
    assert val_tree(tmp_path) == {}


def test_named_label_files_win_over_found_ones_and_read_their_own_meta_mat(tmp_path, capsys):
    """--labels GT.txt goes with the meta.mat beside it, not one found near the data; --devkit wins over a
    Kaggle CSV near the data."""
    make_flat_imagenet(tmp_path / 'data')
    write_devkit(tmp_path / 'ours')
    # A decoy devkit near the data, whose meta.mat gives the IDs other synsets, and a decoy Kaggle CSV.
    write_devkit(tmp_path / 'data', synsets={1: SYNSETS[2], 2: SYNSETS[3], 3: SYNSETS[1]})
    write_kaggle_labels(tmp_path / 'data', labels=[1, 1, 1, 1, 1, 1])
    ours = tmp_path / 'ours' / 'ILSVRC2012_devkit_t12' / 'data'
    assert prepare_main(['imagenet', '--root', str(tmp_path / 'data'), '--labels',
                         str(ours / 'ILSVRC2012_validation_ground_truth.txt')]) == 0
    assert val_tree(tmp_path / 'data') == expected_tree()
    for cls in expected_tree():
        for name in os.listdir(tmp_path / 'data' / 'val' / cls):
            os.remove(tmp_path / 'data' / 'val' / cls / name)
    capsys.readouterr()
    assert prepare_main(['imagenet', '--root', str(tmp_path / 'data'), '--devkit', str(ours), '--dry-run']) == 0
    out = capsys.readouterr().out
    assert 'LOC_val_solution.csv' not in out and str(ours) in out, out
