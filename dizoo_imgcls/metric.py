"""Top-1 / top-5 accuracy and cross-entropy, exact over the whole eval set (and across ranks)."""
from typing import Any, Dict, List, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ding.worker.collector.metric_serial_evaluator import IMetric

# Keys where a smaller value is better; every other key is compared as "higher is better".
_LOWER_IS_BETTER = ('loss', )


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> Dict[int, int]:
    """Number of samples whose target is among the top-k logits; k is clamped to the number of classes."""
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices
    hit = top.eq(target.view(-1, 1))
    return {k: int(hit[:, :min(k, max_k)].any(dim=1).sum()) for k in ks}


class ImageClassificationMetric(IMetric):
    """DI-engine metric for ``MetricSerialEvaluator``.

    ``eval`` returns per-batch *sums* (never means), ``reduce_mean`` adds them up and divides once by the
    sample count, so a short last batch weighs exactly its size. When torch.distributed is initialized
    the sums are all-reduced first, which makes the multi-rank result equal the single-process one.
    """

    def __init__(self, key: str = 'acc1', topk=(1, 5)) -> None:
        self.key = key
        self.topk = tuple(topk)
        self.lower_is_better = key in _LOWER_IS_BETTER

    def eval(self, inputs: torch.Tensor, label: torch.Tensor) -> Dict[str, float]:
        logits = inputs.float()
        label = label.to(logits.device).long()
        correct = topk_correct(logits, label, self.topk)
        out = {f'correct{k}': float(v) for k, v in correct.items()}
        out['loss_sum'] = float(F.cross_entropy(logits, label, reduction='sum'))
        out['samples'] = float(label.numel())
        return out

    def reduce_mean(self, inputs: List[Dict[str, float]]) -> Dict[str, float]:
        keys = [f'correct{k}' for k in self.topk] + ['loss_sum', 'samples']
        sums = torch.tensor([[float(batch[k]) for k in keys] for batch in inputs], dtype=torch.float64)
        totals = sums.sum(dim=0) if len(inputs) else torch.zeros(len(keys), dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = 'cuda' if dist.get_backend() == 'nccl' else 'cpu'
            totals = totals.to(device)
            dist.all_reduce(totals)
            totals = totals.cpu()
        total = dict(zip(keys, totals.tolist()))
        n = total['samples']
        if n == 0:
            raise ValueError('the evaluation set is empty: no samples were evaluated')
        result = {f'acc{k}': 100.0 * total[f'correct{k}'] / n for k in self.topk}
        result['loss'] = total['loss_sum'] / n
        result['samples'] = int(n)
        return result

    def gt(self, metric1: Dict[str, float], metric2: Optional[Union[Dict[str, float], float]]) -> bool:
        """Whether ``metric1`` is at least as good as ``metric2`` on ``self.key`` (a number is a threshold)."""
        if metric2 is None:
            return True
        a = metric1[self.key]
        b = metric2[self.key] if isinstance(metric2, dict) else float(metric2)
        return a <= b if self.lower_is_better else a >= b
