"""fastai's own Imagenette recipe on an ImageNet-layout folder: the peer that benchmarks/peers.py runs beside ours.

It reproduces fastai's ``nbs/examples/train_imagenette.py`` (fastai 2.x, the lineage of the Imagenette
leaderboard) with that script's published defaults: DataBlock(ImageBlock, CategoryBlock) over
``get_image_files``, ``GrandparentSplitter(valid_name='val')``, ``parent_label``; item transforms
RandomResizedCrop(size, min_scale=0.35) + FlipItem(0.5), batch transform Normalize(imagenet_stats); an xresnet
family model with ``act_cls=Mish, sa=False, sym=0, pool=AvgPool``; ``ranger`` (RAdam + Lookahead, mom 0.9,
sqr_mom 0.99, eps 1e-6, beta 0); LabelSmoothingCrossEntropy; ``fit_flat_cos(epochs, lr=1e-2, wd=1e-2)`` (flat
for 75% of the iterations, then cosine to lr/1e5), batch 64, metrics accuracy and top_k_accuracy (k=5, or the
number of classes when fewer), computed by fastai over the whole val split after each epoch.

Validation uses the valid-mode of the same RandomResizedCrop: the whole image squashed to size + xtra
(xtra = ceil(size * 0.14 / 8) * 8, 152 px for 128) and the central ``size`` px cropped (84% of the side);
ours resizes the short side to size / 0.875 and crops the centre (87.5%), aspect kept. On square sources (the
224 px Imagenette copy) both see the central square, at slightly different zoom.

    python benchmarks/_fastai_imagenette.py --data-root DIR --arch xresnet18 --out result.json
    python benchmarks/_fastai_imagenette.py --arch xse_resnext50 --raw-only --out raw.json  # step speed only

With ``--budget-seconds S`` it trains the number of whole epochs whose complete flat-cos schedule fits in S
seconds of this process's wall time (see ``plan_epochs``). Writes one JSON object to --out; logs to stderr.
"""
import argparse
import json
import math
import os
import sys
import time
from functools import partial

import psutil
import torch

from _emit import median_step_seconds  # benchmarks/ is sys.path[0] when this script runs

PROCESS_START = psutil.Process().create_time()  # wall time counts from the exec, imports included

# fastai's train_imagenette.py defaults (its @call_parse signature)
RECIPE = dict(lr=1e-2, wd=1e-2, mom=0.9, sqr_mom=0.99, eps=1e-6, beta=0.0, bs=64, act_fn='Mish', pool='AvgPool',
              sa=False, sym=0, min_scale=0.35, pct_start=0.75)
