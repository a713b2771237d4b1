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
    with pytest.raises(ConfigError, match="unknown config key 'mixup_alpah' in --set policy.learn.mix.*mixup_alpha"):
        build_config({}, ["policy.learn.mix={'mixup_alpah': 0.2}"])


def test_model_options_are_checked_against_the_model():
    from dizoo_imgcls.model import create_model

    with pytest.raises(ValueError, match="'resnet18' has no option 'blurpool' \\(did you mean blur_pool\\?\\)"):
        create_model('resnet18', 10, blurpool=True)
    assert create_model('resnet18', 10, blur_pool=True) is not None


def test_model_section_accepts_model_specific_keys():
    cfg = build_config({}, ['policy.model.name=resnet34', 'policy.model.mean=[0.5, 0.5, 0.5]'])
    assert cfg.policy.model.name == 'resnet34' and cfg.policy.model.mean == [0.5, 0.5, 0.5]


def test_compiled_config_file_round_trips_through_config(tmp_path):
    cfg = build_config({}, ['policy.learn.batch_size=48', 'data.train_crop_scale=[0.3, 1.0]'])
    path = str(tmp_path / 'total_config.py')
    save_config_file(cfg, path)
    again = build_config(load_config_file(path), source=path)
    assert again == cfg
