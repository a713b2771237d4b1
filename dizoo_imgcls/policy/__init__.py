from .image_classification import AMP_MODES, ImageClassificationPolicy, resolve_amp_dtype
from .optim import (LR_SCHEDULES, OPTIMIZERS, build_lr_scheduler, build_optimizer, lr_schedule_curve,
                    param_groups_no_bn_bias_decay, scaled_lr)
