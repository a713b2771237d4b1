"""Config files, ``--set`` overrides and the compiled config (DI-engine style EasyDicts)."""
import ast
import copy
import difflib
import functools
import importlib.machinery
import importlib.util
import os
import pprint
from typing import Any, Dict, Iterable, List, Optional

from ding.utils import deep_merge_dicts
from easydict import EasyDict

from .checkpoint import CheckpointError
from .data import DATA_CONFIG
from .ding_adapter import evaluator_config, learner_config
from .errors import SettingError
from .model import check_model_options, model_options
from .policy import ImageClassificationPolicy
from .runtime import check_exp_name

TOP_CONFIG = dict(
    # (str) Experiment name: the run is written to output_dir/exp_name (a suffix is added if it exists).
    exp_name='experiment',
    # (str) Folder that holds experiment folders.
    output_dir='experiments',
    # (int) Seed for python, numpy and torch RNGs and the sampler's per-epoch shuffles.
    seed=0,
    # (int) Console line and train/* TensorBoard scalars every this many iterations.
    log_every=20,
    # (int) Evaluate every this many epochs (and always after the last one).
    eval_every=1,
    # (str) Resume from this checkpoint file, or 'auto' for the newest one in output_dir/exp_name/ckpt or in
    # the output_dir/exp_name_<date>_<time>/ckpt folders that later runs of the experiment got.
    resume=None,
    # (bool) Deterministic kernels, for bit-exact repeat runs and resumes (can be slower).
    deterministic=False,
    # (float) Stop the run (exit 3) at a training loss above this many times the median of the last 100; 0: off.
    # A non-finite loss always stops it.
    loss_spike_factor=0.0,
    checkpoint=dict(
        # (int) Step checkpoints (epoch_N / iter_N) to keep; ckpt_best.pth.tar is always kept. 0 keeps all.
        keep_last=3,
        # (int) Also checkpoint every N iterations inside an epoch (0: only at epoch ends).
        every_n_iters=0,
    ),
)

# Sections whose keys are free-form: data options and model keyword arguments differ between types, and DI-engine's
# learner and evaluator settings are validated by DI-engine itself.
OPEN_SECTIONS = ('data.options', 'policy.model', 'policy.learn.learner', 'policy.eval.evaluator')


def is_open(dotted: str) -> bool:
    """Whether keys under ``dotted`` are free-form: an open section or anything inside one
    (``policy.model.extra.block_args`` is a timm keyword, not a key of ours)."""
    return any(dotted == s or dotted.startswith(s + '.') for s in OPEN_SECTIONS)


class ConfigError(SettingError):
    """A config file or override is invalid; the message names the key or file."""


def default_config() -> EasyDict:
    cfg = copy.deepcopy(TOP_CONFIG)
    cfg['data'] = copy.deepcopy(DATA_CONFIG)
    policy = ImageClassificationPolicy.default_config()
    policy.learn.learner = learner_config(policy.learn.learner)
    policy.eval.evaluator = evaluator_config(policy.eval.evaluator)
    cfg['policy'] = policy
    return EasyDict(cfg)


