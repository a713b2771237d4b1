"""ResNet-18 on Imagenette with our default recipe (config/imagenette_res18_config.py): accuracy, wall time,
train and raw step speed, peak memory; optionally against DI-engine's stock example on the same data.

    python benchmarks/imagenette.py                                   # 5 epochs at 128 px, ours only
    python benchmarks/imagenette.py --compare-stock --out result.json # + the stock recipe, and the ratios
    python benchmarks/imagenette.py --skip-ours --stock-arg=--per-epoch-eval  # stock only, with its own evals

Prints one JSON object: ``ours`` (and ``stock``) with top-1/top-5 on the val split, wall minutes of the whole
training process, train img/s and peak RSS; the raw img/s of a bare training step of the same model, batch and
size on random data, and ``efficiency`` = train img/s / raw img/s; ``ratios`` when both ran; hardware,
versions and the command. Runs are subprocesses, one at a time; experiment folders go to --output-dir (a
temporary folder by default), never into the repository. Linux only (os.wait4). pytest never runs it.
"""
import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import psutil
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from dizoo_imgcls.config import ConfigError, build_config, load_config_file  # noqa: E402
from dizoo_imgcls.summary import git_commit, git_dirty, package_versions  # noqa: E402

from _emit import emit, median_step_seconds  # noqa: E402  (benchmarks/ is on sys.path when a script here runs)

ENTRY = os.path.join(REPO, 'entry', 'imagenet_res18_main.py')
CONFIG = os.path.join(REPO, 'config', 'imagenette_res18_config.py')
STOCK = os.path.join(REPO, 'benchmarks', 'stock_dizoo.py')
SHARED_IMAGENETTE = os.path.normpath(os.path.join(REPO, '..', 'shared', 'data', 'imagenette2-224'))
RSS_POLL_SECONDS = 0.5


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every training benchmark here takes: data, epochs, size, device, our ``--set`` overrides,
    raw-step timing and outputs (checked by ``check_benchmark_args``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-root', default=SHARED_IMAGENETTE if os.path.isdir(SHARED_IMAGENETTE) else None,
                        help=f'ImageNet-layout folder (default: {SHARED_IMAGENETTE} when it exists)')
    parser.add_argument('--epochs', type=int, default=5)
    parser.add_argument('--size', type=int, default=128, help='train image side in px (data.image_size)')
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto',
                        help='auto: cuda when torch sees a GPU; used by every run of the benchmark')
    parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                        help='config override passed on to our entry (repeatable); also applies to the raw step')
    parser.add_argument('--raw-warmup', type=int, default=5, help='untimed raw steps')
    parser.add_argument('--raw-steps', type=int, default=30, help='timed raw steps (img/s from their median)')
    parser.add_argument('--output-dir', default=None, help='experiment folders (default: a new temporary folder)')
    parser.add_argument('--out', default=None, help='also write the JSON result to this file')
    return parser


def check_benchmark_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.data_root or not os.path.isdir(os.path.join(args.data_root, 'train')):
        parser.error(f'--data-root {args.data_root!r} has no train/ folder (expected train/<class>/*, val/<class>/*)')
    if args.epochs < 1 or args.size < 8:
        parser.error(f'--epochs must be >= 1 and --size >= 8, got {args.epochs} and {args.size}')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda but torch sees no GPU')
    args.device = ('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto' else args.device
    args.data_root = os.path.abspath(args.data_root)


def parse_args(argv=None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument('--compare-stock', action='store_true', help="also train DI-engine's stock example")
    parser.add_argument('--skip-ours', action='store_true', help='only the stock run (implies --compare-stock)')
    parser.add_argument('--stock-arg', dest='stock_args', action='append', default=[], metavar='ARG',
                        help='extra argument for benchmarks/stock_dizoo.py, e.g. --stock-arg=--per-epoch-eval')
    args = parser.parse_args(argv)
    check_benchmark_args(parser, args)
    args.compare_stock = args.compare_stock or args.skip_ours
    return args


def environment(device: str) -> dict:
    cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')),
               platform.processor())
    commit = git_commit(REPO)
    dirty = git_dirty(REPO)
    return {
        'hardware': {'cpu': cpu, 'cores': len(os.sched_getaffinity(0)), 'device': device,
                     'gpu': torch.cuda.get_device_name(0) if device == 'cuda' else None},
        'versions': {**package_versions(), 'dizoo_imgcls_commit': commit and commit + ('+dirty' if dirty else '')},
    }


def tree_rss_bytes(pid: int) -> int:
    """Resident memory summed over a process and all its descendants (shared pages count once per process)."""
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_watched(cmd: list, cwd: str) -> dict:
    """Run ``cmd`` with its output on our stderr; wall time and two peak-memory figures of its process tree."""
    print(f'$ (cd {shlex.quote(cwd)} && {shlex.join(cmd)})', file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=sys.stderr, stderr=sys.stderr)
    peak_tree = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak_tree = max(peak_tree, tree_rss_bytes(proc.pid))
        time.sleep(RSS_POLL_SECONDS)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f'error: exit status {proc.returncode} from: {shlex.join(cmd)}')
    return {
        'wall_minutes': round((time.perf_counter() - start) / 60, 3),
        # wait4's ru_maxrss (KiB on Linux): the largest peak of any single process of the run, loader workers
        # included (they are reaped by the run's main process), not a sum.
        'peak_rss_largest_process_mb': round(usage.ru_maxrss / 1024, 1),
        'peak_rss_tree_sum_mb': round(peak_tree / 2 ** 20, 1),
        'command': shlex.join(cmd),
    }


