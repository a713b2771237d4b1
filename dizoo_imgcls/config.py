"""Config files, ``--set`` overrides and the compiled config (DI-engine style EasyDicts)."""
import ast
import copy
import difflib
import importlib.machinery
import importlib.util
import os
import pprint
from typing import Any, Dict, Iterable, List

from ding.utils import deep_merge_dicts
from ding.worker import BaseLearner, MetricSerialEvaluator
from easydict import EasyDict

from .data import DATA_CONFIG
from .policy import ImageClassificationPolicy

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


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key or file."""


def default_config() -> EasyDict:
    cfg = copy.deepcopy(TOP_CONFIG)
    cfg['data'] = copy.deepcopy(DATA_CONFIG)
    policy = ImageClassificationPolicy.default_config()
    policy.learn.learner = deep_merge_dicts(BaseLearner.default_config(), policy.learn.learner)
    # Our TrainLoggerHook replaces DI-engine's tabulated log_show hook (same numbers, one line, plus img/s).
    # Checkpoints come from our CheckpointHook and the run (atomic, full state), not DI-engine's save hooks.
    for hook_key in ('log_show_after_iter', 'save_ckpt_after_iter', 'save_ckpt_after_run'):
        del policy.learn.learner.hook[hook_key]
    policy.eval.evaluator = deep_merge_dicts(MetricSerialEvaluator.default_config(), policy.eval.evaluator)
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
        if isinstance(v, dict) and path not in OPEN_SECTIONS:
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
            if isinstance(v, dict) and isinstance(default_node[k], dict) and path not in OPEN_SECTIONS:
                walk(v, default_node[k], path + '.')

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


def check_override_type(key: str, value: Any, current: Any) -> None:
    """A ``--set`` value must have the type of the key's current value: a number for a number, a bool for a
    flag, a list for a list; keys whose value is None (unset) take anything."""
    if current is None or value is None:
        return
    if isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(current, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    elif isinstance(current, str):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        expected = 'a list' if isinstance(current, (list, tuple)) else f'a {type(current).__name__}'
        hint = f" (to give a text, quote it: --set {key}=\"'...'\")" if isinstance(current, str) else ''
        raise ConfigError(f'--set {key}: expected {expected} like its current value {current!r}, got '
                          f'{value!r}{hint}')


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
    in_open_section = '.'.join(walked) in OPEN_SECTIONS
    if not isinstance(node, dict) or (parts[-1] not in node and not in_open_section):
        raise _unknown_key_error(key, flat_keys(cfg), '--set')
    section = node.get(parts[-1])
    # A text key keeps words as text: policy.learn.amp=none is the mode 'none', not None.
    value = text.strip() if isinstance(section, str) and text.strip().lower() in WORDS else parse_value(text)
    if isinstance(section, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"--set {key}: '{key}' is a section; set one of its keys, e.g. {key}.<name>=...")
        # A dict updates the section key by key (the keys it leaves out keep their values), checked like a file.
        if key not in OPEN_SECTIONS:
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
    return EasyDict(cfg)


def save_config_file(cfg: Dict, path: str) -> None:
    """Write the compiled config as a config file that ``--config`` accepts again."""
    from .checkpoint import to_plain
    text = pprint.pformat(to_plain(cfg), width=110, sort_dicts=False)
    with open(path, 'w') as f:
        f.write('# Compiled config of this run: python entry/imagenet_res18_main.py --config THIS_FILE\n')
        f.write(f'main_config = {text}\n')
