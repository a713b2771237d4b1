from .factory import (IMAGENET_MEAN, IMAGENET_STD, MODEL_REGISTRY, ImageClassifier, InputNormalize,
                      available_models, build_model_from_cfg, check_model_options, classifier_head_prefix,
                      create_model, load_pretrained, model_options, msra_init_)
from .mlp import CoordinateMLP, build_coord_mlp
