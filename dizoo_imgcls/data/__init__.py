from .folder import EXPECTED_LAYOUT, DataLayoutError, ImageFolderSplit, class_index, load_rgb
from .loader import (DATA_CONFIG, DATA_REGISTRY, ClassificationData, EvalEvent, build_datasets, build_loaders,
                     default_num_workers, wrap_loaders)
from .sampler import DistributedSampler, TrainBatchSampler
from .transforms import EvalPreset, TrainPreset
