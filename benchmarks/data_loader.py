"""Data loader throughput and worker memory: dizoo_imgcls's folder pipeline vs DI-engine's stock
``dizoo.image_classification.data.ImageNetDataset`` behind the same DataLoader settings.

    python benchmarks/data_loader.py --data-root ../shared/data/imagenette2-224 [--max-images 1000]

Sources: (a) the Imagenette folder as it is (224x224 JPEGs); (b) the same images upscaled to ImageNet's
typical 500x375 at JPEG quality 90 in a temporary folder. For each source, transform (train / eval) and
output size it prints one JSON line: images/s, images/s per worker core (images/s / workers) and images per
worker-CPU second (the same per-core figure measured from the workers' CPU time, so it holds up when other
processes share the cores), for our loader, the stock one, ours with Pillow as JPEG decoder, ours decoding whole
JPEGs with simplejpeg (where 'auto' is the region decoder), and (train) ours exactly as train.py builds it; and
the ratios to stock. Stock runs its own transform builders at that size (train: resize + center crop, no
augmentation; eval: resize / 0.875 + center crop; float normalized output).
Then (c): a pre-resized copy of (b) (``python -m dizoo_imgcls.prepare resize``, shorter side
--resized-short-side px), its build time, and our loader reading it against stock reading (b) itself: what a
user of the copy gets on repeated runs. Then worker RSS after each of 3 epochs over the full train split. Not a
test: pytest never runs it.
"""
import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool

import psutil
import torch
from PIL import Image, features
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dizoo_imgcls.data import (DATA_CONFIG, build_datasets, collate_images, default_num_workers,  # noqa: E402
                               wrap_loaders)
from dizoo_imgcls.data.decode import _jpeg_region, resolve_decoder, simplejpeg  # noqa: E402
from dizoo_imgcls.data.resized_copy import write_resized_copy  # noqa: E402

IMAGENET_SIZE = (500, 375)  # width, height of a typical ImageNet photo
IMAGENET_QUALITY = 90


def parse_args(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-root', default=os.path.join(here, '..', '..', 'shared', 'data', 'imagenette2-224'))
    parser.add_argument('--max-images', type=int, default=1000, help='images per split in the throughput runs')
    parser.add_argument('--sizes', type=int, nargs='+', default=[128, 176, 224], help='output sizes in px')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--workers', type=int, default=None, help='loader workers (default: one per core)')
    parser.add_argument('--timed-epochs', type=int, default=3, help='epochs timed per loader after a warm-up one')
    parser.add_argument('--skip-memory', action='store_true', help='skip the 3-epoch worker memory run')
    parser.add_argument('--resized-short-side', type=int, default=256,
                        help='shorter side of the pre-resized copy of (b) in case (c); 0 skips (c)')
    return parser.parse_args(argv)


def environment() -> dict:
    cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')),
               platform.processor())
    return {
        'case': 'environment', 'cpu': cpu, 'cores': default_num_workers(), 'python': platform.python_version(),
        'torch': torch.__version__, 'pillow': Image.__version__,
        'libjpeg_turbo': features.version('libjpeg_turbo'),
        'simplejpeg': getattr(simplejpeg, '__version__', None) if simplejpeg else None,
        'decoder_auto': resolve_decoder('auto'),
        'region_decoder_libjpeg_turbo': _jpeg_region.LIBJPEG_TURBO_VERSION if _jpeg_region else None,
        'loadavg_1m_5m_15m': os.getloadavg(),
    }


