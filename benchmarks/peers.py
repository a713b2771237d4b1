"""Our default recipe beside fastai's own published Imagenette recipe, on the same data folder, epochs, image
size and machine, in one run (issue 21, deliverable 1).

    pip install -e '.[peers]'   # fastai, an optional extra
    python benchmarks/peers.py --out peers.json                     # 5 epochs, 128 px, peers held to our wall
    python benchmarks/peers.py --peer-budget full --out peers.json  # every peer trains all epochs
    python benchmarks/peers.py --arch xse_resnext18 --peer-arg=--workers=1  # another peer model, loader setting

Ours is exactly what benchmarks/imagenette.py runs (config/imagenette_res18_config.py through
entry/imagenet_res18_main.py, with its ``--set`` overrides); the peer is benchmarks/_fastai_imagenette.py,
fastai's nbs/examples/train_imagenette.py with that script's defaults (xresnet + Mish, ranger mom 0.9, sqr_mom
0.99, eps 1e-6, fit_flat_cos lr 1e-2 wd 1e-2, batch 64, RandomResizedCrop(min_scale=0.35) + flip,
label-smoothing CE), once per ``--arch``: by default xresnet18 (the ResNet-18-sized model) and xse_resnext50 (the
record's model family, without its self-attention and MaxBlurPool stem, as fastai's script builds it). fastai
gets the best settings its API allows here: torch threads = cores, the recipe's loader workers min(8, cores),
bf16 autocast through ``learn.to_bf16()`` on a GPU (fastai autocasts on CUDA only, so fp32 on a CPU), and
fastai's ChannelsLast callback when our policy uses channels_last (``--peer-arg=--channels-last=0`` and
``--peer-arg=--workers=N`` override both). The JSON says which in each peer's ``precision``, ``channels_last``,
``num_workers`` and ``torch_threads``. Evaluation crops differ as the recipes do: fastai squashes the whole image
to size + 14% (rounded up to 8 px) and crops the central ``size`` px, ours resizes the short side to size / 0.875
and crops the centre; both on the whole val split, without TTA for the peers (ours reports top1_tta beside).

Wall budget (``--peer-budget``): 'full' trains every peer for all epochs. 'ours' (the default) gives each peer
at most our run's measured wall time, the whole process from start to exit as for ours: after its data set-up
the peer times a throwaway learner of the same recipe for a few batches, and trains the whole epochs whose
complete fit_flat_cos schedule (train + validation per epoch) fits in what is left -- a shorter but complete
flat-then-cosine run, what a fastai user with that budget would launch, rather than a run cut before its LR
annealed. At least one epoch is trained, so a peer that fits none overruns and says so (``within_our_wall``).
Either way each peer reports ``projected_full_schedule_wall_minutes``: its measured fit time scaled to all
epochs plus its measured set-up (measured outright when it trained them all).

Prints one JSON object: ``ours`` (as benchmarks/imagenette.py reports it, plus ``precision``), ``peers`` keyed by
arch (top-1/top-5 on the whole val split as fastai computes them, wall minutes of the process, train img/s =
images trained / training-phase seconds, raw step img/s = batch / median seconds of single timed steps of
forward, loss, backward and ranger step on random data, parameters, peak memory), ``ratios`` per arch, hardware
and versions. Runs are subprocesses, one at a time; raw steps first, then ours, then the peers. Linux only.
"""
import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

import torch

from imagenette import (benchmark_parser, check_benchmark_args, environment, num_classes, prepare,  # noqa: E402
                        quotient, raw_step_speed, run_ours, run_watched)
from _emit import emit  # noqa: E402
from _fastai_imagenette import is_xresnet_model  # noqa: E402

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_fastai_imagenette.py')
DEFAULT_ARCHS = ('xresnet18', 'xse_resnext50')


