"""The contract with DI-engine: what dizoo_imgcls.ding_adapter relies on, checked against the installed release;
also our metric inside DI-engine's evaluator (batches 4, 4, 2: summed per sample)."""
import pytest
import torch
from ding.worker import BaseLearner
from ding.worker.learner.learner_hook import LogReduceHook

from dizoo_imgcls.config import default_config
from dizoo_imgcls.checkpoint import BEST_NAME
from dizoo_imgcls.ding_adapter import (REPLACED_LEARNER_HOOKS, evaluator_config, make_evaluator, make_learner,
                                       make_policy, restore_best)
from dizoo_imgcls.metric import ImageClassificationMetric
from dizoo_imgcls.policy import ImageClassificationPolicy
from dizoo_imgcls.runtime import NullWriter

LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])


class Oracle:
    """An eval-mode "policy" that is right on the first 7 of the 10 samples: acc1 70%."""

    def forward(self, x):
        idx = x.view(-1).long()
        predicted = torch.where(idx < 7, LABELS[idx], (LABELS[idx] + 1) % 3)
        return torch.nn.functional.one_hot(predicted, 3).float() * 4

    def reset(self):
        pass


def oracle_evaluator(stop_value=None):
    loader = torch.utils.data.DataLoader(list(zip(torch.arange(10).float().view(10, 1), LABELS)), batch_size=4)
    return make_evaluator(evaluator_config({'stop_value': stop_value, 'multi_gpu': False}), loader,
                          ImageClassificationMetric('acc1'), Oracle(), 'exp')


def test_the_replaced_default_hooks_exist_in_dingengine_and_not_in_our_config():
    defaults = BaseLearner.default_config().hook
    assert set(REPLACED_LEARNER_HOOKS) <= set(defaults), 'DI-engine renamed a default learner hook we remove'
    ours = default_config().policy.learn.learner.hook
    assert not set(REPLACED_LEARNER_HOOKS) & set(ours) and set(ours) == set(defaults) - set(REPLACED_LEARNER_HOOKS)


def test_the_policy_is_created_through_dingengines_registry_by_its_type():
    cfg = default_config()
    cfg.policy.model.update(name='resnet18', num_classes=3)
    cfg.policy.update(cuda=False)
    cfg.policy.learn.iters_per_epoch = 4
    policy = make_policy(cfg.policy, enable_field=['eval'])
    assert type(policy) is ImageClassificationPolicy and policy.eval_mode.forward is not None
    from ding.utils import POLICY_REGISTRY
    assert POLICY_REGISTRY.get(cfg.policy.type) is ImageClassificationPolicy
    cfg.policy.type = 'image_clasification'
    with pytest.raises(KeyError, match='image_clasification'):  # the registry names what it was asked for
        make_policy(cfg.policy, enable_field=['eval'])


def test_a_learner_of_a_multi_process_job_gets_no_log_reduce_hook(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # DI-engine writes ./exp/log
    cfg = default_config()
    cfg.policy.model.update(name='resnet18', num_classes=3)
    cfg.policy.update(cuda=False)
    cfg.policy.learn.iters_per_epoch = 4
    policy = ImageClassificationPolicy(cfg.policy, enable_field=['learn'])
    learner = make_learner(cfg.policy.learn.learner, policy.learn_mode, NullWriter(), rank=1, exp_name='exp')
    hooks = [hook for position in learner._hooks.values() for hook in position]
    assert hooks and not any(isinstance(hook, LogReduceHook) for hook in hooks)  # it all-reduces on cuda:rank


def test_the_evaluator_asks_for_the_best_checkpoint_only_above_a_restored_best(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    requests = []
    evaluator = oracle_evaluator()
    restore_best(evaluator, {'acc1': 80.0, 'acc5': 100.0, 'loss': 0.1})  # a resumed run's best: 80% > 70%
    stop, result = evaluator.eval(requests.append, train_iter=5)
    assert result['acc1'] == pytest.approx(70.0) and result['samples'] == 10 and requests == [] and not stop  # None: never stops
    restore_best(evaluator, None)  # a fresh run
    evaluator.eval(requests.append, train_iter=10)
    assert requests == [BEST_NAME]  # the name the run writes ckpt_best under
    stop, _ = oracle_evaluator(stop_value=70.0).eval(requests.append, train_iter=5)
    assert stop  # 70 >= stop_value 70
