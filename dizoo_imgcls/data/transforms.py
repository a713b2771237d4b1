"""Transform presets. Each returns uint8 CHW tensors: normalization happens in the model, on the device."""
from typing import Sequence

from torchvision.transforms import v2


class TrainPreset:
    """RandomResizedCrop + optional horizontal flip."""

    def __init__(self, image_size: int, crop_scale: Sequence[float] = (0.08, 1.0), hflip: bool = True) -> None:
        steps = [v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True)]
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        steps.append(v2.PILToTensor())
        self.transform = v2.Compose(steps)

    def __call__(self, img):
        return self.transform(img)


class EvalPreset:
    """Resize the shorter side to ``image_size / crop_ratio``, then center-crop ``image_size``."""

    def __init__(self, image_size: int, crop_ratio: float = 0.875) -> None:
        self.resize_size = eval_resize_size(image_size, crop_ratio)
        self.transform = v2.Compose([
            v2.Resize(self.resize_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.PILToTensor(),
        ])

    def __call__(self, img):
        return self.transform(img)


def eval_resize_size(image_size: int, crop_ratio: float) -> int:
    if not 0 < crop_ratio <= 1:
        raise ValueError(f'data.eval_crop_ratio must be in (0, 1], got {crop_ratio}')
    return int(round(image_size / crop_ratio))