def load_config_file(path: str) -> Dict:
    """Import a config file and return its ``main_config`` dict."""
    if not os.path.isfile(path):
        raise ConfigError(f'config file not found: {path}')
    # An explicit source loader: a config saved under another name (.txt, no extension) is Python all the same.
    loader = importlib.machinery.SourceFileLoader('_dizoo_imgcls_user_config', path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    try:
        loader.exec_module(module)
    except Exception as e:  # a broken config file should name itself, not show our internals
        raise ConfigError(f'cannot load config file {path}: {type(e).__name__}: {e}') from e
    main_config = getattr(module, 'main_config', None)
    if not isinstance(main_config, dict):
        raise ConfigError(f'config file {path} defines no `main_config` dict'
                          + (f' (it is a {type(main_config).__name__})' if hasattr(module, 'main_config') else ''))
    return copy.deepcopy(dict(main_config))


MISSING = object()


def get_dotted(tree: Dict, dotted: str, default: Any = MISSING) -> Any:
    """``tree['a']['b']`` for ``'a.b'``; ``default`` where a key is missing (``KeyError`` if none is given)."""
    node = tree
    for key in dotted.split('.'):
        if not isinstance(node, dict) or key not in node:
            if default is MISSING:
                raise KeyError(dotted)
            return default
        node = node[key]
    return node


def flat_keys(tree: Dict, prefix: str = '') -> List[str]:
    keys = []
    for k, v in tree.items():
        path = f'{prefix}{k}'
        keys.append(path)
        if isinstance(v, dict) and not is_open(path):
            keys.extend(flat_keys(v, path + '.'))
    return keys


def _unknown_key_error(key: str, valid: Iterable[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    hint = f"; closest valid keys: {', '.join(close)}" if close else ''
    return ConfigError(f"unknown config key '{key}' in {where}{hint}")


def check_keys(user: Dict, defaults: Dict, where: str, prefix: str = '') -> None:
    """Every key of ``user`` must exist in ``defaults`` (outside the open sections); ``prefix``: the dotted
    path of ``defaults`` in the whole config, for a section given as a dict (``--set policy={...}``)."""
    valid = flat_keys(defaults, prefix)

    def walk(user_node: Dict, default_node: Dict, prefix: str) -> None:
        for k, v in user_node.items():
            path = f'{prefix}{k}'
            if k not in default_node:
                raise _unknown_key_error(path, valid, where)
            if isinstance(v, dict) and isinstance(default_node[k], dict) and not is_open(path):
                walk(v, default_node[k], path + '.')
            else:  # a file's batch_size='8' fails here, naming the key, not later in the loader
                expected = type_mismatch(v, default_node[k], any_number=True)
                if expected:
                    raise ConfigError(f'{where}: {path} must be {expected} like its default '
                                      f'{default_node[k]!r}, got {v!r}')

    walk(user, defaults, prefix)


WORDS = {'true': True, 'false': False, 'none': None, 'null': None}


def parse_value(text: str) -> Any:
    """A Python literal (``0.1``, ``[1, 2]``, ``None``, ``'x'``), the words true/false/none/null in any case
    (a shell user's ``false`` must not become the truthy string 'false'); anything else is a plain string."""
    word = WORDS.get(text.strip().lower(), text)
    if word is not text:
        return word
    try:
        return ast.literal_eval(text.strip())
    except Exception:  # ValueError, SyntaxError, and TypeError for e.g. {[1]: 2}
        return text


def type_mismatch(value: Any, current: Any, any_number: bool = False) -> Optional[str]:
    """None when ``value`` may replace ``current`` (a number for a number, a bool for a flag, a list for a list;
    None either way: unset keys take anything), else what was expected, e.g. 'a int'. ``any_number``: a float
    may replace an int (config files: warmup_epochs=0.25 where the default is 5)."""
    if current is None or value is None:
        return None
    if isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, int) and not any_number:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(current, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    elif isinstance(current, str):
        ok = isinstance(value, (str, os.PathLike))
    elif isinstance(current, dict):
        ok = isinstance(value, dict)
    else:
        ok = True
    if ok:
        return None
    if isinstance(current, (int, float)) and not isinstance(current, bool) and any_number:
        return 'a number'
    if isinstance(current, dict):
        return 'a dict'
    return 'a list' if isinstance(current, (list, tuple)) else f'a {type(current).__name__}'


def check_override_type(key: str, value: Any, current: Any) -> None:
    """A ``--set`` value must have the type of the key's current value (see ``type_mismatch``)."""
    expected = type_mismatch(value, current)
    if expected:
        hint = f" (to give a text, quote it: --set {key}=\"'...'\")" if isinstance(current, str) else ''
        raise ConfigError(f'--set {key}: expected {expected} like its current value {current!r}, got '
                          f'{value!r}{hint}')


@functools.lru_cache(maxsize=1)
def _defaults() -> EasyDict:
    """``default_config()`` built once, for reading only."""
    return default_config()


def apply_override(cfg: EasyDict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` override in place."""
    if '=' not in assignment:
        raise ConfigError(f"--set expects dotted.key=value, got '{assignment}'")
    key, text = assignment.split('=', 1)
    key = key.strip()
    parts = key.split('.')
    node, walked = cfg, []
    for part in parts[:-1]:
        walked.append(part)
        if not isinstance(node, dict) or part not in node:
            raise _unknown_key_error(key, flat_keys(cfg), '--set')
        node = node[part]
    in_open_section = is_open('.'.join(walked))
    if not isinstance(node, dict) or (parts[-1] not in node and not in_open_section):
        raise _unknown_key_error(key, flat_keys(cfg), '--set')
    section = node.get(parts[-1])
    # A text key whose default is a text keeps words as text: policy.learn.amp=none is the mode 'none', not
    # None. A key that defaults to None takes None, also where the config file set a text
    # (policy.model.activation=None is the model's own activation, not the name 'None').
    keeps_words = isinstance(section, str) and isinstance(get_dotted(_defaults(), key, None), str)
    value = text.strip() if keeps_words and text.strip().lower() in WORDS else parse_value(text)
    if isinstance(section, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"--set {key}: '{key}' is a section; set one of its keys, e.g. {key}.<name>=...")
        # A dict updates the section key by key (the keys it leaves out keep their values), checked like a file.
        if not is_open(key):
            check_keys(value, section, f'--set {key}', prefix=key + '.')
        value = deep_merge_dicts(section, value)
    elif not in_open_section:
        check_override_type(key, value, section)
    node[parts[-1]] = value


def build_config(user_config: Dict, overrides: Iterable[str] = (), source: str = 'config') -> EasyDict:
    """Defaults <- config file dict <- ``--set`` overrides, with unknown keys reported."""
    defaults = default_config()
    check_keys(user_config, defaults, source)
    cfg = EasyDict(deep_merge_dicts(defaults, user_config))
    for assignment in overrides:
        apply_override(cfg, assignment)
    check_image_sizes(cfg)
    check_multi_gpu(cfg)
    return EasyDict(cfg)


def check_multi_gpu(cfg: Dict) -> None:
    """``policy.multi_gpu`` is DI-engine's key: its ``Policy`` then broadcasts the weights and all-reduces every
    gradient by hand. This policy trains with DistributedDataParallel instead, on whenever torchrun starts more
    than one process (the run records it in ``policy.learn.multi_gpu``); both would average every gradient twice,
    and DI-engine's outside torchrun fails at its first broadcast. The key must stay False."""
    if get_dotted(cfg, 'policy.multi_gpu', False):
        raise ConfigError('policy.multi_gpu=True is DI-engine\'s own gradient all-reduce, which this policy replaces '
                          'by DistributedDataParallel: leave it False. Training is distributed whenever torchrun '
                          'starts more than one process (torchrun --nproc_per_node=N entry/imagenet_res18_main.py '
                          '...); the run sets policy.learn.multi_gpu itself')


# Largest image side (px) any size key may ask for: 2048 covers every classification recipe (EfficientNet-B7
# evaluates at 600 px, FixRes at 480). One 2048 px RGB image is already 12.6 MB as uint8 and 50 MB as float32
# before any activation; a typo such as 100000 would try to allocate 30 GB for a single image.
MAX_IMAGE_SIDE_PX = 2048


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _side_error(key: str, value: Any, extra: str = '') -> ConfigError:
    why = ''
    if _is_int(value) and value > MAX_IMAGE_SIDE_PX:
        why = (f': the limit keeps a batch in memory (one {value}x{value} RGB image alone is '
               f'{3 * value * value / 1e9:.3g} GB as uint8, {12 * value * value / 1e9:.3g} GB as float32)')
    return ConfigError(f'{key} must be a whole number of pixels in 1..{MAX_IMAGE_SIDE_PX}{extra}, got {value!r}{why}')


def check_image_sizes(cfg: Dict) -> None:
    """Every key that sets an image side: ``data.image_size``, ``data.eval_image_size``, the sizes that
    progressive resizing and test-time scales derive from them. A positive int up to ``MAX_IMAGE_SIDE_PX``,
    checked with the config, before any folder is made or any batch allocated."""
    data = cfg['data']
    size = data.get('image_size')
    if not _is_int(size) or not 1 <= size <= MAX_IMAGE_SIDE_PX:
        raise _side_error('data.image_size', size)
    eval_size = data.get('eval_image_size')
    if eval_size is not None and (not _is_int(eval_size) or not 1 <= eval_size <= MAX_IMAGE_SIDE_PX):
        raise _side_error('data.eval_image_size', eval_size, ', or None for data.image_size')
    start_scale = (data.get('progressive_resize') or {}).get('start_scale')
    if start_scale is not None and (isinstance(start_scale, bool) or not isinstance(start_scale, (int, float))
                                    or not 0 < start_scale <= 1):
        raise ConfigError(f'data.progressive_resize.start_scale must be a number in (0, 1] (the first epochs train '
                          f'at start_scale x data.image_size px), or None for off; got {start_scale!r}')
    tta = get_dotted(cfg, 'policy.eval.tta', {}) or {}
    scales = tta.get('scales') or []
    eval_px = eval_size or size
    for scale in scales if isinstance(scales, (list, tuple)) else [scales]:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ConfigError(f'policy.eval.tta.scales must be a list of positive factors of the eval size '
                              f'(e.g. [1.15]), got {scales!r}')
        if round(eval_px * scale) > MAX_IMAGE_SIDE_PX:
            raise ConfigError(f'policy.eval.tta.scales: {scale} x {eval_px} px = {round(eval_px * scale)} px is over '
                              f'the largest image side of {MAX_IMAGE_SIDE_PX} px (the memory of one eval batch)')


def save_config_file(cfg: Dict, path: str) -> None:
    """Write the compiled config as a config file that ``--config`` accepts again."""
    from .checkpoint import to_plain
    text = pprint.pformat(to_plain(cfg), width=110, sort_dicts=False)
    with open(path, 'w') as f:
        f.write('# Compiled config of this run: python entry/imagenet_res18_main.py --config THIS_FILE\n')
        f.write(f'main_config = {text}\n')


# ----- a run's settings, checked before anything is written -----
METRIC_BASES, METRIC_VARIANTS = ('acc1', 'acc5', 'loss'), ('', 'tta', 'ema', 'ema_tta')


def check_run_settings(cfg: EasyDict) -> None:
    """What would otherwise fail late, or after the run's folder is made: the metric key (a variant's key needs
    that variant: acc1_ema an EMA, acc1_tta test-time augmentation), eval_every, the names that become paths,
    the model's options and the checkpoint to resume from."""
    for name, types in (('exp_name', str), ('output_dir', (str, os.PathLike))):
        if not isinstance(cfg[name], types) or not str(cfg[name]):
            raise SettingError(f'{name} must be a non-empty string, got {cfg[name]!r} (quote it: --set {name}="...")')
    check_exp_name(cfg)
    spike = cfg.get('loss_spike_factor', 0)
    if isinstance(spike, bool) or not isinstance(spike, (int, float)) or not (spike == 0 or spike > 1):
        raise SettingError(f'loss_spike_factor must be 0 (off) or a number above 1, got {spike!r}')
    epochs = cfg.policy.learn.train_epoch
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise SettingError(f'policy.learn.train_epoch must be a positive number of epochs, got {epochs!r}')
    if not isinstance(cfg.eval_every, int) or cfg.eval_every < 1:
        raise SettingError(f'eval_every must be a positive number of epochs, got {cfg.eval_every!r}')
    key, ev = cfg.policy.eval.metric_key, cfg.policy.eval
    base, _, variant = str(key).partition('_')
    if base not in METRIC_BASES or variant not in METRIC_VARIANTS:
        raise SettingError(f"policy.eval.metric_key must be one of {', '.join(METRIC_BASES)}, optionally with the "
                           f"suffix _tta, _ema or _ema_tta (e.g. acc1_tta), got {key!r}")
    if 'ema' in key.split('_') and not cfg.policy.learn.ema.enabled:
        raise SettingError(f"policy.eval.metric_key='{key}' needs policy.learn.ema.enabled=True")
    if 'tta' in key.split('_') and not (ev.tta.flip or ev.tta.scales):
        raise SettingError(f"policy.eval.metric_key='{key}' needs test-time augmentation: set "
                           'policy.eval.tta.flip=True or policy.eval.tta.scales')
    try:  # the model's name and options, checked before any folder is made
        check_model_options(cfg.policy.model.name, model_options(cfg.policy.model),
                            config_keys=('name', 'num_classes', 'pretrained'))
    except KeyError as e:
        raise SettingError(f'policy.model.name: {e.args[0]}') from None
    if cfg.resume and cfg.resume != 'auto' and not os.path.isfile(cfg.resume):
        raise CheckpointError(f'checkpoint not found: {cfg.resume}')


def prepare_config(cfg: EasyDict, data) -> None:
    """Fill in what the data decides: class count and iterations per epoch; check the settings against what the
    data source supports (``data.capabilities``), before any folder is made."""
    tta, can = cfg.policy.eval.tta, data.capabilities
    if not can.images and (tta.flip or tta.scales):
        raise SettingError(f"policy.eval.tta needs images; data.type='{cfg.data.type}' gives other samples: leave "
                           'policy.eval.tta.flip and policy.eval.tta.scales off')
    if not can.images and cfg.policy.learn.channels_last:
        raise SettingError(f"policy.learn.channels_last is a memory layout of image batches; data.type="
                           f"'{cfg.data.type}' gives other samples: set it to False")
    if not can.progressive_resize and (cfg.data.get('progressive_resize') or {}).get('start_scale'):
        raise SettingError(f"data.progressive_resize needs a train transform that changes size per epoch; "
                           f"data.type '{cfg.data.type}' does not support it: set data.progressive_resize."
                           f"start_scale=None")
    if cfg.policy.model.num_classes is None:
        cfg.policy.model.num_classes = data.num_classes
    elif cfg.policy.model.num_classes < data.num_classes:
        raise SettingError(f'policy.model.num_classes={cfg.policy.model.num_classes} but the training folder '
                           f'has {data.num_classes} classes')
    cfg.policy.learn.iters_per_epoch = len(data.train_loader)


# What the model, the LR schedule, the optimizer state and the data order were built from: a resume must not
# change them silently (the restored scheduler and optimizer would ignore a change, or the weights not fit).
_RESUME_FIXED_KEYS = tuple(f'policy.learn.{k}' for k in (
    'train_epoch', 'iters_per_epoch', 'batch_size', 'lr_schedule', 'lr_per_256', 'warmup_epochs', 'lr_step_epochs',
    'lr_step_gamma', 'final_lr_factor', 'optimizer')) + ('policy.model.name', 'seed')


def check_same_schedule(stored: Dict[str, Any], cfg: EasyDict, path: str) -> None:
    changed = []
    for key in _RESUME_FIXED_KEYS:
        before, now = get_dotted(stored, key, MISSING), get_dotted(cfg, key, MISSING)
        if before is not MISSING and before != now:  # keys an older checkpoint lacks are not compared
            changed.append(f'{key}: {before!r} -> {now!r}')
    if changed:
        raise CheckpointError(f'cannot resume {path} with different settings ({"; ".join(changed)}); '
                              f'resume with the settings it was trained with, or fine-tune from it with '
                              f'--set policy.model.pretrained={path}')
