"""DI-engine's own image-classification example (``dizoo.image_classification``) trained as shipped, on any
ImageNet-layout folder; prints one JSON object (and writes it to ``--out``). benchmarks/imagenette.py runs it
for ``--compare-stock``; it also runs on its own:

    python benchmarks/stock_dizoo.py --data-root ../shared/data/imagenette2-224 --epochs 5 --size 128

The recipe is DI-engine's ``dizoo/image_classification/entry/imagenet_res18_{config,main}.py`` (the wheel
ships the data and policy packages but not the entry): its ImageNetDataset with its own transforms (train:
Resize + CenterCrop, no augmentation; eval: Resize(size / 0.875) + CenterCrop), its DistributedSampler, its
unregistered ImageClassificationPolicy (SGD momentum 0.9; lr 1e-4 for epochs 0-2, then 0.01, x0.1 every
30 epochs; fp32), ``ding.torch_utils.resnet18`` (1000 outputs, whatever the class count), batch 32, seed 0,
BaseLearner and MetricSerialEvaluator. The stock classes are imported, never copied; only the entry's metric
is restated here (see EntryMetric). What differs from the shipped entry is marked ``# changed:``.

Never imports dizoo_imgcls: that package registers its own policy as 'image_classification' in DI-engine's
POLICY_REGISTRY, the name the stock policy's config carries.
"""
import argparse
import math
import os
import sys
import time
from typing import List

import torch
from ding.config import compile_config
from ding.torch_utils import resnet18
from ding.utils import set_pkg_seed
from ding.worker import BaseLearner, IMetric, LearnerHook, MetricSerialEvaluator
from dizoo.image_classification.data import DistributedSampler, ImageNetDataset
from dizoo.image_classification.data.dataset import transforms_imagenet_eval, transforms_noaug_train
from dizoo.image_classification.policy import ImageClassificationPolicy
from easydict import EasyDict
from tensorboardX import SummaryWriter
from torch.utils.data import DataLoader

from _emit import emit  # benchmarks/ is on sys.path when a script here runs

# The shipped imagenet_res18_config.py (DI-engine commit 7a832ee), values unchanged unless marked.
STOCK_CONFIG = dict(
    exp_name='stock_imagenet_res18',  # changed: a name that says which recipe wrote the folder
    policy=dict(
        cuda=True,  # set from --device
        multi_gpu=False,  # changed: shipped True (launched by a distributed launcher); one process here
        learn=dict(
            bp_update_sync=True,
            train_epoch=200,  # set from --epochs
            batch_size=32,
            learning_rate=0.01,
            decay_epoch=30,
            decay_rate=0.1,
            warmup_lr=1e-4,
            warmup_epoch=3,
            weight_decay=1e-4,
            learner=dict(
                log_show_freq=10,
                hook=dict(log_show_after_iter=int(1e9), save_ckpt_after_iter=1000),
            ),
        ),
        collect=dict(learn_data_path=None, eval_data_path=None),  # changed: shipped cluster paths; --data-root
        # changed: multi_gpu=False added; MetricSerialEvaluator reads the key and its default config lacks it.
        eval=dict(batch_size=32, evaluator=dict(eval_freq=1, multi_gpu=False,
                                                stop_value=dict(loss=0.5, acc1=75.0, acc5=95.0))),
    ),
    env=dict(),
)
TRAIN_WORKERS, EVAL_WORKERS = 3, 2  # the entry's DataLoader num_workers


class EntryMetric(IMetric):
    """The metric defined in the stock entry file (its ImageClassificationMetric), which cannot be imported
    from the wheel. As there: per batch, cross-entropy and top-1/top-5 in percent of that batch; the mean over
    batches, unweighted (a short last batch counts as much as a full one); ``gt`` is True when every key is
    >=, the loss included. Also counts correct predictions per sample, for the exact accuracy of a pass."""

    def __init__(self) -> None:
        self.loss = torch.nn.CrossEntropyLoss()
        self._counts = {'samples': 0, 'correct1': 0, 'correct5': 0}
        self.last_exact = None

    def eval(self, inputs: torch.Tensor, label: torch.Tensor) -> dict:
        top5 = inputs.topk(5, dim=1).indices
        hits = top5.eq(label.reshape(-1, 1))
        correct1, correct5 = int(hits[:, :1].sum()), int(hits.sum())
        self._counts['samples'] += label.numel()
        self._counts['correct1'] += correct1
        self._counts['correct5'] += correct5
        return {'acc1': 100.0 * correct1 / label.numel(), 'acc5': 100.0 * correct5 / label.numel(),
                'loss': self.loss(inputs, label).item()}

    def reduce_mean(self, inputs: List[dict]) -> dict:
        """Called once at the end of each evaluator pass: also closes the exact per-sample counts."""
        n = self._counts['samples']
        self.last_exact = {'acc1': 100.0 * self._counts['correct1'] / n, 'acc5': 100.0 * self._counts['correct5'] / n,
                           'samples': n}
        self._counts = dict.fromkeys(self._counts, 0)
        return {k: sum(t[k] for t in inputs) / len(inputs) for k in inputs[0]}

    def gt(self, metric1: dict, metric2: dict) -> bool:
        return metric2 is None or all(metric1[k] >= metric2[k] for k in metric1)