def parse_args(argv=None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument('--arch', dest='archs', action='append', default=None, metavar='NAME',
                        help=f'fastai xresnet model of a peer run (repeatable; default: {" and ".join(DEFAULT_ARCHS)})')
    parser.add_argument('--peer-budget', choices=('full', 'ours'), default='ours',
                        help="'ours': each peer trains the whole epochs that fit in our run's wall time; 'full': all")
    parser.add_argument('--peer-arg', dest='peer_args', action='append', default=[], metavar='ARG',
                        help='extra argument for benchmarks/_fastai_imagenette.py, e.g. --peer-arg=--workers=1')
    args = parser.parse_args(argv)
    check_benchmark_args(parser, args)
    if importlib.util.find_spec('fastai') is None:
        parser.error("fastai is not installed: pip install -e '.[peers]'")
    args.archs = args.archs or list(DEFAULT_ARCHS)
    for arch in args.archs:
        if not is_xresnet_model(arch):
            parser.error(f'--arch {arch!r} is not a model of fastai.vision.models.xresnet '
                         f'(e.g. {", ".join(DEFAULT_ARCHS)}, xse_resnext18)')
    return args


def peer_command(args, arch: str, channels_last: bool, out: str) -> list:
    return [sys.executable, PEER, '--arch', arch, '--size', str(args.size), '--device', args.device,
            '--channels-last', str(int(channels_last)), '--out', out]


def peer_raw_step(args, arch: str, classes: int, channels_last: bool, output_dir: str) -> dict:
    """The peer's raw step speed, in its own process (fastai's threads and imports, not ours)."""
    out = os.path.join(output_dir, f'peer_{arch}_raw.json')
    cmd = peer_command(args, arch, channels_last, out) + [
        '--raw-only', '--num-classes', str(classes), '--raw-warmup', str(args.raw_warmup),
        '--raw-steps', str(args.raw_steps), *args.peer_args]
    print(f'$ {shlex.join(cmd)}', file=sys.stderr, flush=True)
    code = subprocess.run(cmd, cwd=output_dir, stdout=sys.stderr, stderr=sys.stderr).returncode
    if code != 0:
        raise SystemExit(f'error: exit status {code} from: {shlex.join(cmd)}')
    with open(out) as f:
        return json.load(f)


def run_peer(args, arch: str, channels_last: bool, budget_seconds, output_dir: str) -> dict:
    out = os.path.join(output_dir, f'peer_{arch}.json')
    cmd = peer_command(args, arch, channels_last, out) + ['--data-root', args.data_root, '--epochs', str(args.epochs)]
    if budget_seconds is not None:
        cmd += ['--budget-seconds', f'{budget_seconds:.1f}']
    run = run_watched(cmd + args.peer_args, cwd=output_dir)
    with open(out) as f:
        return {**json.load(f), **run}


def ratios(ours: dict, peer: dict) -> dict:
    return {
        'top1_ours_over_peer': quotient(ours['top1'], peer['top1']),
        'top5_ours_over_peer': quotient(ours['top5'], peer['top5']),
        'speedup_wall_peer_over_ours': quotient(peer['wall_minutes'], ours['wall_minutes']),
        'full_schedule_wall_peer_over_ours': quotient(peer['projected_full_schedule_wall_minutes'],
                                                      ours['wall_minutes']),
        'train_img_per_sec_ours_over_peer': quotient(ours['train_img_per_sec'], peer['train_img_per_sec']),
        'raw_img_per_sec_ours_over_peer': quotient(ours['raw_img_per_sec'], peer['raw_img_per_sec']),
    }


def precision_name(cfg, device: str) -> str:
    from dizoo_imgcls.policy.image_classification import resolve_amp_dtype

    dtype = resolve_amp_dtype(cfg.policy.learn.amp, device)
    return {None: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}[dtype]


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg, output_dir = prepare(args, 'peers_bench_')
    env = environment(args.device)
    for package in ('fastai', 'fastcore'):
        try:
            env['versions'][package] = version(package)
        except PackageNotFoundError:
            env['versions'][package] = None
    result = {'benchmark': 'imagenette_peers', 'command': shlex.join([sys.executable, *sys.argv]),
              'cwd': os.getcwd(), 'data_root': args.data_root, 'epochs': args.epochs, 'image_size': args.size,
              'peer_budget': args.peer_budget, 'output_dir': output_dir, **env}
    classes, channels_last = num_classes(cfg, args.data_root), bool(cfg.policy.learn.channels_last)
    # Raw steps before any training run, not beside one (they would compete for the cores); the peers' also
    # check their --arch and --peer-arg before our run spends its minutes.
    raw = raw_step_speed(cfg, classes, args.device, args.raw_warmup, args.raw_steps, args.epochs)
    peer_raw = {arch: peer_raw_step(args, arch, classes, channels_last, output_dir) for arch in args.archs}
    ours = run_ours(args, cfg, output_dir)
    ours.update(raw, precision=precision_name(cfg, args.device),
                efficiency=quotient(ours['train_img_per_sec'], raw['raw_img_per_sec']))
    result['ours'] = ours
    budget = ours['wall_minutes'] * 60 if args.peer_budget == 'ours' else None
    result['peers'], result['ratios'] = {}, {}
    for arch in args.archs:
        peer = run_peer(args, arch, channels_last, budget, output_dir)
        peer.update(raw_img_per_sec=peer_raw[arch]['raw_img_per_sec'], raw_step=peer_raw[arch]['raw_step'],
                    within_our_wall=peer['wall_minutes'] <= ours['wall_minutes'],
                    efficiency=quotient(peer['train_img_per_sec'], peer_raw[arch]['raw_img_per_sec']))
        result['peers'][arch] = peer
        result['ratios'][arch] = ratios(ours, peer)
    return emit(result, args.out, indent=2)


if __name__ == '__main__':
    sys.exit(main())