def link_subset(src_root: str, dst_root: str, max_images: int) -> None:
    """Symlink up to ``max_images`` per split, spread evenly over the classes (every class keeps a folder)."""
    for split in ('train', 'val'):
        classes = sorted(os.listdir(os.path.join(src_root, split)))
        per_class = max(1, max_images // len(classes))
        for cls in classes:
            os.makedirs(os.path.join(dst_root, split, cls))
            for name in sorted(os.listdir(os.path.join(src_root, split, cls)))[:per_class]:
                os.symlink(os.path.realpath(os.path.join(src_root, split, cls, name)),
                           os.path.join(dst_root, split, cls, name))


def _upscale(job) -> None:
    src, dst = job
    with Image.open(src) as img:
        img.convert('RGB').resize(IMAGENET_SIZE, Image.BICUBIC).save(dst, 'JPEG', quality=IMAGENET_QUALITY)


def imagenet_sized_copy(src_root: str, dst_root: str) -> None:
    """The same files upscaled to 500x375, quality 90 (what an ImageNet JPEG costs to decode)."""
    jobs = []
    for folder, _, names in os.walk(src_root, followlinks=True):
        out = os.path.join(dst_root, os.path.relpath(folder, src_root))
        os.makedirs(out, exist_ok=True)
        jobs.extend((os.path.join(folder, n), os.path.join(out, n)) for n in names)
    with Pool(default_num_workers()) as pool:
        pool.map(_upscale, jobs, chunksize=16)


def loader_settings(args, kind: str) -> dict:
    """The DataLoader settings every compared dataset runs behind (those of our training loaders)."""
    return dict(batch_size=args.batch_size, shuffle=kind == 'train', num_workers=args.workers,
                persistent_workers=True, pin_memory=torch.cuda.is_available())


def our_loader(root: str, kind: str, size: int, args, decoder: str = 'auto') -> DataLoader:
    train_set, val_set = build_datasets(dict(DATA_CONFIG, root=root, image_size=size, decoder=decoder))
    return DataLoader(train_set if kind == 'train' else val_set, collate_fn=collate_images,
                      **loader_settings(args, kind))


def as_trained_loader(root: str, size: int, args) -> DataLoader:
    """The training loader exactly as train.py builds it (shard sampler, per-sample seeded augmentation)."""
    cfg = dict(DATA_CONFIG, root=root, image_size=size, num_workers=args.workers)
    train_set, val_set = build_datasets(cfg)
    data = wrap_loaders(train_set, val_set, cfg, args.batch_size, args.batch_size, 0, 1, 0, train_set.classes)
    return data.train_loader


def stock_loader(root: str, kind: str, size: int, args) -> DataLoader:
    from dizoo.image_classification.data import ImageNetDataset
    from dizoo.image_classification.data.dataset import transforms_imagenet_eval, transforms_noaug_train

    transform = transforms_noaug_train(size) if kind == 'train' else transforms_imagenet_eval(size)
    dataset = ImageNetDataset(os.path.join(root, 'train' if kind == 'train' else 'val'), kind == 'train', transform)
    return DataLoader(dataset, **loader_settings(args, kind))


def worker_processes(loader: DataLoader) -> list:
    return [psutil.Process(w.pid) for w in loader._iterator._workers]  # persistent workers; no public accessor


def run_epoch(loader: DataLoader, epoch: int) -> dict:
    """Wall seconds, worker CPU seconds and images of one epoch."""
    sampler = getattr(loader.batch_sampler, 'sampler', None)
    if hasattr(sampler, 'set_epoch'):
        sampler.set_epoch(epoch)
    iterator = iter(loader)  # starts the workers on the first epoch
    workers = worker_processes(loader)
    cpu_start = sum(sum(p.cpu_times()[:2]) for p in workers)
    start, images = time.perf_counter(), 0
    for batch, _ in iterator:
        images += batch.shape[0]
    wall = time.perf_counter() - start
    return {'wall_s': wall, 'cpu_s': sum(sum(p.cpu_times()[:2]) for p in workers) - cpu_start, 'images': images}


def compare(loaders: dict, timed_epochs: int) -> dict:
    """One warm-up epoch each (worker start, page cache), then timed epochs taken in turns, so a change in
    the machine's load hits every loader alike. {name: (images/s, images per worker-CPU second)}."""
    for loader in loaders.values():
        run_epoch(loader, 0)
    totals = {name: {'wall_s': 0.0, 'cpu_s': 0.0, 'images': 0} for name in loaders}
    for epoch in range(1, timed_epochs + 1):
        for name, loader in loaders.items():
            for key, value in run_epoch(loader, epoch).items():
                totals[name][key] += value
    return {name: (t['images'] / t['wall_s'], t['images'] / t['cpu_s']) for name, t in totals.items()}


def labels_by_path(ours, stock) -> bool:
    """Same images (relative to the split folder) with the same labels; a resized copy keeps relative paths."""
    mine = {ours.dataset.paths[i]: int(ours.dataset.targets[i]) for i in range(len(ours.dataset))}
    return mine == {os.path.relpath(p, stock.dataset.root): t for p, t in stock.dataset.data}


def throughput_case(source: str, root: str, kind: str, size: int, args, stock_root: str = None) -> dict:
    """Ours reading ``root`` against stock reading ``stock_root`` (default: the same folder)."""
    loaders = {'ours': our_loader(root, kind, size, args),
               'stock': stock_loader(stock_root or root, kind, size, args)}
    if simplejpeg is not None:
        loaders['ours_pil_decoder'] = our_loader(root, kind, size, args, 'pil')
    if resolve_decoder('auto') == 'region':
        loaders['ours_simplejpeg_decoder'] = our_loader(root, kind, size, args, 'simplejpeg')
    if kind == 'train':
        loaders['ours_as_trained'] = as_trained_loader(root, size, args)
    result = {'case': 'throughput', 'source': source, 'transform': kind, 'size_px': size,
              'images': len(loaders['ours'].dataset), 'workers': args.workers, 'batch_size': args.batch_size}
    rates = compare(loaders, args.timed_epochs)
    for name, (per_s, per_cpu_s) in rates.items():
        result[f'{name}_img_per_s'] = round(per_s, 1)
        result[f'{name}_img_per_s_per_core'] = round(per_s / args.workers, 1)
        result[f'{name}_img_per_worker_cpu_s'] = round(per_cpu_s, 1)
    result['ratio_vs_stock'] = round(rates['ours'][0] / rates['stock'][0], 2)
    result['cpu_ratio_vs_stock'] = round(rates['ours'][1] / rates['stock'][1], 2)
    result['labels_identical'] = labels_by_path(loaders['ours'], loaders['stock'])
    result['loadavg_1m'] = round(os.getloadavg()[0], 2)
    return result


def memory_case(name: str, loader: DataLoader) -> dict:
    """Worker RSS after each of 3 epochs over the whole split."""
    per_epoch = []
    for epoch in range(3):
        images = run_epoch(loader, epoch)['images']
        per_epoch.append([round(p.memory_info().rss / 2 ** 20, 1) for p in worker_processes(loader)])
    first, last = sum(per_epoch[0]), sum(per_epoch[-1])
    return {'case': 'worker_memory', 'loader': name, 'images_per_epoch': images,
            'worker_rss_mb_per_epoch': per_epoch, 'rss_change_epoch1_to_3_pct': round(100 * (last - first) / first, 1),
            'loadavg_1m': round(os.getloadavg()[0], 2)}


def main(argv=None) -> None:
    args = parse_args(argv)
    args.workers = args.workers or default_num_workers()
    print(json.dumps(environment()), flush=True)
    tmp = tempfile.mkdtemp(prefix='dizoo_imgcls_bench_')
    try:
        sources = {'a_imagenette_224': os.path.join(tmp, 'a'), 'b_imagenet_500x375_q90': os.path.join(tmp, 'b')}
        link_subset(args.data_root, sources['a_imagenette_224'], args.max_images)
        imagenet_sized_copy(sources['a_imagenette_224'], sources['b_imagenet_500x375_q90'])
        for source, root in sources.items():
            for size in args.sizes:
                for kind in ('train', 'eval'):
                    print(json.dumps(throughput_case(source, root, kind, size, args)), flush=True)
        if args.resized_short_side:
            copy_root = os.path.join(tmp, 'c')
            report = write_resized_copy(sources['b_imagenet_500x375_q90'], copy_root, args.resized_short_side,
                                        workers=args.workers)
            print(json.dumps({'case': 'resized_copy_build', 'source': 'b_imagenet_500x375_q90',
                              'short_side_px': args.resized_short_side, 'images': report.images,
                              'seconds': round(report.seconds, 2), 'workers': args.workers,
                              'img_per_s_per_core': round(report.images / report.seconds / args.workers, 1)}),
                  flush=True)
            source = f'c_copy_of_b_short_{args.resized_short_side}_vs_stock_on_b'
            for size in args.sizes:
                for kind in ('train', 'eval'):
                    print(json.dumps(throughput_case(source, copy_root, kind, size, args,
                                                     stock_root=sources['b_imagenet_500x375_q90'])), flush=True)
        if not args.skip_memory:
            print(json.dumps(memory_case('ours_train_128px', as_trained_loader(args.data_root, 128, args))), flush=True)
            print(json.dumps(memory_case('stock_train_128px', stock_loader(args.data_root, 'train', 128, args))),
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
