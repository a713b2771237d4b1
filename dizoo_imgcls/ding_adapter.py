"""Every use of DI-engine's policy registry, ``BaseLearner`` and ``MetricSerialEvaluator`` beyond their documented
calls, in one place. ``tests/test_ding_adapter.py`` checks each against the installed DI-engine, so that a release
that changes one fails there, by name, instead of somewhere in a run."""
import logging
from typing import Any, Dict, Optional

from ding.policy import Policy, create_policy
from ding.utils import deep_merge_dicts
from ding.worker import BaseLearner, MetricSerialEvaluator
from easydict import EasyDict

from .runtime import NullWriter, quiet_write_errors

# DI-engine's default learner hooks that the run replaces: TrainLoggerHook prints the same numbers as one line
# (plus img/s), and every checkpoint comes from the run's CheckpointManager (atomic, full state).
REPLACED_LEARNER_HOOKS = ('log_show_after_iter', 'save_ckpt_after_iter', 'save_ckpt_after_run')


def make_policy(policy_cfg: EasyDict, **kwargs) -> Policy:
    """The policy ``policy_cfg.type`` names, created through DI-engine's ``POLICY_REGISTRY`` as its own pipelines
    do; ``policy_cfg.import_names`` lists the modules that register it (``image_classification``:
    ``ImageClassificationPolicy``). ``kwargs``: ``model``, ``enable_field``."""
    return create_policy(policy_cfg, **kwargs)


def learner_config(ours: Dict[str, Any]) -> EasyDict:
    """DI-engine's learner defaults under ``ours``, without the hooks the run replaces."""
    cfg = EasyDict(deep_merge_dicts(BaseLearner.default_config(), ours))
    for key in REPLACED_LEARNER_HOOKS:
        del cfg.hook[key]
    return cfg


def evaluator_config(ours: Dict[str, Any]) -> EasyDict:
    """DI-engine's evaluator defaults under ``ours`` (its eval_freq is read only by its should_eval, which the run
    never calls: the run evaluates every ``eval_every`` epochs)."""
    return EasyDict(deep_merge_dicts(MetricSerialEvaluator.default_config(), ours))


def make_learner(cfg: EasyDict, learn_mode, tb, rank: int, exp_name: str) -> BaseLearner:
    """A learner for this rank. World size 1 whatever the job's: with more, DI-engine adds its LogReduceHook, which
    all-reduces the log values on cuda:rank (failing on CPU); DDP already syncs the gradients, and TrainLoggerHook
    reports the global img/s. DI-engine writes its text log under ``./{exp_name}/log``."""
    learner = BaseLearner(cfg, learn_mode, tb, dist_info=(rank, 1), exp_name=exp_name)
    _text_log_only('learner_logger')
    return learner


def make_evaluator(cfg: EasyDict, val_loader, metric, eval_mode, exp_name: str) -> MetricSerialEvaluator:
    """An evaluator of ``metric`` over ``val_loader``. A ``stop_value`` of None (never stop) becomes the number
    DI-engine needs, one never reached; its own evaluator_iter/* scalars would repeat eval/*: no writer."""
    cfg = EasyDict(dict(cfg))
    if cfg.stop_value is None:
        cfg.stop_value = float('-inf') if metric.lower_is_better else float('inf')
    evaluator = MetricSerialEvaluator(cfg, [val_loader, metric], eval_mode, NullWriter(), exp_name=exp_name)
    _text_log_only('evaluator_logger')
    return evaluator


def _text_log_only(name: str) -> None:
    """DI-engine's tables stay in its text log (``{exp_name}/log/*``); the console gets our one-line summaries
    instead, and a full disk there is not a second error."""
    ding_logger = logging.getLogger(name)
    ding_logger.propagate = False
    quiet_write_errors(ding_logger)


def restore_best(evaluator: MetricSerialEvaluator, best: Optional[Dict[str, Any]]) -> None:
    """A resumed run's best result so far: a new evaluator knows none and would ask for ``ckpt_best`` with its
    first, maybe worse, result."""
    evaluator._max_avg_eval_result = best
