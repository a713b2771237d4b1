import re

import pytest

from dizoo_imgcls.config import (ConfigError, apply_override, build_config, default_config, load_config_file,
                                 parse_value, save_config_file)


def test_values_parse_as_python_literals():
    assert parse_value('0.5') == 0.5
    assert parse_value('[1, 2]') == [1, 2]
    assert parse_value('None') is None
    assert parse_value('True') is True
    assert parse_value('resnet50') == 'resnet50'  # not a literal: a plain string


def test_set_overrides_nested_keys():
    cfg = build_config({}, ['policy.learn.batch_size=32', 'data.train_crop_scale=[0.25, 1.0]', 'seed=3'])
    assert cfg.policy.learn.batch_size == 32
    assert cfg.data.train_crop_scale == [0.25, 1.0]
    assert cfg.seed == 3


def test_unknown_key_names_the_closest_valid_keys():
    with pytest.raises(ConfigError) as err:
        build_config({}, ['policy.learn.batchsize=32'])
    assert "unknown config key 'policy.learn.batchsize'" in str(err.value)
    assert 'policy.learn.batch_size' in str(err.value)
    with pytest.raises(ConfigError, match='data.image_size'):
        build_config({}, ['data.imagesize=64'])


def test_unknown_key_in_a_config_file_is_an_error():
    with pytest.raises(ConfigError, match='closest valid keys: .*policy.learn.train_epoch'):
        build_config({'policy': {'learn': {'train_epochs': 3}}}, source='my_config.py')


def test_malformed_and_section_overrides():
    cfg = default_config()
    with pytest.raises(ConfigError, match='dotted.key=value'):
        apply_override(cfg, 'policy.learn.batch_size')
    with pytest.raises(ConfigError, match='is a section'):
        apply_override(cfg, 'policy.learn=3')


def test_a_dict_override_updates_its_section_key_by_key_and_is_checked():
    cfg = build_config({}, ["policy.learn.ema={'enabled': True}"])
    assert cfg.policy.learn.ema.enabled is True and cfg.policy.learn.ema.decay == default_config().policy.learn.ema.decay
    with pytest.raises(ConfigError, match="unknown config key 'policy.learn.mix.mixup_alpah' in --set "
                                          "policy.learn.mix; closest valid keys: policy.learn.mix.mixup_alpha"):
        build_config({}, ["policy.learn.mix={'mixup_alpah': 0.2}"])
    # an open section inside the dict takes any key, as it does from a file
    cfg = build_config({}, ["policy={'model': {'width_factor': 2}}"])
    assert cfg.policy.model.width_factor == 2 and cfg.policy.learn.batch_size == default_config().policy.learn.batch_size


def test_override_values_shell_words_and_types():
    cfg = build_config({}, ['data.hflip=false', 'policy.learn.ema.enabled=TRUE', 'data.eval_image_size=null',
                            'policy.learn.amp=none', 'policy.learn.label_smoothing=0', "exp_name='007'"])
    assert cfg.data.hflip is False and cfg.policy.learn.ema.enabled is True and cfg.data.eval_image_size is None
    assert cfg.policy.learn.amp == 'none'  # a text key keeps the word: the mode 'none'
    assert cfg.policy.learn.label_smoothing == 0 and cfg.exp_name == '007'
    for assignment, says in (('seed=abc', "expected a int like its current value 0, got 'abc'"),
                             ('checkpoint.every_n_iters=2.5', 'expected a int'),
                             ('data.hflip=1', 'expected a bool'),
                             ('data.train_crop_scale=0.5', 'expected a list'),
                             ('exp_name=7', 'quote it')):
        with pytest.raises(ConfigError, match=re.escape(says)):
            build_config({}, [assignment])
    with pytest.raises(ConfigError, match="'data.options'"):  # a literal Python cannot build: kept as text
        build_config({}, ['data.options={[1]: 2}'])


