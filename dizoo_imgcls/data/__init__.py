from .decode import EncodedImage, UnreadableImageError, read_image_file
from .folder import EXPECTED_LAYOUT, DataLayoutError, ImageFolderSplit, class_index, load_rgb
from .layouts import LabelFileError, find_display_names
from .loader import (DATA_CONFIG, DATA_REGISTRY, ClassificationData, DataCapabilities, PixelMap, build_datasets,
                     build_eval_data, build_loaders, collate_images, default_num_workers, shutdown_workers,
                     wrap_loaders)
from .sampler import DistributedSampler, TrainBatchSampler
from .transforms import EvalPreset, TrainPreset
from .overfit import OVERFIT_OPTIONS, PixelCoordinates, build_overfit_loaders, ink_mask
