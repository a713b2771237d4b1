"""Train an image classifier with DI-engine.

    python entry/imagenet_res18_main.py --demo                       # digits, ships with scikit-learn
    python entry/imagenet_res18_main.py --data-root /data/imagenet   # ImageNet, classic 90-epoch recipe
    python entry/imagenet_res18_main.py --config config/imagenette_res18_config.py --data-root DIR \\
        --set policy.learn.train_epoch=1
    python entry/imagenet_res18_main.py --config config/imagenette_res18_config.py --data-root DIR --lr-find

exit status: 0 done; 1 a bug (traceback); 2 bad input, settings, data or checkpoint, or the experiment is in use
by another run; 3 training diverged (non-finite loss); 74 a file could not be written (full disk, quota,
read-only file system); 130 Ctrl-C; 143 SIGTERM (a checkpoint was written first)
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, '..', 'config', 'imagenet_res18_config.py')
DEMO_CONFIG = os.path.join(HERE, '..', 'config', 'digits_demo_config.py')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default=None, help='config file defining main_config '
                        '(default: config/imagenet_res18_config.py)')
    parser.add_argument('--data-root', default=None, help='folder with train/<class>/* and val/<class>/*')
    parser.add_argument('--exp-name', default=None, help='experiment name (folder under output_dir)')
    parser.add_argument('--seed', type=int, default=None, help='random seed')
    parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                        help='override a config key, e.g. --set policy.learn.batch_size=128 (repeatable)')
    parser.add_argument('--demo', action='store_true',
                        help='train on the handwritten digits shipped with scikit-learn (no download)')
    parser.add_argument('--resume', default=None, metavar='PATH|auto',
                        help="continue from a checkpoint, or 'auto' for the newest in output_dir/exp_name/ckpt "
                             "(or in the exp_name_<date>_<time> folders of later runs)")
    parser.add_argument('--eval-only', action='store_true',
                        help='evaluate the --resume checkpoint on --data-root/val and write per-class reports')
    parser.add_argument('--check-data', action='store_true',
                        help='scan the train and val folders, list every unreadable image, exit 1 if any; no training')
    parser.add_argument('--lr-find', action='store_true',
                        help='learning-rate finder: a short exponential LR sweep on a fresh model, then a suggested '
                        'policy.learn.lr_per_256, a plot and a CSV in output_dir/<exp_name>_lr_find; no training')
    parser.add_argument('--lr-find-start', type=float, default=None, metavar='LR',
                        help='--lr-find: first LR of the sweep (default 1e-7)')
    parser.add_argument('--lr-find-end', type=float, default=None, metavar='LR', help='--lr-find: last LR (default 10)')
    parser.add_argument('--lr-find-steps', type=int, default=None, metavar='N',
                        help='--lr-find: training steps, one LR each (default 100)')
    return parser.parse_args(argv)


def compile_cfg(args: argparse.Namespace):
    from dizoo_imgcls.config import build_config, load_config_file
    from dizoo_imgcls.demo import prepare_digits
    from dizoo_imgcls.errors import SettingError

    if args.demo:
        if args.config:
            raise SettingError('--demo and --config exclude each other')
        source = DEMO_CONFIG
    else:
        source = args.config or DEFAULT_CONFIG
    user = load_config_file(source)
    cfg = build_config(user, args.overrides, source)
    if args.demo and args.data_root is None:
        cfg.data.root = prepare_digits()
    if args.data_root is not None:
        cfg.data.root = args.data_root
    if args.exp_name is not None:
        cfg.exp_name = args.exp_name
    if args.seed is not None:
        cfg.seed = args.seed
    if args.resume is not None:
        cfg.resume = args.resume
    return cfg


EXIT_DIVERGED, EXIT_SIGTERM = 3, 143


def main(argv=None) -> int:
    args = parse_args(argv)
    from dizoo_imgcls.errors import report_user_errors
    return report_user_errors(run, args)


def run(args: argparse.Namespace) -> int:
    """The command; a ``UserError`` it raises is reported by ``main`` as one line."""
    from dizoo_imgcls.checkpoint import DiskWriteError
    from dizoo_imgcls.data import EXPECTED_LAYOUT, DataLayoutError
    from dizoo_imgcls.hooks import TrainingDiverged
    from dizoo_imgcls.lr_find import find_lr
    from dizoo_imgcls.signals import Terminated
    from dizoo_imgcls.train import train

    lr_find_options = {key: value for key, value in (('start', args.lr_find_start), ('end', args.lr_find_end),
                                                     ('steps', args.lr_find_steps)) if value is not None}
    if lr_find_options and not args.lr_find:
        print('error: --lr-find-start/--lr-find-end/--lr-find-steps only apply with --lr-find', file=sys.stderr)
        return 2
    if args.lr_find and (args.eval_only or args.check_data):
        print('error: --lr-find is a mode of its own: drop --eval-only and --check-data', file=sys.stderr)
        return 2
    if args.eval_only:
        return eval_only(args)
    cfg = compile_cfg(args)
    if cfg.data.type == 'image_folder' and not cfg.data.root:
        print('error: no data root: pass --data-root DIR (or set $IMAGENET_ROOT) with the layout '
              f'{EXPECTED_LAYOUT}, or run with --demo to train on bundled digits', file=sys.stderr)
        return 2
    if args.check_data:
        from dizoo_imgcls.data.check import check_data_folders
        return check_data_folders(cfg.data)
    try:
        if args.lr_find:
            find_lr(cfg, **lr_find_options)
        else:
            train(cfg)
    except KeyboardInterrupt:
        print(interrupted_message(cfg), file=sys.stderr)
        return 130
    except Terminated as e:  # every rank stops; one says where
        if e.rank == 0:
            print(f'{e}. Continue with: --resume {e.checkpoint}', file=sys.stderr)
        return EXIT_SIGTERM
    except TrainingDiverged as e:
        advice = 'with the same settings it will likely diverge again: lower policy.learn.lr_per_256, or set ' \
                 'policy.learn.grad_clip_norm'
        hint = resume_hint()
        print(f'error: {e}; nothing was saved from this state\n'
              + (f'{hint} ({advice})' if '--resume' in hint else f'{hint}; {advice}'), file=sys.stderr)
        return EXIT_DIVERGED
    except DiskWriteError as e:  # the checkpoints are written to a temporary file and renamed: none is partial
        print(f'error: {e}\n{resume_hint()} once there is space', file=sys.stderr)
        return e.exit_code
    except DataLayoutError as e:
        print(f'error: {e}. Pass --data-root DIR, or run with --demo to train on bundled digits', file=sys.stderr)
        return e.exit_code
    return 0


def newest_checkpoint():
    """(experiment folder, its newest complete and loadable checkpoint or None); (None, None) before a run."""
    from dizoo_imgcls.checkpoint import resumable_checkpoint
    from dizoo_imgcls.runtime import current_experiment_dir

    exp_dir = current_experiment_dir()
    if exp_dir is None:
        return None, None
    return exp_dir, resumable_checkpoint(os.path.join(exp_dir, 'ckpt'))[0]


def resume_hint() -> str:
    exp_dir, newest = newest_checkpoint()
    if newest is None:
        return f'no checkpoint was written before it: nothing to resume{f" in {exp_dir}" if exp_dir else ""}'
    return f'the newest complete checkpoint is {newest}; continue with: --resume {newest}'


def interrupted_message(cfg) -> str:
    """What to do after Ctrl-C: checkpoints are written atomically, so the newest complete one is safe."""
    exp_dir, newest = newest_checkpoint()
    if exp_dir is None:
        return 'interrupted before the run started; nothing was trained'
    if newest is None:
        return f'interrupted before the first checkpoint; nothing to resume in {exp_dir}'
    return f'interrupted; the newest checkpoint is {newest}. Continue with: --resume {newest}'


def eval_only(args: argparse.Namespace) -> int:
    from dizoo_imgcls.evaluate import evaluate_checkpoint

    if not args.resume or args.resume == 'auto' or not args.data_root:
        print('error: --eval-only needs --resume CHECKPOINT and --data-root DIR', file=sys.stderr)
        return 2
    ignored = [flag for flag, given in (('--config', args.config), ('--exp-name', args.exp_name),
                                        ('--seed', args.seed is not None), ('--demo', args.demo),
                                        ('--check-data', args.check_data)) if given]
    if ignored:  # the settings come from the checkpoint; silently dropping these would mislead
        print(f"error: --eval-only takes its settings from the checkpoint: drop {', '.join(ignored)} "
              '(data.* and policy.eval.* keys can still be changed with --set)', file=sys.stderr)
        return 2
    evaluate_checkpoint(args.resume, args.data_root, args.overrides)
    return 0


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(HERE))
    sys.exit(main())
