"""ResNet-18 on Imagenette (10 ImageNet classes) at 128 px for 5 epochs: a laptop-sized run.

One-cycle LR with nesterov momentum and label smoothing converges far faster than the step schedule
in 5 epochs; bf16 autocast and channels_last come from the policy defaults (amp='auto')."""
from easydict import EasyDict

imagenette_res18_config = dict(
    exp_name='imagenette_res18',
    data=dict(
        root=None,  # --data-root DIR
        image_size=128,
        train_crop_scale=[0.35, 1.0],  # 10 classes and 5 epochs: the default 0.08 crops are too aggressive
    ),
    policy=dict(
        model=dict(name='resnet18'),
        learn=dict(
            batch_size=64,
            train_epoch=5,
            lr_per_256=2.0,
            nesterov=True,
            weight_decay=5e-5,
            lr_schedule='onecycle',
            warmup_epochs=1.25,
            label_smoothing=0.1,
        ),
        eval=dict(batch_size=128),
    ),
    log_every=20,
)
main_config = EasyDict(imagenette_res18_config)
