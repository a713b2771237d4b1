"""The --demo run: ResNet-18 on scikit-learn's handwritten digits (8 x 8 px, shipped with scikit-learn, written once
as a 32 px ImageFolder cache by ``dizoo_imgcls.demo.prepare_digits``). ``python entry/imagenet_res18_main.py --demo``
reads this file; ``--set`` overrides apply as with any config."""
from easydict import EasyDict

digits_demo_config = dict(
    exp_name='digits_demo',
    data=dict(
        image_size=32,  # dizoo_imgcls.demo.DIGITS_IMAGE_PX: the cached images are already this size
        # Mild crops only: a digit cropped to a corner is no longer that digit.
        train_crop_scale=[0.6, 1.0],
        # A mirrored 2 or 7 is not a 2 or 7.
        hflip=False,
        # The images are already the size of the crop.
        eval_crop_ratio=1.0,
    ),
    policy=dict(
        model=dict(name='resnet18'),
        learn=dict(
            batch_size=64,
            train_epoch=12,
            lr_per_256=0.8,
            nesterov=True,
            weight_decay=5e-5,
            lr_schedule='onecycle',
            warmup_epochs=2,
            label_smoothing=0.1,
        ),
        eval=dict(batch_size=256),
    ),
    log_every=10,
)
main_config = EasyDict(digits_demo_config)
