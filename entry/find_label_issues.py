"""Find images whose folder (label) is likely wrong, ranked by cleanlab on out-of-sample predictions.

    python entry/find_label_issues.py --data-root DIR                      # 5-fold cross-training on DIR/train
    python entry/find_label_issues.py --data-root DIR --folds 3 --set policy.learn.train_epoch=3
    python entry/find_label_issues.py --data-root DIR --split val --checkpoint CKPT   # no training

Without --checkpoint, DIR/<split> is split into K stratified folds; for each fold a model is trained (the normal
training path, settings from --config and --set) on the other folds and predicts the held-out one. With
--checkpoint, the checkpoint predicts DIR/<split> directly: use a split it was NOT trained on, as a model
predicting its own training images mostly repeats the labels it memorized.

Writes OUT_DIR/label_issues.csv (every readable image, most likely mislabeled first: path, given and suggested
label, score = predicted probability of the given label, cleanlab's flag), OUT_DIR/label_issues.html (the top N with
thumbnails) and OUT_DIR/tb (a TensorBoard image grid); fold runs go to OUT_DIR/folds.
Exit status: 0 on success, 2 for a bad config, data folder or checkpoint.
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, '..', 'config', 'imagenette_res18_config.py')


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f'expected an integer >= {minimum}, got {text}')
        return value
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-root', required=True, help='folder with <split>/<class>/* (e.g. train/, val/)')
    parser.add_argument('--split', default='train', help='sub-folder whose labels are checked (default: train)')
    parser.add_argument('--checkpoint', default=None, help='predict with this checkpoint instead of cross-training')
    parser.add_argument('--folds', type=_int_at_least(2), default=5, help='cross-training folds, >= 2 (default: 5)')
    parser.add_argument('--config', default=DEFAULT_CONFIG,
                        help='training config of the folds (default: config/imagenette_res18_config.py)')
    parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                        help='override a config key of the fold trainings (repeatable)')
    parser.add_argument('--seed', type=int, default=None, help='seed of the fold split and the fold trainings')
    parser.add_argument('--out-dir', default=None,
                        help='where reports and fold runs go (default: OUTPUT_DIR/label_issues, OUTPUT_DIR '
                             'being the config\'s output_dir)')
    parser.add_argument('--top', type=_int_at_least(1), default=50,
                        help='images shown in the HTML page (default: 50; the CSV lists every readable image)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dizoo_imgcls.errors import report_user_errors
    return report_user_errors(run, args)


def run(args: argparse.Namespace) -> int:
    """The command; a ``UserError`` it raises (config, data folder, checkpoint) is reported by ``main`` as one
    line."""
    from dizoo_imgcls.config import build_config, load_config_file
    from dizoo_imgcls.label_issues import label_issues
    from dizoo_imgcls.label_issues_report import check_outputs, write_reports
    from dizoo_imgcls.runtime import setup_logging

    cfg = build_config(load_config_file(args.config), args.overrides, args.config)
    if cfg.data.type != 'image_folder':
        print(f"error: label issues need image folders (data.type 'image_folder'), the config {args.config} "
              f"sets data.type '{cfg.data.type}'", file=sys.stderr)
        return 2
    cfg.data.root = args.data_root
    if args.seed is not None:
        cfg.seed = args.seed
    out_dir = os.path.abspath(args.out_dir or os.path.join(cfg.output_dir, 'label_issues'))
    setup_logging(None)
    check_outputs(out_dir, args.data_root, args.split, args.checkpoint)
    issues = label_issues(cfg, out_dir, args.split, args.folds, args.checkpoint)
    source = os.path.join(args.data_root, args.split)
    csv_path, html_path, tb_dir = write_reports(out_dir, issues, args.top, source)
    flagged = sum(issue.flagged for issue in issues)
    print(f'{flagged} of {len(issues)} images of {source} flagged as likely mislabeled')
    print(f'ranking: {csv_path}\npage: {html_path}\nTensorBoard: tensorboard --logdir {tb_dir}')
    return 0


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(HERE))
    sys.exit(main())