class ProgressHook(LearnerHook):
    """A console line every ``freq`` iterations (the entry's own hook prints DI-engine's timing table)."""

    def __init__(self, freq: int, iters_per_epoch: int, batch_size: int) -> None:
        super().__init__(name='stock_progress', priority=0, position='after_iter')
        self._freq, self._iters_per_epoch, self._batch = freq, iters_per_epoch, batch_size
        self._start = time.perf_counter()

    def __call__(self, engine) -> None:
        done = engine.last_iter.val + 1  # the learner counts this iteration after its hooks
        if done % self._freq == 0:
            scalars = engine.log_buffer['scalar']
            rate = done * self._batch / (time.perf_counter() - self._start)
            print(f'stock iter {done} (epoch {(done - 1) // self._iters_per_epoch}) loss {scalars["total_loss"]:.4f}'
                  f' lr {scalars["cur_lr"]:.2e} {rate:.1f} img/s since start', flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-root', required=True, help='folder with train/<class>/* and val/<class>/*')
    parser.add_argument('--epochs', type=int, default=5)
    parser.add_argument('--size', type=int, default=224, help='train crop side in px (the shipped value is 224)')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--sampler', choices=('distributed', 'none'), default='distributed',
                        help="'distributed': the stock DistributedSampler at world size 1, what the shipped "
                        "multi_gpu=True config uses (one fixed shuffle, set_epoch is never called); 'none': the "
                        "entry's single-process branch (no shuffle: batches in class-sorted file order)")
    parser.add_argument('--per-epoch-eval', action='store_true',
                        help="also run the entry's own eval at the start of every epoch (epoch 0: untrained model)")
    parser.add_argument('--num-workers', type=int, default=None,
                        help=f'loader workers (default: the entry\'s {TRAIN_WORKERS} train / {EVAL_WORKERS} eval)')
    parser.add_argument('--log-every', type=int, default=50, help='console line every N iterations')
    parser.add_argument('--output-dir', default='.', help='where the experiment folder goes (DI-engine writes '
                        './<exp_name>/ relative to the working directory)')
    parser.add_argument('--out', default=None, help='also write the JSON result to this file')
    return parser.parse_args(argv)


def build_loaders(args, cfg):
    # changed: the transforms are passed explicitly only to set their size; ImageNetDataset builds exactly
    # these two (at 224) when given none.
    train_set = ImageNetDataset(os.path.join(args.data_root, 'train'), is_training=True,
                                transform=transforms_noaug_train(args.size))
    eval_set = ImageNetDataset(os.path.join(args.data_root, 'val'), is_training=False,
                               transform=transforms_imagenet_eval(args.size))
    if args.sampler == 'distributed':
        train_sampler, eval_sampler = DistributedSampler(train_set), DistributedSampler(eval_set)
    else:
        train_sampler, eval_sampler = None, None
    train_workers = TRAIN_WORKERS if args.num_workers is None else args.num_workers
    eval_workers = EVAL_WORKERS if args.num_workers is None else args.num_workers
    return (DataLoader(train_set, cfg.policy.learn.batch_size, sampler=train_sampler, num_workers=train_workers),
            DataLoader(eval_set, cfg.policy.eval.batch_size, sampler=eval_sampler, num_workers=eval_workers))


def build(args):
    """Config, policy, loaders, learner and evaluator, wired as the stock entry's ``main`` wires them."""
    user = EasyDict(STOCK_CONFIG)
    user.policy.cuda = args.device == 'cuda'
    user.policy.learn.train_epoch = args.epochs
    user.policy.collect.learn_data_path = os.path.join(args.data_root, 'train')
    user.policy.collect.eval_data_path = os.path.join(args.data_root, 'val')
    cfg = compile_config(user, seed=0, policy=ImageClassificationPolicy, evaluator=MetricSerialEvaluator)
    set_pkg_seed(cfg.seed, use_cuda=cfg.policy.cuda)
    model = resnet18()
    policy = ImageClassificationPolicy(cfg.policy, model=model, enable_field=['learn', 'eval'])
    train_loader, eval_loader = build_loaders(args, cfg)
    tb_logger = SummaryWriter(os.path.join('./{}/log/'.format(cfg.exp_name), 'serial'))
    learner = BaseLearner(cfg.policy.learn.learner, policy.learn_mode, tb_logger, exp_name=cfg.exp_name)
    learner.register_hook(ProgressHook(args.log_every, len(train_loader), cfg.policy.learn.batch_size))
    metric = EntryMetric()
    evaluator = MetricSerialEvaluator(cfg.policy.eval.evaluator, [eval_loader, metric], policy.eval_mode, tb_logger,
                                      exp_name=cfg.exp_name)
    return cfg, model, learner, evaluator, metric, train_loader, eval_loader


def eval_record(evaluator, metric, learner, epoch_arg: int) -> dict:
    stop, batch_mean = evaluator.eval(learner.save_checkpoint, epoch_arg, 0)
    return {'stop': bool(stop), 'exact': dict(metric.last_exact), 'batch_mean': dict(batch_mean)}


def train(args) -> dict:
    start = time.perf_counter()
    cfg, model, learner, evaluator, metric, train_loader, eval_loader = build(args)
    lr_scheduler = learner.policy.get_attribute('lr_scheduler')
    per_epoch, lrs, images, train_seconds, epochs_done = [], [], 0, 0.0, 0
    learner.call_hook('before_run')
    for epoch in range(cfg.policy.learn.train_epoch):
        if args.per_epoch_eval and evaluator.should_eval(learner.train_iter):  # the entry's loop, as shipped
            per_epoch.append({'before_epoch': epoch, **eval_record(evaluator, metric, learner, epoch)})
            if per_epoch[-1]['stop']:
                break
        lrs.append(lr_scheduler.get_last_lr()[0])
        epoch_start = time.perf_counter()
        for train_data in train_loader:
            learner.train(train_data)
            images += train_data[1].numel()
        train_seconds += time.perf_counter() - epoch_start
        lr_scheduler.step()
        epochs_done += 1
    # added: the entry evaluates only at the start of an epoch, so its final model is never evaluated
    final = eval_record(evaluator, metric, learner, learner.train_iter)
    learner.call_hook('after_run')
    return {
        'recipe': 'dizoo.image_classification (DI-engine stock example)',
        'top1': round(final['exact']['acc1'], 3), 'top5': round(final['exact']['acc5'], 3),
        'top1_batch_mean': round(final['batch_mean']['acc1'], 3),
        'top5_batch_mean': round(final['batch_mean']['acc5'], 3),
        'loss_batch_mean': round(final['batch_mean']['loss'], 4), 'eval_images': final['exact']['samples'],
        'wall_minutes': round((time.perf_counter() - start) / 60, 3),
        'train_minutes': round(train_seconds / 60, 3),
        'train_img_per_sec': round(images / max(train_seconds, 1e-9), 2),
        'images_trained': images, 'train_images': len(train_loader.dataset), 'epochs': epochs_done,
        'image_size': args.size, 'batch_size': cfg.policy.learn.batch_size, 'lr_per_epoch': lrs,
        'model': 'ding.torch_utils.resnet18', 'params': sum(p.numel() for p in model.parameters()),
        'num_outputs': model.num_classes, 'device': 'cuda' if cfg.policy.cuda else 'cpu', 'sampler': args.sampler,
        'loader_workers': {'train': train_loader.num_workers, 'eval': eval_loader.num_workers}, 'seed': cfg.seed,
        'train_transform': repr(train_loader.dataset.transform), 'eval_transform': repr(eval_loader.dataset.transform),
        'per_epoch_eval': per_epoch, 'exp_dir': os.path.abspath(cfg.exp_name),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('error: --device cuda but torch sees no GPU', file=sys.stderr)
        return 2
    for split in ('train', 'val'):
        if not os.path.isdir(os.path.join(args.data_root, split)):
            print(f'error: {os.path.join(args.data_root, split)} is not a folder (expected train/ and val/)',
                  file=sys.stderr)
            return 2
    if args.out:
        args.out = os.path.abspath(args.out)
    args.data_root = os.path.abspath(args.data_root)
    os.makedirs(args.output_dir, exist_ok=True)
    os.chdir(args.output_dir)
    result = train(args)
    result = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
    return emit(result, args.out)


if __name__ == '__main__':
    sys.exit(main())
