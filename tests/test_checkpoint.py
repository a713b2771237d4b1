import os
import pickle

import pytest
import torch
import torchvision

from dizoo_imgcls.checkpoint import (BEST_NAME, CheckpointError, CheckpointManager, atomic_torch_save,
                                     latest_checkpoint, load_checkpoint, prune_checkpoints, rng_state, set_rng_state,
                                     step_checkpoint_name, step_checkpoints)
from dizoo_imgcls.data.sampler import EpochSeededDataset
from dizoo_imgcls.metric import ImageClassificationMetric
from dizoo_imgcls.model import create_model, load_pretrained
from dizoo_imgcls.run_state import RunState


class _Exploit:
    """Unpickling this runs a shell command: exactly what a checkpoint from the internet could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


@pytest.mark.parametrize('writer', ['torch.save', 'pickle.dump'])
def test_malicious_pickle_is_refused_and_never_executed(tmp_path, writer):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth.tar'
    payload = {'model': _Exploit(str(marker))}
    if writer == 'torch.save':
        torch.save(payload, path)
    else:
        with open(path, 'wb') as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError, match='refusing to load'):
        load_checkpoint(str(path))
    assert not marker.exists()
    with open(path, 'rb') as f:  # the file really is an exploit: an unsafe load would have run it
        pickle.load(f) if writer == 'pickle.dump' else torch.load(f, weights_only=False)
    assert marker.exists()


def test_atomic_save_round_trip_and_no_temp_files_left(tmp_path):
    state = {'w': torch.arange(6.0).view(2, 3), 'meta': {'epoch': 3, 'names': ['a', 'b']}, 'rng': rng_state()}
    path = str(tmp_path / 'ckpt' / 'x.pth.tar')
    atomic_torch_save(state, path)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded['w'], state['w']) and loaded['meta'] == state['meta']
    assert os.listdir(tmp_path / 'ckpt') == ['x.pth.tar']


def test_rng_state_round_trip_reproduces_all_generators():
    import random

    import numpy as np
    saved = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(saved)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and (first[1] == second[1]).all() and first[2] == second[2]


def test_prune_keeps_last_k_and_best_and_latest_skips_damaged(tmp_path):
    names = [step_checkpoint_name(10), step_checkpoint_name(23, epoch_end=1), step_checkpoint_name(30),
             step_checkpoint_name(46, epoch_end=2)]
    for name in names + ['ckpt_best.pth.tar']:
        atomic_torch_save({'format': 'dizoo_imgcls/1', 'name': name}, str(tmp_path / name))
    prune_checkpoints(str(tmp_path), keep_last=2)
    assert sorted(os.listdir(tmp_path)) == sorted(['ckpt_best.pth.tar', 'iter_30.pth.tar', 'epoch_2_iter_46.pth.tar'])
    with open(tmp_path / 'iter_99.pth.tar', 'wb') as f:  # a damaged newest file (e.g. a disk error)
        f.write(b'not a checkpoint')
    assert step_checkpoints(str(tmp_path))[-1].endswith('iter_99.pth.tar')
    assert latest_checkpoint(str(tmp_path)).endswith('epoch_2_iter_46.pth.tar')


def test_checkpoint_manager_writes_prunes_finds_and_restores_the_generators(tmp_path, caplog):
    manager = CheckpointManager(str(tmp_path / 'ckpt'), keep_last=2)
    (tmp_path / 'ckpt').mkdir()
    torch.manual_seed(3)
    for it in (2, 4, 6):
        state = {'format': 'dizoo_imgcls/1', 'last_iter': it}
        path = manager.save(step_checkpoint_name(it, it // 2), lambda: state)
        if it == 4:
            expected_draw = torch.rand(3)  # what a run resumed from epoch 2 draws next
            manager.save(BEST_NAME, lambda: state)
    assert path == str(tmp_path / 'ckpt' / 'epoch_3_iter_6.pth.tar')
    # the newest two step checkpoints, and ckpt_best however old
    assert sorted(os.listdir(tmp_path / 'ckpt')) == [BEST_NAME, 'epoch_2_iter_4.pth.tar', 'epoch_3_iter_6.pth.tar']
    newest = load_checkpoint(path)
    assert newest['last_iter'] == 6 and newest['rng_per_rank'] is None and set(newest['rng']) == {'torch', 'numpy',
                                                                                                  'python'}
    with open(path, 'r+b') as f:  # damaged on disk: the next newest is taken, and the damaged one is named
        f.truncate(100)
    found, state = manager.find('auto')
    assert found == str(tmp_path / 'ckpt' / 'epoch_2_iter_4.pth.tar') and state['last_iter'] == 4
    assert f'skipped {path}' in caplog.text
    manager.restore_rng(state)
    assert torch.equal(torch.rand(3), expected_draw)
    assert manager.find(str(tmp_path / 'ckpt' / BEST_NAME))[1]['last_iter'] == 4
    assert CheckpointManager(str(tmp_path / 'none'), keep_last=2).find('auto') == (None, None)


def test_run_state_round_trip_and_the_best_of_its_evaluations():
    state = RunState(started=0.0)
    better = ImageClassificationMetric('acc1').gt
    state.record_eval(1, {'acc1': 50.0}, better)
    state.record_eval(2, {'acc1': 50.0}, better)  # a tie keeps the first
    state.record_eval(3, {'acc1': 40.0}, better)
    state.epoch, state.batch = 3, 0
    assert state.best == {'acc1': 50.0} and state.best_epoch == 1 and [h['epoch'] for h in state.history] == [1, 2, 3]
    state.add_training(images=64, seconds=2.0, data_wait=0.5)
    state.add_training(images=32, seconds=1.0, data_wait=0.25)
    assert state.img_per_sec == 32.0 and state.data_wait_share == 0.25
    saved = state.state_dict()
    assert {k: v for k, v in saved['clock'].items() if k != 'wall_seconds'} == \
        {'train_images': 96, 'train_seconds': 3.0, 'data_wait_seconds': 0.75}
    saved['clock']['wall_seconds'] = 12.5
    assert saved['position'] == {'epoch': 3, 'batch': 0} and saved['best'] == {'metric': {'acc1': 50.0}, 'epoch': 1}
    resumed = RunState()
    resumed.load_state_dict(saved)
    assert (resumed.epoch, resumed.best, resumed.best_epoch, resumed.history) == (3, state.best, 1, state.history)
    assert 12.5 <= resumed.wall_seconds() < 12.5 + 60  # the earlier part's seconds plus this process's
    resumed.add_training(images=4, seconds=1.0, data_wait=0.0)  # the clock goes on from the checkpoint's totals
    assert (resumed.train_images, resumed.train_seconds, resumed.data_wait_seconds) == (100, 4.0, 0.75)
    resumed.record_eval(4, {'acc1': 60.0}, better)
    assert resumed.best_epoch == 4 and len(state.history) == 3  # the loaded history is a copy


def test_torchvision_state_dict_loads_with_a_new_head(tmp_path):
    source = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / 'resnet18_imagenet.pth'
    torch.save(source.state_dict(), path)
    model = create_model('resnet18', num_classes=3)
    report = load_pretrained(model, load_checkpoint(str(path)), source=str(path))
    assert 'replaced the classifier head (1000 -> 3' in report
    assert torch.equal(model.backbone.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    assert model.backbone.fc.weight.shape == (3, 512)


def test_wrong_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / 'r34.pth'
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match='does not fit|shapes differ'):
        load_pretrained(create_model('resnet18', num_classes=10), load_checkpoint(str(path)))


def test_epoch_seeded_augmentation_is_independent_of_call_order():
    class RandomValues(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.rand(2)

    data = EpochSeededDataset(RandomValues(), seed=3)
    a = [data[2 * 5 + i] for i in range(5)]  # epoch 2
    b = [data[2 * 5 + i] for i in reversed(range(5))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(data[1 * 5 + 0], data[2 * 5 + 0])  # another epoch, another crop
    before = torch.get_rng_state()
    data[7]
    assert torch.equal(before, torch.get_rng_state())  # the caller's RNG stream is untouched


def test_eval_only_overrides_change_data_and_eval_keys_but_never_the_model():
    from dizoo_imgcls.checkpoint import CHECKPOINT_FORMAT
    from dizoo_imgcls.config import ConfigError, default_config
    from dizoo_imgcls.evaluate import config_from_checkpoint

    stored = default_config()
    stored.data.image_size, stored.policy.model.name = 128, 'resnet18d'
    state = {'format': CHECKPOINT_FORMAT, 'config': stored}
    cfg = config_from_checkpoint(state, 'run.pth.tar', '/data', ['data.eval_image_size=160',
                                                                 'policy.eval.batch_size=7', 'data.num_workers=0'])
    assert (cfg.data.image_size, cfg.data.eval_image_size, cfg.data.num_workers) == (128, 160, 0)
    assert (cfg.policy.eval.batch_size, cfg.policy.model.name, cfg.data.root) == (7, 'resnet18d', '/data')
    with pytest.raises(ConfigError, match=r'policy.model.name=resnet50: only data.\* and policy.eval.\*'):
        config_from_checkpoint(state, 'run.pth.tar', '/data', ['policy.model.name=resnet50'])
    with pytest.raises(ConfigError, match='data.eval_size'):
        config_from_checkpoint(state, 'run.pth.tar', '/data', ['data.eval_size=160'])
    with pytest.raises(ConfigError, match='--data-root'):
        config_from_checkpoint(state, 'run.pth.tar', '/data', ['data.root=/elsewhere'])


def test_eval_config_of_a_fine_tuned_fp16_run_needs_neither_its_start_weights_nor_a_gpu():
    from dizoo_imgcls.checkpoint import CHECKPOINT_FORMAT
    from dizoo_imgcls.config import default_config
    from dizoo_imgcls.evaluate import config_from_checkpoint

    stored = default_config()
    stored.policy.model.pretrained = '/gone/imagenet_resnet18.pth'  # the weights it was fine-tuned from
    stored.policy.learn.amp = 'fp16'
    cfg = config_from_checkpoint({'format': CHECKPOINT_FORMAT, 'config': stored}, 'run.pth.tar', '/data')
    assert cfg.policy.model.pretrained is None
    assert cfg.policy.learn.amp == ('fp16' if torch.cuda.is_available() else 'auto')
