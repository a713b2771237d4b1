"""Top-1 / top-5 accuracy and cross-entropy, exact over the whole eval set (and across ranks), and optionally
a confusion matrix and the most confident mistakes of the same pass (``DiagnosticMetric``)."""
import heapq
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ding.worker.collector.metric_serial_evaluator import IMetric

# Keys where a smaller value is better; every other key is compared as "higher is better".
_LOWER_IS_BETTER = ('loss', )


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> Dict[int, int]:
    """Number of samples whose target is among the top-k logits; k is clamped to the number of classes.

    Tied logits (bf16 outputs have them) rank the lower class index first, the rule of ``argmax``, so top-1
    agrees with the predictions of the confusion matrix and the mistakes list (``topk``'s order of ties is
    unspecified, and on CPU it puts the higher index first)."""
    max_k = min(max(ks), logits.shape[1])
    top = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :max_k]
    hit = top.eq(target.view(-1, 1))
    return {k: int(hit[:, :min(k, max_k)].any(dim=1).sum()) for k in ks}


def split_outputs(inputs: Union[torch.Tensor, Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The eval policy's output as {suffix: logits}: '' for the model itself, and e.g. 'tta' or 'ema' for the
    variants it also evaluated (keys ``logit_tta``, ``logit_ema``, ...). A plain tensor is the model alone."""
    if isinstance(inputs, torch.Tensor):
        return {'': inputs}
    return {key[len('logit'):].lstrip('_'): value for key, value in inputs.items() if key.startswith('logit')}


class ImageClassificationMetric(IMetric):
    """DI-engine metric for ``MetricSerialEvaluator``.

    ``eval`` returns per-batch *sums* (never means), ``reduce_mean`` adds them up and divides once by the
    sample count, so a short last batch weighs exactly its size. When torch.distributed is initialized
    the sums are all-reduced first, which makes the multi-rank result equal the single-process one.

    The policy output is a logits tensor or a dict ``{'logit': ..., 'logit_tta': ..., 'logit_ema': ...}``;
    each variant gets its own ``acc1_<variant>``, ``acc5_<variant>`` and ``loss_<variant>``. Samples labelled
    ``IGNORE_LABEL`` (-1: an unreadable eval file) are left out of every sum.
    """

    def __init__(self, key: str = 'acc1', topk=(1, 5)) -> None:
        self.key = key
        self.topk = tuple(topk)
        self.lower_is_better = key.split('_')[0] in _LOWER_IS_BETTER

    def eval(self, inputs: Union[torch.Tensor, Dict[str, torch.Tensor]], label: torch.Tensor) -> Dict[str, float]:
        outputs = split_outputs(inputs)
        label = label.to(outputs[''].device).long().view(-1)
        valid = label >= 0
        label = label[valid]
        out = {'samples': float(label.numel())}
        for variant, logits in outputs.items():
            logits = logits.float()[valid]
            suffix = f'_{variant}' if variant else ''
            for k, v in topk_correct(logits, label, self.topk).items():
                out[f'correct{k}{suffix}'] = float(v)
            out[f'loss_sum{suffix}'] = float(F.cross_entropy(logits, label, reduction='sum')) if label.numel() else 0.
        return out

    def reduce_mean(self, inputs: List[Dict[str, float]]) -> Dict[str, float]:
        keys = set(inputs[0]) if inputs else {f'correct{k}' for k in self.topk} | {'loss_sum', 'samples'}
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            # A rank with no eval batch (fewer val images than processes) does not know the TTA / EMA keys of the
            # others: all ranks reduce the union of their keys, in the same order, or the all-reduce mismatches.
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, sorted(keys))
            keys = set().union(*gathered)
        keys = sorted(keys)
        sums = torch.tensor([[float(batch.get(k, 0.0)) for k in keys] for batch in inputs], dtype=torch.float64)
        totals = sums.sum(dim=0) if len(inputs) else torch.zeros(len(keys), dtype=torch.float64)
        if distributed:
            device = 'cuda' if dist.get_backend() == 'nccl' else 'cpu'
            totals = totals.to(device)
            dist.all_reduce(totals)
            totals = totals.cpu()
        total = dict(zip(keys, totals.tolist()))
        n = total.pop('samples')
        if n == 0:
            raise ValueError('the evaluation set is empty: no samples were evaluated')
        result = {}
        for key, value in total.items():
            if key.startswith('correct'):
                result['acc' + key[len('correct'):]] = 100.0 * value / n
            else:
                result['loss' + key[len('loss_sum'):]] = value / n
        result['samples'] = int(n)
        return result

    def gt(self, metric1: Dict[str, float], metric2: Optional[Union[Dict[str, float], float]]) -> bool:
        """Against a best result (a dict): whether ``metric1`` is strictly better on ``self.key``, so a tie (a
        chance-level epoch after a chance-level best) never replaces the best. Against a number (a stop_value):
        whether it is reached, ties included. A NaN result is never better; anything beats a NaN best."""
        a = metric1[self.key]
        if a != a:  # NaN
            return False
        if metric2 is None or (isinstance(metric2, dict) and self.key not in metric2):
            return True  # no best yet, or one recorded under another metric_key (a resume that changed it)
        if not isinstance(metric2, dict):
            b = float(metric2)
            return a <= b if self.lower_is_better else a >= b
        b = metric2[self.key]
        if b is None or b != b:  # a NaN best (from a run before this check; JSON null)
            return True
        return a < b if self.lower_is_better else a > b


@dataclass(order=True)
class Mistake:
    """One wrongly classified eval sample; orders by confidence (the predicted class's probability)."""
    confidence: float
    index: int  # index into the eval dataset
    target: int
    predicted: int


@dataclass
class EvalDiagnostics:
    """What one eval pass saw beyond the averages, summed over all ranks."""
    confusion: torch.Tensor  # int64 (classes, classes), [true, predicted]
    mistakes: List[Mistake]  # the most confident mistakes, most confident first

    def per_class_accuracy(self) -> torch.Tensor:
        """Top-1 accuracy in % per true class; NaN for a class with no eval sample."""
        totals = self.confusion.sum(dim=1).double()
        return 100.0 * self.confusion.diagonal().double() / totals  # 0 / 0 -> NaN


class DiagnosticMetric(ImageClassificationMetric):
    """``ImageClassificationMetric`` that, in the same pass, also sums a confusion matrix and keeps the
    ``keep_mistakes`` most confident mistakes with their dataset indices (a bounded heap: O(batch) per batch).

    The eval loader must yield samples in the order of ``sampler`` (this rank's dataset indices), which is
    how a DataLoader with ``sampler=`` works; the n-th sample seen in a pass is the n-th index it yields.
    ``reduce_mean`` ends a pass: the result of the pass is ``last_diagnostics`` (the same on every rank).
    """

    def __init__(self, key: str = 'acc1', num_classes: int = 2, sampler: Optional[Iterable[int]] = None,
                 keep_mistakes: int = 16, topk=(1, 5)) -> None:
        super().__init__(key, topk)
        self.num_classes = int(num_classes)
        self.keep_mistakes = int(keep_mistakes)
        self._sampler = sampler
        self.last_diagnostics: Optional[EvalDiagnostics] = None
        self._start_pass()

    def _start_pass(self) -> None:
        self._confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self._heap: List[Mistake] = []
        self._order: Optional[List[int]] = None
        self._seen = 0

    def _dataset_indices(self, n: int) -> List[int]:
        if self._order is None:
            self._order = list(self._sampler) if self._sampler is not None else None
        start, self._seen = self._seen, self._seen + n
        if self._order is None:
            return list(range(start, start + n))
        if self._seen > len(self._order):
            raise ValueError(f'the eval loader gave more samples than its sampler yields ({len(self._order)})')
        return self._order[start:self._seen]

    def eval(self, inputs: Union[torch.Tensor, Dict[str, torch.Tensor]], label: torch.Tensor) -> Dict[str, float]:
        out = super().eval(inputs, label)
        logits, label = split_outputs(inputs)[''].float().cpu(), label.long().view(-1).cpu()
        if logits.shape[1] != self.num_classes:
            raise ValueError(f'the model gives {logits.shape[1]} logits per sample, the metric expects '
                             f'num_classes={self.num_classes}')
        indices = self._dataset_indices(label.numel())
        valid = label >= 0
        if not valid.all():
            logits, label = logits[valid], label[valid]
            indices = [i for i, keep in zip(indices, valid.tolist()) if keep]
        predicted = logits.argmax(dim=1)  # the first of tied logits, as top-1 counts it (topk_correct)
        confidence = torch.softmax(logits, dim=1).gather(1, predicted.view(-1, 1)).view(-1)
        self._confusion += torch.bincount(label * self.num_classes + predicted,
                                          minlength=self.num_classes ** 2).view(self.num_classes, -1)
        self._keep(confidence, predicted, label, indices)
        return out

    def _keep(self, confidence: torch.Tensor, predicted: torch.Tensor, label: torch.Tensor,
              indices: List[int]) -> None:
        """Push the batch's most confident mistakes (at most ``keep_mistakes``) into the bounded heap."""
        wrong = (predicted != label).nonzero().view(-1)
        if not self.keep_mistakes or not wrong.numel():
            return
        for i in wrong[confidence[wrong].topk(min(self.keep_mistakes, wrong.numel())).indices].tolist():
            mistake = Mistake(float(confidence[i]), indices[i], int(label[i]), int(predicted[i]))
            if len(self._heap) < self.keep_mistakes:
                heapq.heappush(self._heap, mistake)
            elif mistake > self._heap[0]:
                heapq.heapreplace(self._heap, mistake)

    def reduce_mean(self, inputs: List[Dict[str, float]]) -> Dict[str, float]:
        result = super().reduce_mean(inputs)
        confusion, mistakes = self._confusion, list(self._heap)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = 'cuda' if dist.get_backend() == 'nccl' else 'cpu'
            confusion = confusion.to(device)
            dist.all_reduce(confusion)
            confusion = confusion.cpu()
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mistakes)
            mistakes = [m for rank_mistakes in gathered for m in rank_mistakes]
        self.last_diagnostics = EvalDiagnostics(confusion, heapq.nlargest(self.keep_mistakes, mistakes))
        self._start_pass()
        return result
