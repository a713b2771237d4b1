"""Export a checkpoint's model to TorchScript or ONNX, with a dynamic batch dimension, and verify it.

The exported model keeps the PyTorch model's input contract: NCHW RGB pixels in 0..255 (uint8 by default),
normalized inside the model, after the checkpoint's eval resize + center crop. ``FILE.json`` beside the
exported file records that contract, the class names and the measured difference from PyTorch.
"""
import importlib
import json
import os
import warnings
from typing import Any, Dict, List

import torch
import torch.nn as nn

from .data.folder import same_file
from .data.transforms import eval_image_size, eval_resize_size
from .errors import SettingError, UserError
from .model import InputNormalize

EXPORT_FORMATS = ('torchscript', 'onnx')
INPUT_DTYPES = {'uint8': torch.uint8, 'float32': torch.float32}
TRACE_BATCH = 2
VERIFY_BATCH = 3  # differs from TRACE_BATCH, so verification proves the batch dimension is dynamic
MAX_ABS_DIFF = 1e-4  # on logits, exported vs PyTorch fp32 eval mode
SIDECAR_VERSION = 'dizoo_imgcls.export/1'


class OverwritesInputError(UserError, ValueError):
    """The export would be written over the file it is made from."""


class ExportError(UserError, ValueError):
    """The export cannot be written, or what was written does not reproduce the model; nothing replaced --output.
    Exit status 1, not 2: the checkpoint and the options were accepted, the export itself failed."""

    exit_code = 1


def refuse_overwriting_input(output: str, checkpoint: str) -> None:
    """``output`` and its sidecar ``output.json`` must not be the checkpoint, however spelled or linked."""
    for written in (output, output + '.json'):
        if same_file(written, checkpoint):
            raise OverwritesInputError(f'--output {output} would write {written}, which is the checkpoint '
                                       f'{checkpoint}: the export would replace it; choose another --output')


def sample_batch(batch_size: int, image_size: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random pixels in 0..255, NCHW, in the dtype the exported model takes."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch_size, 3, image_size, image_size), generator=generator)
    return pixels.to(dtype)


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """Trace ``model`` (no shape-dependent control flow in our models, so the trace holds for any batch)."""
    with warnings.catch_warnings():
        # PyTorch marks torch.jit deprecated; the user chose TorchScript, the console needs no repeat of it.
        warnings.filterwarnings('ignore', message=r'`torch\.jit\..*` is deprecated')
        traced = torch.jit.trace(model, example, check_trace=False)  # checked by verify_export instead
        traced.save(path)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """torch.export-based ONNX export (PyTorch's default exporter; needs onnxscript), weights in one file."""
    batch = torch.export.Dim('batch')
    with warnings.catch_warnings():
        # Raised inside torch.export's own pytree code, about its own API: nothing a user can act on.
        warnings.filterwarnings('ignore', message=r'`isinstance\(treespec, LeafSpec\)` is deprecated')
        torch.onnx.export(model, (example,), path, dynamo=True, verbose=False, external_data=False,
                          input_names=['images'], output_names=['logits'], dynamic_shapes=({0: batch},))


def require_onnx_tools() -> None:
    """Raise ImportError before anything is written when the ONNX export or its check cannot run."""
    for name in ('onnxscript', 'onnxruntime'):  # torch.onnx's exporter; the verification runtime
        importlib.import_module(name)


def run_exported(fmt: str, path: str, images: torch.Tensor) -> torch.Tensor:
    """Logits of the exported file on ``images``, run by the runtime a deployment would use."""
    if fmt == 'torchscript':
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message=r'`torch\.jit\..*` is deprecated')
            loaded = torch.jit.load(path, map_location='cpu')
        with torch.inference_mode():
            return loaded(images).float()
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    (logits,) = session.run(['logits'], {'images': images.numpy()})
    return torch.from_numpy(logits)


def verify_export(model: nn.Module, fmt: str, path: str, images: torch.Tensor) -> float:
    """Max abs difference between the exported model's and ``model``'s (fp32, eval) logits on ``images``."""
    model = model.float().eval()
    with torch.inference_mode():
        expected = model(images)
    actual = run_exported(fmt, path, images)
    if actual.shape != expected.shape:
        raise ExportError(f'{path} returned logits of shape {tuple(actual.shape)}, expected {tuple(expected.shape)}')
    return (actual - expected).abs().max().item()


