"""ResNet-18 on ImageNet-1k, the classic recipe (He et al. 2016 / Goyal et al. 2017): 90 epochs at 224 px,
SGD momentum 0.9, lr 0.1 per 256 images with 5 warmup epochs, step decay x0.1 at epochs 30/60/80,
weight decay 1e-4. Set the data root with --data-root DIR or the IMAGENET_ROOT environment variable."""
import os

from easydict import EasyDict

imagenet_res18_config = dict(
    exp_name='imagenet_res18',
    data=dict(
        root=os.environ.get('IMAGENET_ROOT'),
        image_size=224,
    ),
    policy=dict(
        model=dict(name='resnet18'),
        learn=dict(
            # 8 GPUs x 32 = 256 per step, the reference setting; scale freely, the LR follows.
            batch_size=32,
            train_epoch=90,
            lr_per_256=0.1,
            weight_decay=1e-4,
            lr_schedule='step',
            lr_step_epochs=[30, 60, 80],
            warmup_epochs=5,
        ),
        eval=dict(batch_size=128),
    ),
    log_every=100,
)
main_config = EasyDict(imagenet_res18_config)