def test_config_files_under_any_name_and_a_main_config_that_is_no_dict(tmp_path):
    text = tmp_path / 'my_config'  # no .py: still a Python config file
    text.write_text("main_config = dict(seed=3, policy=dict(learn=dict(batch_size=16)))\n")
    assert load_config_file(str(text))['seed'] == 3
    broken = tmp_path / 'broken.py'
    broken.write_text('main_config = None\n')
    with pytest.raises(ConfigError, match=f'{broken} defines no `main_config` dict .it is a NoneType'):
        load_config_file(str(broken))


def test_model_options_are_checked_against_the_model():
    from dizoo_imgcls.model import create_model

    with pytest.raises(ValueError, match="'resnet18' has no option 'blurpool' \\(did you mean blur_pool\\?\\)"):
        create_model('resnet18', 10, blurpool=True)
    from dizoo_imgcls.model.tweaks import BlurConv2d

    def blurred_convs(model):
        return sum(isinstance(m, BlurConv2d) for m in model.modules())

    # layers 2-4: the first block's strided 3x3 conv and its strided 1x1 shortcut each; not the RGB stem
    assert blurred_convs(create_model('resnet18', 10, blur_pool=True)) == 6
    assert blurred_convs(create_model('resnet18', 10)) == 0


def test_model_section_accepts_model_specific_keys():
    cfg = build_config({}, ['policy.model.name=resnet34', 'policy.model.mean=[0.5, 0.5, 0.5]'])
    assert cfg.policy.model.name == 'resnet34' and cfg.policy.model.mean == [0.5, 0.5, 0.5]


def test_timm_keywords_under_model_extra_are_free_form_and_reach_the_model():
    from dizoo_imgcls.model.factory import build_model_from_cfg

    # a whole dict and one dotted keyword: neither is a key of ours, both go to timm.create_model
    cfg = build_config({}, ["policy.model.name=timm/resnet18d",
                            "policy.model.extra={'block_args': {'attn_layer': 'se'}}",
                            'policy.model.extra.drop_rate=0.25'])
    assert cfg.policy.model.extra == {'block_args': {'attn_layer': 'se'}, 'drop_rate': 0.25}
    model = build_model_from_cfg(dict(cfg.policy.model, num_classes=10))
    names = {type(m).__name__ for m in model.modules()}
    assert 'SEModule' in names
    assert 0.25 in {getattr(m, 'drop_rate', None) for m in model.modules()}


def test_compiled_config_file_round_trips_through_config(tmp_path):
    cfg = build_config({}, ['policy.learn.batch_size=48', 'data.train_crop_scale=[0.3, 1.0]'])
    path = str(tmp_path / 'total_config.py')
    save_config_file(cfg, path)
    again = build_config(load_config_file(path), source=path)
    assert again == cfg


def test_cudnn_benchmark_follows_its_key_and_deterministic_turns_it_off():
    import torch

    from dizoo_imgcls.runtime import set_deterministic

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    try:
        set_deterministic(False, cudnn_benchmark=False)  # used to be turned on whenever a GPU was there
        assert torch.backends.cudnn.benchmark is False and not torch.are_deterministic_algorithms_enabled()
        set_deterministic(False, cudnn_benchmark=True)
        assert torch.backends.cudnn.benchmark is True
        set_deterministic(True, cudnn_benchmark=True)
        assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
    finally:
        set_deterministic(before[0], before[1])


def test_the_demo_config_file_matches_the_cached_digits():
    from conftest import REPO
    from dizoo_imgcls.demo import DIGITS_IMAGE_PX

    demo = build_config(load_config_file(f'{REPO}/config/digits_demo_config.py'), source='demo')
    assert demo.exp_name == 'digits_demo' and demo.data.image_size == DIGITS_IMAGE_PX  # no resize of the cache
    assert demo.data.hflip is False and demo.policy.model.name == 'resnet18'
