import math

import pytest
import torch

from dizoo_imgcls.metric import DiagnosticMetric, ImageClassificationMetric, topk_correct


def test_topk_by_hand_and_clamped_to_class_count():
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 2, 0])
    # top-1: only sample 0 is right; top-2: sample 0 and sample 2 (0.3 > 0.2 puts class 0 third) -> 1
    assert topk_correct(logits, target, ks=(1, 2)) == {1: 1, 2: 1}
    # only 3 classes: top-5 is top-3, which always hits
    assert topk_correct(logits, target, ks=(1, 5)) == {1: 1, 5: 3}


def test_tied_logits_count_the_same_prediction_in_acc1_and_the_confusion_matrix():
    # bf16 logits tie: top-1 and the confusion matrix / mistakes must pick the same class (the lower index)
    logits = torch.zeros(3, 600)
    logits[:, 3] = logits[:, 500] = 2.0
    target = torch.tensor([3, 3, 500])
    assert topk_correct(logits, target, ks=(1, 5)) == {1: 2, 5: 3}
    metric = DiagnosticMetric('acc1', 600, None)
    result = metric.reduce_mean([metric.eval(logits, target)])
    diagnostics = metric.last_diagnostics
    assert result['acc1'] == pytest.approx(200 / 3) and int(diagnostics.confusion.trace()) == 2
    assert int(diagnostics.confusion[500, 3]) == 1 and [m.predicted for m in diagnostics.mistakes] == [3]


def test_reduce_is_sample_weighted_with_uneven_last_batch():
    metric = ImageClassificationMetric()
    # batch 1: 4 samples, all correct; batch 2: 1 sample, wrong. Mean of batch means would be 50%.
    b1_logits = torch.eye(3)[[0, 1, 2, 0]] * 5
    b1_target = torch.tensor([0, 1, 2, 0])
    b2_logits = torch.tensor([[5.0, 0.0, 0.0]])
    b2_target = torch.tensor([2])
    result = metric.reduce_mean([metric.eval(b1_logits, b1_target), metric.eval(b2_logits, b2_target)])
    assert result['acc1'] == pytest.approx(80.0)
    assert result['acc5'] == pytest.approx(100.0)  # 3 classes: top-5 clamps to top-3
    assert result['samples'] == 5
    p_right = math.exp(5) / (math.exp(5) + 2)
    p_wrong = 1 / (math.exp(5) + 2)
    expected_loss = (4 * -math.log(p_right) - math.log(p_wrong)) / 5
    assert result['loss'] == pytest.approx(expected_loss, rel=1e-6)


def test_gt_uses_one_key_and_direction():
    acc = ImageClassificationMetric('acc1')
    assert acc.gt({'acc1': 70.0, 'loss': 2.0}, {'acc1': 60.0, 'loss': 1.0})
    assert not acc.gt({'acc1': 50.0, 'loss': 0.5}, {'acc1': 60.0, 'loss': 1.0})
    assert acc.gt({'acc1': 1.0}, None)
    assert ImageClassificationMetric('acc1_tta').gt({'acc1_tta': 1.0}, {'acc1': 90.0})  # best of another key
    assert not acc.gt({'acc1': 99.0}, float('inf'))
    loss = ImageClassificationMetric('loss')
    assert loss.gt({'loss': 0.5}, {'loss': 1.0})  # lower loss is better
    assert not loss.gt({'loss': 1.5}, {'loss': 1.0})


def _reduce_on_rank(rank, init_file, results):
    import torch.distributed as dist

    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        metric = ImageClassificationMetric('acc1_tta')
        inputs = []
        if rank == 0:  # rank 1 got no val image: its shard of a 1-image val set is empty
            logits = torch.tensor([[2.0, 0.0, 0.0]])
            inputs = [metric.eval({'logit': logits, 'logit_tta': logits.flip(1)}, torch.tensor([0]))]
        results[rank] = metric.reduce_mean(inputs)
    finally:
        dist.destroy_process_group()


def test_a_rank_without_eval_samples_reduces_the_tta_keys_of_the_others(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        # fork: the ranks start from this process's imports instead of paying ~5 s of CPU each for their own
        mp.start_processes(_reduce_on_rank, args=(str(tmp_path / 'init'), results), nprocs=2, start_method='fork')
        results = dict(results)
    assert results[0] == results[1]
    assert results[0]['acc1'] == 100.0 and results[0]['acc1_tta'] == 0.0 and results[0]['samples'] == 1