def our_overrides(args, output_dir: str) -> list:
    fixed = [f'policy.learn.train_epoch={args.epochs}', f'data.image_size={args.size}', f'output_dir={output_dir}',
             f'policy.cuda={args.device == "cuda"}']
    return fixed + args.overrides  # the user's --set come last and win


def find_summary(folder: str, since: float) -> str:
    """The summary.json the run just wrote: the entry adds a timestamp to the experiment folder's name when
    ``--output-dir`` already holds one from an earlier benchmark."""
    found = [os.path.join(root, 'summary.json') for root, _, files in os.walk(folder) if 'summary.json' in files]
    found = [path for path in found if os.path.getmtime(path) >= since]
    if not found:
        raise SystemExit(f'error: the run wrote no summary.json under {folder}')
    return max(found, key=os.path.getmtime)


def run_ours(args, cfg, output_dir: str) -> dict:
    folder = os.path.join(output_dir, 'ours')
    cmd = [sys.executable, ENTRY, '--config', CONFIG, '--data-root', args.data_root, '--exp-name', 'imagenette_res18']
    for item in our_overrides(args, folder):
        cmd += ['--set', item]
    start = time.time()
    run = run_watched(cmd, cwd=output_dir)
    with open(find_summary(folder, start)) as f:
        summary = json.load(f)
    result = {'top1': summary['acc1'], 'top1_tta': summary.get('acc1_tta'), 'top5': summary['acc5']}
    for key in ('acc1_ema', 'acc1_ema_tta'):  # only when the run kept an EMA of the weights
        if summary.get(key) is not None:
            result[key] = summary[key]
    result.update(train_img_per_sec=summary['train_img_per_sec'], epochs=summary['epochs'],
                  eval_samples=summary.get('eval_samples'), batch_size=cfg.policy.learn.batch_size,
                  image_size=cfg.data.image_size, eval_image_size=cfg.data.get('eval_image_size'),
                  exp_dir=summary['exp_dir'], **run)
    return result


def num_classes(cfg, data_root: str) -> int:
    """As the entry decides it: the config's value, else the class folders of the training split."""
    train = os.path.join(data_root, 'train')
    return cfg.policy.model.num_classes or sum(os.path.isdir(os.path.join(train, d)) for d in os.listdir(train))


def train_sizes(cfg, epochs: int) -> list:
    """The training crop side of each epoch: ``data.image_size``, or the progressive-resize schedule."""
    from dizoo_imgcls.data.transforms import ProgressiveResize, TrainPreset

    spec, size = cfg.data.get('progressive_resize') or {}, cfg.data.image_size
    if not spec.get('start_scale'):
        return [size] * epochs
    schedule = ProgressiveResize.from_scale(TrainPreset(size), spec['start_scale'], size, spec['ramp_epochs'])
    return [schedule.size_at(epoch) for epoch in range(1, epochs + 1)]


def raw_step_speed(cfg, classes: int, device: str, warmup: int, steps: int, epochs: int) -> dict:
    """img/s of a bare training step at each training size of the run, and their epoch-weighted harmonic mean
    (what a pipeline that never waits for data would achieve over the whole run)."""
    sizes = train_sizes(cfg, epochs)
    by_size = {size: raw_step_speed_at(cfg, classes, device, warmup, steps, size) for size in sorted(set(sizes))}
    raw = by_size[cfg.data.image_size] if cfg.data.image_size in by_size else next(iter(by_size.values()))
    harmonic = len(sizes) / sum(1.0 / by_size[size]['raw_img_per_sec'] for size in sizes)
    return dict(raw, raw_img_per_sec=round(harmonic, 2), train_sizes_by_epoch=sizes,
                raw_img_per_sec_by_size={str(size): r['raw_img_per_sec'] for size, r in by_size.items()})


