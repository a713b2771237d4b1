"""dizoo_imgcls: supervised image classification as a DI-engine plugin."""
from ._quiet import quiet_ding_import

quiet_ding_import()

from .data import DistributedSampler, build_loaders  # noqa: E402
from .metric import ImageClassificationMetric  # noqa: E402
from .model import create_model  # noqa: E402
from .policy import ImageClassificationPolicy  # noqa: E402
from .hooks import TrainLoggerHook  # noqa: E402

__all__ = ['DistributedSampler', 'ImageClassificationMetric', 'ImageClassificationPolicy', 'TrainLoggerHook',
           'build_loaders', 'create_model']
