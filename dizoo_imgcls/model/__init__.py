from .factory import (IMAGENET_MEAN, IMAGENET_STD, MODEL_REGISTRY, ImageClassifier, InputNormalize,
                      available_models, build_model_from_cfg, create_model, msra_init_)