def raw_step_speed_at(cfg, classes: int, device: str, warmup: int, steps: int, size: int) -> dict:
    """img/s of a bare training step (forward, backward, optimizer) of our model on random uint8 images of the
    run's batch and the given size, with the policy's memory format, mixed precision, optimizer and loss."""
    from dizoo_imgcls.model import build_model_from_cfg
    from dizoo_imgcls.policy.image_classification import resolve_amp_dtype
    from dizoo_imgcls.policy.optim import build_optimizer, optimizer_options

    learn, batch = cfg.policy.learn, cfg.policy.learn.batch_size
    model = build_model_from_cfg(dict(cfg.policy.model, num_classes=classes, pretrained=None)).to(device)
    memory_format = torch.channels_last if learn.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = build_optimizer(learn.optimizer, model.parameters(), 1e-3, **optimizer_options(learn))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=learn.label_smoothing)
    amp = resolve_amp_dtype(learn.amp, device)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    images = images.contiguous(memory_format=memory_format)
    targets = torch.randint(0, classes, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device, dtype=amp) if amp is not None else nullcontext():
            logits = model(images)
        loss = criterion(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = median_step_seconds(step, warmup, steps, cuda=device == 'cuda') * steps
    return {'model': cfg.policy.model.name, 'activation': cfg.policy.model.get('activation') or 'relu',
            'params': sum(p.numel() for p in model.parameters()),
            'num_classes': classes, 'raw_img_per_sec': round(batch * steps / seconds, 2),
            'raw_step': {'batch_size': batch, 'image_size': size, 'amp': str(amp) if amp else None,
                         'channels_last': bool(learn.channels_last), 'warmup_steps': warmup, 'timed_steps': steps,
                         'torch_threads': torch.get_num_threads()}}


def run_stock(args, output_dir: str) -> dict:
    folder, out = os.path.join(output_dir, 'stock'), os.path.join(output_dir, 'stock_result.json')
    cmd = [sys.executable, STOCK, '--data-root', args.data_root, '--epochs', str(args.epochs),
           '--size', str(args.size), '--device', args.device, '--output-dir', folder, '--out', out, *args.stock_args]
    run = run_watched(cmd, cwd=output_dir)
    with open(out) as f:
        stock = json.load(f)
    # The whole process, as for ours; the stock script's own wall_minutes starts after its imports.
    stock['script_wall_minutes'] = stock.pop('wall_minutes')
    return {**stock, **run}


def quotient(a, b):
    return round(a / b, 3) if a is not None and b else None


def ratios(ours: dict, stock: dict) -> dict:
    return {
        'top1_ours_over_stock': quotient(ours['top1'], stock['top1']),
        'speedup_wall_stock_over_ours': quotient(stock['wall_minutes'], ours['wall_minutes']),
        'train_img_per_sec_ours_over_stock': quotient(ours['train_img_per_sec'], stock['train_img_per_sec']),
    }


def prepare(args, prefix: str):
    """Our config as the benchmark's run of it will build it (a bad ``--set`` exits 2 naming it, before anything
    runs), and the output folder: ``--output-dir`` or a new temporary one named ``prefix...``."""
    try:
        cfg = build_config(load_config_file(CONFIG), our_overrides(args, 'unused'), CONFIG)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        raise SystemExit(2)
    output_dir = os.path.abspath(args.output_dir or tempfile.mkdtemp(prefix=prefix))
    os.makedirs(output_dir, exist_ok=True)
    return cfg, output_dir


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg, output_dir = prepare(args, 'imagenette_bench_')
    result = {'benchmark': 'imagenette', 'command': shlex.join([sys.executable, *sys.argv]), 'cwd': os.getcwd(),
              'data_root': args.data_root, 'epochs': args.epochs, 'image_size': args.size,
              'output_dir': output_dir, **environment(args.device)}
    if not args.skip_ours:
        # Before the training run, not beside it: both would compete for the same cores.
        raw = raw_step_speed(cfg, num_classes(cfg, args.data_root), args.device, args.raw_warmup, args.raw_steps,
                             args.epochs)
        ours = run_ours(args, cfg, output_dir)
        ours.update(raw, efficiency=quotient(ours['train_img_per_sec'], raw['raw_img_per_sec']))
        result['ours'] = ours
    if args.compare_stock:
        result['stock'] = run_stock(args, output_dir)
    if 'ours' in result and 'stock' in result:
        result['ratios'] = ratios(result['ours'], result['stock'])
    return emit(result, args.out, indent=2)


if __name__ == '__main__':
    sys.exit(main())