def input_normalization(model: nn.Module) -> Dict[str, List[float]]:
    """The mean/std the model applies to its 0..255 input, read back from its ``InputNormalize`` layer."""
    layers = [m for m in model.modules() if isinstance(m, InputNormalize)]
    if not layers:
        raise ValueError(f'{type(model).__name__} has no InputNormalize layer: its input contract is unknown')
    # forward computes x * scale + shift with scale = 1 / (255 std) and shift = -mean / std
    std = 1.0 / (255.0 * layers[0].scale.double().flatten())
    mean = -layers[0].shift.double().flatten() * std
    return {'mean': [round(v, 6) for v in mean.tolist()], 'std': [round(v, 6) for v in std.tolist()]}


def sidecar_metadata(model: nn.Module, config: Dict[str, Any], class_names: List[str], fmt: str, path: str,
                     input_dtype: str, max_abs_diff: float) -> Dict[str, Any]:
    """Everything deployment code needs to feed the exported model and read its output."""
    data = config['data']
    size = eval_image_size(data)
    norm = input_normalization(model)
    return {
        'format': SIDECAR_VERSION,
        'model_file': os.path.basename(path),
        'export_format': fmt,
        'architecture': config['policy']['model']['name'],
        'class_names': list(class_names),
        'input': {
            'name': 'images', 'shape': ['batch', 3, size, size], 'dtype': input_dtype, 'layout': 'NCHW',
            'channels': 'RGB', 'value_range': [0, 255],
        },
        'preprocessing': {
            'resize_shorter_side_px': eval_resize_size(size, data['eval_crop_ratio']),
            'resize_interpolation': 'bilinear, antialiased', 'center_crop_px': size,
            'normalization': 'inside the model: (x / 255 - mean) / std per channel; do not normalize yourself',
            'mean': norm['mean'], 'std': norm['std'],
        },
        'output': {'name': 'logits', 'shape': ['batch', len(class_names)], 'dtype': 'float32',
                   'meaning': 'unnormalized class scores in class_names order; softmax gives probabilities'},
        'verification': {'batch_size': VERIFY_BATCH, 'traced_batch_size': TRACE_BATCH,
                         'max_abs_diff_vs_pytorch_fp32': max_abs_diff, 'torch_version': torch.__version__},
    }


def export_model(model: nn.Module, config: Dict[str, Any], class_names: List[str], fmt: str, path: str,
                 input_dtype: str = 'uint8') -> Dict[str, Any]:
    """Export, verify on a batch of another size, write ``path + '.json'``; returns the sidecar dict.

    The model is written to a temporary file beside ``path`` and takes its name only once verified, so a
    failed export leaves an earlier good one (and its sidecar) as it was. An export whose logits differ from
    PyTorch by ``MAX_ABS_DIFF`` or more raises ``ExportError``, and so does an exporter failure: a file that
    does not reproduce the model must not be deployed."""
    if fmt not in EXPORT_FORMATS:
        raise SettingError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if input_dtype not in INPUT_DTYPES:
        raise SettingError(f"input dtype must be one of {', '.join(INPUT_DTYPES)}, got {input_dtype!r}")
    if fmt == 'onnx':
        require_onnx_tools()
    if os.path.isdir(path):
        raise ExportError(f'--output {path} is a folder; give the file to write, e.g. {os.path.join(path, "model")}'
                          f'{".onnx" if fmt == "onnx" else ".pt"}')
    model = model.float().eval().cpu()
    size, dtype = eval_image_size(config['data']), INPUT_DTYPES[input_dtype]
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:  # a parent that is a file, no permission
        raise ExportError(f'cannot create the folder of --output {path}: {e.strerror or e}') from None
    exporter = export_torchscript if fmt == 'torchscript' else export_onnx
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        try:
            exporter(model, sample_batch(TRACE_BATCH, size, dtype, seed=0), tmp)
        except Exception as e:  # torch.jit / torch.onnx raise many types; the message is what a user can act on
            raise ExportError(f'{fmt} export of {config["policy"]["model"]["name"]} failed: '
                              f'{type(e).__name__}: {e}') from e
        diff = verify_export(model, fmt, tmp, sample_batch(VERIFY_BATCH, size, dtype, seed=1))
        if not diff < MAX_ABS_DIFF:  # also catches NaN
            raise ExportError(f'{fmt} export differs from PyTorch by {diff:.3g} (max abs logit difference, limit '
                              f'{MAX_ABS_DIFF:g}); nothing was written to {path}')
        meta = sidecar_metadata(model, config, class_names, fmt, path, input_dtype, diff)
        with open(tmp + '.json', 'w') as f:
            json.dump(meta, f, indent=2)
            f.write('\n')
        os.replace(tmp, path)
        os.replace(tmp + '.json', path + '.json')
    finally:
        for leftover in (tmp, tmp + '.json'):
            if os.path.exists(leftover):
                os.remove(leftover)
    return meta
