"""Export a trained checkpoint to TorchScript or ONNX, with a dynamic batch dimension.

    python entry/export.py --checkpoint experiments/digits_demo/ckpt/ckpt_best.pth.tar --format onnx \\
        --output digits.onnx

Input contract of the exported model (the same as the PyTorch model's):
  images  NCHW, RGB, pixel values 0..255, dtype uint8 (or float32 with --input-dtype float32),
          any batch size, H = W = S, the checkpoint's data.eval_image_size if its run set one, else its
          data.image_size. Prepare them like validation: resize the shorter side to S / eval_crop_ratio
          (bilinear, antialiased), center-crop to S.
          Do NOT normalize: (x / 255 - mean) / std happens inside the model.
  logits  (batch, num_classes) float32 scores; softmax gives probabilities.
OUTPUT.json records this contract: class names, input size and dtype, resize/crop sizes, mean/std.

The export is run on a batch of another size than the traced one and compared with PyTorch (fp32, eval
mode); the max abs logit difference is printed. Exit status: 0 when it is below 1e-4; 1 when it is not
(the file is removed) or the runtime is missing; 2 for a bad checkpoint, or an --output that is the
checkpoint itself (also through a link or another spelling of its path). ONNX needs onnx, onnxscript and
onnxruntime. PyTorch deprecates TorchScript; prefer ONNX for new deployments.
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', required=True, help='a dizoo_imgcls checkpoint (.pth.tar)')
    parser.add_argument('--format', required=True, choices=('torchscript', 'onnx'), help='export format')
    parser.add_argument('--output', required=True, help='exported model file; OUTPUT.json is written beside it')
    parser.add_argument('--weights', choices=('model', 'ema'), default='model',
                        help="the trained weights, or their moving average when the run kept one (default: model)")
    parser.add_argument('--input-dtype', choices=('uint8', 'float32'), default='uint8',
                        help='dtype of the exported input, values 0..255 either way (default: uint8)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dizoo_imgcls.errors import report_user_errors
    return report_user_errors(run, args)


def run(args: argparse.Namespace) -> int:
    """The command; a ``UserError`` it raises is reported by ``main`` as one line (``ExportError``: exit 1)."""
    from dizoo_imgcls.export import TRACE_BATCH, VERIFY_BATCH, export_model, refuse_overwriting_input
    from dizoo_imgcls.checkpoint import load_model_from_checkpoint

    refuse_overwriting_input(args.output, args.checkpoint)
    model, config, class_names = load_model_from_checkpoint(args.checkpoint, args.weights)
    try:
        meta = export_model(model, config, class_names, args.format, args.output, args.input_dtype)
    except ImportError as e:
        print(f'error: {args.format} export needs a package that is not installed ({e}); '
              f'pip install onnx onnxscript onnxruntime', file=sys.stderr)
        return 1
    except OSError as e:  # the file cannot be written (disk full, no permission)
        print(f'error: {e}', file=sys.stderr)
        return 1
    diff = meta['verification']['max_abs_diff_vs_pytorch_fp32']
    print(f'max abs logit difference vs PyTorch fp32 on a batch of {VERIFY_BATCH} '
          f'(traced with {TRACE_BATCH}): {diff:.3g}')
    print(f'wrote {args.output} and {args.output}.json')
    return 0


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(HERE))
    sys.exit(main())
