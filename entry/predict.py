"""Predict the classes of images with a trained checkpoint.

    python entry/predict.py --checkpoint experiments/digits_demo/ckpt/ckpt_best.pth.tar --input digit.png
    python entry/predict.py --checkpoint CKPT --input photos/ --topk 3 --format csv > predictions.csv

Images are read and transformed exactly as the validation images of the checkpoint's training run (RGB;
shorter side resized to S / data.eval_crop_ratio, center crop of S, where S is data.eval_image_size if the run
set one, else data.image_size). Folders are searched recursively for image files. A file that cannot be read is
reported on stderr and skipped.
Exit status: 2 for a bad checkpoint or option, or an --input that does not exist or is no regular file or
folder (the other inputs are still predicted, as `ls` does); else 0 when at least one image was predicted, 1 when
none could be. A file name with a newline or other control character is printed quoted and escaped (Python repr).
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text}')
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', required=True, help='a dizoo_imgcls checkpoint (.pth.tar)')
    parser.add_argument('--input', required=True, nargs='+', metavar='IMG_OR_DIR',
                        help='image files and/or folders (searched recursively)')
    parser.add_argument('--topk', type=_positive_int, default=5,
                        help='classes shown per image, most likely first (default: 5; at most the class count)')
    parser.add_argument('--format', choices=('table', 'json', 'csv'), default='table',
                        help='table (default): readable; json: one array, one image per line; '
                             'csv: path,rank,class_index,class_name,probability')
    parser.add_argument('--batch-size', type=_positive_int, default=32, help='images per forward pass (default: 32)')
    parser.add_argument('--workers', type=int, default=0,
                        help='processes decoding images (default: 0, decode in the main process)')
    parser.add_argument('--weights', choices=('model', 'ema'), default='model',
                        help="the trained weights, or their moving average when the run kept one (default: model)")
    parser.add_argument('--device', default=None, help='torch device (default: cuda when available, else cpu)')
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error(f'--workers must be >= 0, got {args.workers}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from dizoo_imgcls.errors import report_user_errors
    return report_user_errors(run, args)


def run(args: argparse.Namespace) -> int:
    """The command; a ``UserError`` it raises (a bad checkpoint, its data.decoder not installed here) is reported
    by ``main`` as one line."""
    import torch

    from dizoo_imgcls.checkpoint import load_model_from_checkpoint
    from dizoo_imgcls.inference import InferenceRunner
    from dizoo_imgcls.predict import EvalReader, find_images, predict_files, printable_path, write_predictions

    model, config, class_names = load_model_from_checkpoint(args.checkpoint, args.weights)
    reader = EvalReader(config['data'])
    try:
        device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        torch.empty(0, device=device)  # a device this machine does not have fails here, not mid-prediction
    except (RuntimeError, AssertionError) as e:  # AssertionError: a torch built without CUDA
        print(f'error: --device {args.device}: {str(e).splitlines()[0]}', file=sys.stderr)
        return 2
    # File names that are not valid UTF-8 (allowed on Linux, read fine by the data reader) are printed escaped
    # instead of ending the output at the first one.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, 'reconfigure'):
            stream.reconfigure(errors='backslashreplace')
    paths, problems = find_images(args.input)
    for path, reason in problems:
        print(f'skipped {printable_path(path)}: {reason}', file=sys.stderr)
    runner = InferenceRunner(model.to(device), device)  # float32, as the exported model computes
    predictions = predict_files(runner, reader, class_names, paths, topk=args.topk, batch_size=args.batch_size,
                                num_workers=args.workers)
    predicted, _ = write_predictions(predictions, args.format, sys.stdout, sys.stderr)
    # An input that is not there (or no file or folder at all) is a mistake on the command line: exit 2.
    bad_inputs = [path for path, _ in problems if not os.path.isdir(path)]
    if predicted == 0:
        print(f"error: no image could be predicted from {' '.join(map(printable_path, args.input))}",
              file=sys.stderr)
    if bad_inputs:
        return 2
    return 0 if predicted else 1


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(HERE))
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left early (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        status = 1
    sys.exit(status)