PROBE_WARMUP_BATCHES = 2  # untimed batches of the budget probe (worker start, first allocations)
BUDGET_MARGIN = 1.05  # epoch estimate padding: loader workers restart each epoch, the probe is short


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-root', help='ImageNet-layout folder: train/<class>/*, val/<class>/*')
    parser.add_argument('--arch', default='xresnet18', help='a model of fastai.vision.models.xresnet')
    parser.add_argument('--epochs', type=int, default=5)
    parser.add_argument('--size', type=int, default=128)
    parser.add_argument('--bs', type=int, default=RECIPE['bs'])
    parser.add_argument('--lr', type=float, default=RECIPE['lr'])
    parser.add_argument('--wd', type=float, default=RECIPE['wd'])
    parser.add_argument('--workers', type=int, default=min(8, len(os.sched_getaffinity(0))),
                        help="loader processes (default: the recipe's min(8, cores))")
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    parser.add_argument('--channels-last', type=int, choices=(0, 1), default=1,
                        help="fastai's ChannelsLast callback (1) or contiguous NCHW (0)")
    parser.add_argument('--num-classes', type=int, default=None, help='for --raw-only (default: the class folders)')
    parser.add_argument('--budget-seconds', type=float, default=None,
                        help='train only the whole epochs whose schedule fits in this much process wall time')
    parser.add_argument('--probe-batches', type=int, default=10, help='timed train batches of the budget probe')
    parser.add_argument('--raw-only', action='store_true', help='measure the raw step speed and exit')
    parser.add_argument('--raw-warmup', type=int, default=5)
    parser.add_argument('--raw-steps', type=int, default=30)
    parser.add_argument('--threads', type=int, default=int(os.environ.get('OMP_NUM_THREADS') or 0) or None,
                        help='torch threads (default: one per core, or $OMP_NUM_THREADS when set, as torch does)')
    parser.add_argument('--seed', type=int, default=0, help="fastai's set_seed (the recipe itself sets none)")
    parser.add_argument('--out', required=True, help='write the JSON result here')
    args = parser.parse_args(argv)
    if not args.raw_only and not (args.data_root and os.path.isdir(os.path.join(args.data_root, 'train'))):
        parser.error(f'--data-root {args.data_root!r} has no train/ folder')
    if not is_xresnet_model(args.arch):
        parser.error(f'--arch {args.arch!r} is not a model of fastai.vision.models.xresnet')
    return args


def is_xresnet_model(name: str) -> bool:
    """A model builder of fastai's xresnet module (xresnet18, xse_resnext50, ...; not XResNet or init_cnn)."""
    from fastai.vision.models import xresnet
    return name.startswith('x') and name in xresnet.__all__


def precision(learn, device: str) -> str:
    """The best mixed precision fastai's API offers here. Its MixedPrecision callback autocasts on 'cuda' only
    (fastai 2.8: ``autocast('cuda', ...)``); on a CPU ``to_bf16()`` would be a silent no-op, so fp32."""
    if device != 'cuda':
        return 'fp32'
    if torch.cuda.is_bf16_supported():
        learn.to_bf16()
        return 'bf16'
    learn.to_fp16()
    return 'fp16'


def build_model(arch: str, classes: int):
    from fastai.layers import AvgPool, Mish
    from fastai.vision.models import xresnet
    return getattr(xresnet, arch)(n_out=classes, act_cls=Mish, sa=RECIPE['sa'], sym=RECIPE['sym'], pool=AvgPool)


def opt_func():
    from fastai.optimizer import ranger
    return partial(ranger, mom=RECIPE['mom'], sqr_mom=RECIPE['sqr_mom'], eps=RECIPE['eps'], beta=RECIPE['beta'])


def build_learner(args, dls):
    import fastai.callback.fp16  # noqa: F401  (patches Learner.to_bf16 / to_fp16)
    import fastai.callback.schedule  # noqa: F401  (patches Learner.fit_flat_cos)
    from fastai.callback.channelslast import ChannelsLast
    from fastai.learner import Learner
    from fastai.losses import LabelSmoothingCrossEntropy
    from fastai.metrics import accuracy, top_k_accuracy

    top_k = partial(top_k_accuracy, k=min(5, dls.c))  # topk(5) fails with fewer classes
    top_k.__name__ = 'top_k_accuracy'
    learn = Learner(dls, build_model(args.arch, dls.c), opt_func=opt_func(), loss_func=LabelSmoothingCrossEntropy(),
                    metrics=[accuracy, top_k])
    if args.channels_last:
        learn.add_cb(ChannelsLast())
    return learn, precision(learn, args.device)


def build_dls(args):
    from fastai.data.block import CategoryBlock, DataBlock
    from fastai.data.transforms import GrandparentSplitter, Normalize, get_image_files, parent_label
    from fastai.vision.augment import FlipItem, RandomResizedCrop
    from fastai.vision.core import imagenet_stats
    from fastai.vision.data import ImageBlock

    dblock = DataBlock(blocks=(ImageBlock, CategoryBlock), splitter=GrandparentSplitter(valid_name='val'),
                       get_items=get_image_files, get_y=parent_label,
                       item_tfms=[RandomResizedCrop(args.size, min_scale=RECIPE['min_scale']), FlipItem(0.5)],
                       batch_tfms=[Normalize.from_stats(*imagenet_stats)])
    return dblock.dataloaders(args.data_root, path=args.data_root, bs=args.bs, num_workers=args.workers,
                              device=torch.device(args.device))


def train_clock():
    """A callback that sums the wall time of the training phases (validation excluded) and the images trained."""
    from fastai.callback.core import Callback

    class TrainClock(Callback):
        order = 100

        def before_fit(self):
            self.seconds, self.images = 0.0, 0

        def before_train(self):
            self.start = time.perf_counter()

        def after_batch(self):
            if self.training:
                self.images += len(self.learn.xb[0])

        def after_train(self):
            self.seconds += time.perf_counter() - self.start

    return TrainClock()


def plan_epochs(args, dls, budget_seconds: float) -> dict:
    """The whole epochs whose flat-cos schedule (each epoch trained and validated, as fit_flat_cos does) fits in
    the budget, from a probe: a throwaway learner of the same recipe trains ``probe_batches`` batches (after
    two untimed ones) and evaluates a few val batches. A cut schedule is still a complete flat-then-cosine one
    over fewer epochs: what a fastai user with that budget would run, rather than a run stopped before its LR
    annealed. At least one epoch is trained, so a model that fits none reports the time of one."""
    from fastai.callback.core import Callback, CancelFitException

    stamps = []

    class Probe(Callback):
        def after_batch(self):
            if not self.training:  # an epoch shorter than the probe goes on to validate: not timed here
                return
            stamps.append(time.perf_counter())
            if len(stamps) > PROBE_WARMUP_BATCHES + args.probe_batches:
                raise CancelFitException()

    start = time.perf_counter()
    probe, _ = build_learner(args, dls)
    with probe.no_bar():
        fit_start = time.perf_counter()
        probe.fit(1, args.lr, wd=args.wd, cbs=[Probe()])
    timed = stamps[PROBE_WARMUP_BATCHES:]
    if len(timed) >= 2:
        train_batch = (timed[-1] - timed[0]) / (len(timed) - 1)
    else:  # an epoch of too few batches to leave the warm-up out: all of them, start-up included
        train_batch = (stamps[-1] - fit_start) / len(stamps)
    val_start, val_batches = time.perf_counter(), 0
    probe.model.eval()
    with torch.no_grad():
        for xb, _ in dls.valid:
            probe.model(xb)
            val_batches += 1
            if val_batches == 3:
                break
    val_batch = (time.perf_counter() - val_start) / max(1, val_batches)
    epoch = len(dls.train) * train_batch + len(dls.valid) * val_batch
    left = budget_seconds - (time.time() - PROCESS_START)
    fits = math.floor(left / (epoch * BUDGET_MARGIN)) if epoch > 0 else args.epochs
    return {'budget_seconds': round(budget_seconds, 1), 'epoch_seconds_estimate': round(epoch, 2),
            'train_batch_seconds': round(train_batch, 4), 'val_batch_seconds': round(val_batch, 4),
            'probe_seconds': round(time.perf_counter() - start, 2), 'epochs_that_fit': fits,
            'epochs_trained': max(1, min(args.epochs, fits))}


def train(args) -> dict:
    from fastai.torch_core import set_seed

    set_seed(args.seed)
    dls = build_dls(args)
    plan = plan_epochs(args, dls, args.budget_seconds) if args.budget_seconds else None
    epochs = plan['epochs_trained'] if plan else args.epochs
    learn, used_precision = build_learner(args, dls)
    clock = train_clock()
    fit_start = time.perf_counter()
    with learn.no_bar():  # the per-epoch table still goes to the log; the bar's redraws would flood it
        learn.fit_flat_cos(epochs, args.lr, wd=args.wd, pct_start=RECIPE['pct_start'], cbs=[clock])
    fit_seconds = time.perf_counter() - fit_start
    values = dict(zip(learn.recorder.metric_names[1:], learn.recorder.values[-1]))
    wall = time.time() - PROCESS_START
    # The full schedule from the epochs this run timed: its fit time scaled to all epochs, the rest (imports,
    # data set-up) as measured; the budget probe, which a full run would not need, left out.
    probe = plan['probe_seconds'] if plan else 0.0
    projected = wall - probe + fit_seconds * (args.epochs / epochs - 1)
    return {
        'arch': args.arch, 'top1': round(100 * float(values['accuracy']), 2),
        'top5': round(100 * float(values['top_k_accuracy']), 2), 'top5_k': min(5, dls.c),
        'epochs_trained': epochs, 'epochs_recipe': args.epochs, 'images_trained': clock.images,
        'train_images': len(dls.train_ds), 'eval_samples': len(dls.valid_ds), 'num_classes': dls.c,
        'train_img_per_sec': round(clock.images / clock.seconds, 2), 'train_minutes': round(clock.seconds / 60, 3),
        'fit_minutes': round(fit_seconds / 60, 3), 'script_wall_minutes': round(wall / 60, 3),
        'projected_full_schedule_wall_minutes': round(projected / 60, 3), 'budget': plan,
        'params': sum(p.numel() for p in learn.model.parameters()),
        'precision': used_precision, 'channels_last': bool(args.channels_last),
        'num_workers': dls.train.fake_l.num_workers, 'torch_threads': torch.get_num_threads(),
        'batch_size': args.bs, 'image_size': args.size, 'recipe': dict(RECIPE, lr=args.lr, wd=args.wd, bs=args.bs),
        'eval_transform': f'squash to {args.size + math.ceil(args.size * 0.14 / 8) * 8} px, center crop {args.size}',
    }


def raw_step(args) -> dict:
    """img/s of a bare fastai training step (forward, label-smoothing loss, backward, ranger step) of the recipe's
    model on random normalized images of the run's batch and size, median of single timed steps."""
    from fastai.losses import LabelSmoothingCrossEntropy
    from fastai.torch_core import params

    device, classes = args.device, args.num_classes
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build_model(args.arch, classes).to(device).to(memory_format=memory_format).train()
    opt = opt_func()(params(model), lr=args.lr)
    loss_func = LabelSmoothingCrossEntropy()
    amp = None  # as precision(): fastai autocasts on CUDA only (no loss scaler here: a speed measurement)
    if device == 'cuda':
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    images = torch.randn(args.bs, 3, args.size, args.size, device=device)  # NCHW, as fastai's loader gives
    targets = torch.randint(0, classes, (args.bs,), device=device)

    def step():
        with torch.autocast(device, dtype=amp, enabled=amp is not None):
            loss = loss_func(model(images).float(), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()

    seconds = median_step_seconds(step, args.raw_warmup, args.raw_steps, cuda=device == 'cuda')
    return {'raw_img_per_sec': round(args.bs / seconds, 2),
            'raw_step': {'batch_size': args.bs, 'image_size': args.size, 'precision': str(amp) if amp else 'fp32',
                         'channels_last': bool(args.channels_last), 'warmup_steps': args.raw_warmup,
                         'timed_steps': args.raw_steps, 'torch_threads': torch.get_num_threads()},
            'params': sum(p.numel() for p in model.parameters()), 'num_classes': classes}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    if args.raw_only:
        if args.num_classes is None:
            train_dir = os.path.join(args.data_root, 'train')
            args.num_classes = sum(os.path.isdir(os.path.join(train_dir, d)) for d in os.listdir(train_dir))
        result = raw_step(args)
    else:
        result = train(args)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
