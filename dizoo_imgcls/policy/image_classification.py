import math
import time
from contextlib import nullcontext
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from ding.policy import Policy
from ding.utils import POLICY_REGISTRY

from ..errors import SettingError
from ..model import build_model_from_cfg, classifier_head_prefix
from ..inference import InferenceRunner
from .recipe import BatchMixer, ExponentialMovingAverage, soft_target_accuracy
from .optim import (build_lr_scheduler, build_optimizer, optimizer_options, param_groups_no_bn_bias_decay,
                    scaled_lr)

AMP_MODES = ('auto', 'bf16', 'fp16', 'none')


def resolve_amp_dtype(amp: str, device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype for ``amp`` on this device, or None for full fp32."""
    if amp not in AMP_MODES:
        raise SettingError(f"policy.learn.amp must be one of {AMP_MODES}, got '{amp}'")
    if amp == 'none':
        return None
    if device_type == 'cuda':
        if amp == 'auto':
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if amp == 'bf16' else torch.float16
    if amp == 'fp16':
        raise SettingError("policy.learn.amp='fp16' needs a GPU; use 'bf16' or 'none' on CPU")
    if amp == 'auto':
        # bf16 autocast only pays off on CPUs with native bf16 dot products (AVX512-BF16 or AMX).
        fast_bf16 = getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)() or \
            getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)()
        return torch.bfloat16 if fast_bf16 else None
    return torch.bfloat16


@POLICY_REGISTRY.register('image_classification')
class ImageClassificationPolicy(Policy):
    """Supervised image classification: SGD with momentum, warmup + per-iteration LR schedule, mixed precision.

    Learn-mode input is ``[images, targets]`` (uint8 NCHW images; the model normalizes them), eval-mode
    input is an image batch and the output ``{'logit': float32 logits on the CPU}``, plus the TTA and EMA
    variants when they are on (see ``_forward_eval``).
    """
    config = dict(
        # (str) Registered name of this policy in DI-engine's POLICY_REGISTRY.
        type='image_classification',
        # (list) Modules DI-engine's create_policy imports first: the one that registers `type`.
        import_names=['dizoo_imgcls.policy.image_classification'],
        # (bool) Train on a GPU when one is available; CPU otherwise.
        cuda=True,
        # (bool) DI-engine's own gradient all-reduce. Must stay False (True is refused): this policy uses
        # DistributedDataParallel, recorded in learn.multi_gpu.
        multi_gpu=False,
        # (bool) Supervised learning has no notion of on/off-policy; kept for DI-engine's Policy contract.
        on_policy=False,
        model=dict(
            # (str) Model name: torchvision's resnet18, resnet34, resnet50, ... (dizoo_imgcls.model.MODEL_REGISTRY), or
            # timm/<arch> for any architecture timm.create_model builds (timm/resnet18d, timm/seresnext26d_32x4d).
            name='resnet18',
            # (int) Number of classes; None takes it from the training folder.
            num_classes=None,
            # (bool) Start the last BN of each residual block at zero, so every block begins as identity.
            zero_init_residual=True,
            # (bool) Anti-aliasing: torchvision ResNets low-pass filter (BlurPool) before every strided convolution
            # past the stem; timm models get timm's aa_layer (blur-pooled strided convs and a MaxBlurPool stem).
            blur_pool=False,
            # (str) Activation; None: the model's own (ResNets: 'relu'; coord_mlp: 'cos'). ResNets also take 'silu'
            # or 'mish' in place of every ReLU (timm models: any act_layer name); coord_mlp 'relu', 'tanh' or 'cos'.
            activation=None,
            # (dict) Further keyword arguments for this model's builder, e.g. for timm models
            # dict(block_args=dict(attn_layer='se'), drop_path_rate=0.05), passed to timm.create_model as they are;
            # for timm's ResNets also self_attention=True (fastai's simple self-attention in the first stage).
            extra=dict(),
            # (str) Initial weights: one of our checkpoints or a torchvision state-dict file on disk (nothing is
            # downloaded). A classifier head of another size is replaced by a fresh one for num_classes.
            pretrained=None,
        ),
        learn=dict(
            # (bool) DistributedDataParallel. Not a setting: the run sets it, True when torchrun starts more than
            # one process; a value given here is replaced.
            multi_gpu=False,
            # (int) Images per step on each rank; the global batch is batch_size x world size.
            batch_size=256,
            # (int) Number of epochs to train.
            train_epoch=90,
            # (int) Iterations per epoch; filled in by the entry from the data loader, not set by hand.
            iters_per_epoch=None,
            # (float) Peak learning rate per 256 images: lr = lr_per_256 x global batch / 256.
            lr_per_256=0.1,
            # (str) Optimizer: 'sgd' (with momentum; the ImageNet standard), 'adam', 'adamw', 'radam' (torch's
            # RAdam with decoupled weight decay) or 'lamb' (timm's LAMB). 'radam' + lookahead is fastai's Ranger.
            optimizer='sgd',
            # (float) SGD momentum.
            momentum=0.9,
            # (bool) Nesterov momentum.
            nesterov=False,
            # (list) Adam/AdamW/RAdam/LAMB betas (fastai's Ranger: [0.9, 0.99]).
            adam_betas=[0.9, 0.999],
            # (float) Adam/AdamW/RAdam/LAMB epsilon (fastai's Ranger: 1e-6).
            adam_eps=1e-8,
            # (dict) Lookahead (Zhang et al. 2019, timm.optim.Lookahead) around the optimizer: every k steps the
            # weights move alpha of the way from their slow copy to the fast ones and restart from there.
            lookahead=dict(enabled=False, k=6, alpha=0.5),
            # (float) Weight decay on conv and linear weights; never on BN parameters or biases. L2 for SGD/Adam,
            # decoupled (x LR, as AdamW and fastai's true_wd) for adamw, radam and lamb.
            weight_decay=1e-4,
            # (str) LR schedule after warmup, stepped every iteration: 'cosine', 'flat_cos' (fastai's
            # fit_flat_cos: peak LR until flat_fraction of the run, then cosine), 'step' or 'onecycle'.
            lr_schedule='cosine',
            # (float) 'flat_cos': the share of all iterations (warmup included) before the cosine decay starts.
            flat_fraction=0.75,
            # (float) Length of the linear LR warmup, in epochs (fractions allowed).
            warmup_epochs=5,
            # (float) LR at the start of warmup, as a fraction of the peak LR.
            warmup_start_factor=0.01,
            # (float) LR at the end of the 'cosine' or 'onecycle' schedule, as a fraction of the peak LR.
            final_lr_factor=0.0,
            # (list) 'step' schedule: epochs after which the LR is multiplied by lr_step_gamma.
            lr_step_epochs=[30, 60, 80],
            # (float) 'step' schedule: LR multiplier at each of lr_step_epochs.
            lr_step_gamma=0.1,
            # (bool) Multi-GPU: SyncBatchNorm (batch statistics over the global batch); CUDA only.
            sync_bn=False,
            # (bool) Keep BatchNorm layers in eval mode while training (running statistics frozen), e.g. for
            # fine-tuning with small batches.
            bn_eval=False,
            # (int) Fine-tuning: epochs at the start during which only the classifier head is trained.
            freeze_backbone_epochs=0,
            # (float) Fine-tuning: LR of all layers but the classifier head, as a fraction of the LR.
            backbone_lr_factor=1.0,
            # (float) Label smoothing of the training cross-entropy (0 = none).
            label_smoothing=0.0,
            # (dict) Mixup / CutMix (torchvision transforms.v2) on each training batch, on the device. A batch is
            # mixed with probability prob, by CutMix with probability switch_prob, else by Mixup; an alpha of 0
            # disables that kind. Only epochs 1..stop_epoch are mixed (None: all), so the last ones see clean
            # images. Both off by default: they pay off in long schedules.
            mix=dict(mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5, stop_epoch=None),
            # (dict) Exponential moving average of the weights (and BN statistics), evaluated alongside the model
            # (eval/acc1_ema) and checkpointed. The decay ramps up as min(decay, (1 + n) / (10 + n)) at update n.
            ema=dict(enabled=False, decay=0.999, every_n_iters=1),
            # (str) Mixed precision: 'auto' (bf16 where the hardware runs it fast, fp16 on older GPUs),
            # 'bf16', 'fp16' (GPU only, with a gradient scaler) or 'none'.
            amp='auto',
            # (bool) channels_last memory format: faster convolutions with bf16/fp16 on CPU and GPU.
            channels_last=True,
            # (float) Clip the global gradient norm to this value; None only measures it.
            grad_clip_norm=None,
            # (bool) torch.compile the training model (a win on GPUs; measured as no win on CPU).
            compile=False,
            # (bool) GPU: let cuDNN pick the fastest convolution algorithms (off when `deterministic` is set).
            cudnn_benchmark=True,
            # (dict) DI-engine BaseLearner settings (hooks); the entry adds its own logging hook.
            learner=dict(log_policy=False),
        ),
        eval=dict(
            # (int) Images per eval batch on each rank.
            batch_size=256,
            # (str) Metric that decides the best checkpoint and the stop condition: acc1, acc5 or loss, or a
            # variant's: acc1_tta, acc1_ema, acc1_ema_tta.
            metric_key='acc1',
            # (dict) Test-time augmentation, reported separately (eval/acc1_tta) next to the plain eval/acc1:
            # softmax averaged over the image, its mirror image (flip) and the image rescaled by each of
            # scales (e.g. [1.15]: about 15% larger, on the device). every_eval False: only in the run's last
            # evaluation (TTA multiplies eval compute by the number of views).
            tta=dict(flip=False, scales=[], every_eval=False),
            # (dict) DI-engine MetricSerialEvaluator settings. stop_value None: never stop early.
            evaluator=dict(stop_value=None, multi_gpu=False),
        ),
        collect=dict(),
    )

    def _create_model(self, cfg, model: Optional[nn.Module] = None) -> nn.Module:
        if model is None:
            if cfg.model.num_classes is None:
                raise ValueError('policy.model.num_classes is not set (the entry fills it in from the data)')
            model = build_model_from_cfg(cfg.model)
        if cfg.learn.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _set_device(self) -> None:
        # The base class picks cuda:rank; under torchrun the entry has already selected the local GPU.
        if self._cuda:
            self._device = f'cuda:{torch.cuda.current_device()}'
        self._amp_dtype = resolve_amp_dtype(self._cfg.learn.amp, 'cuda' if self._cuda else 'cpu')

    def _autocast(self):
        if self._amp_dtype is None:
            return nullcontext()
        return torch.autocast('cuda' if self._cuda else 'cpu', dtype=self._amp_dtype)

    def _to_input(self, img: torch.Tensor) -> torch.Tensor:
        img = img.to(self._device, non_blocking=True)
        if self._cfg.learn.channels_last:  # image data only (config.prepare_config)
            img = img.contiguous(memory_format=torch.channels_last)
        return img

    def _init_learn(self) -> None:
        self._set_device()
        cfg = self._cfg.learn
        if cfg.iters_per_epoch is None:
            raise ValueError('policy.learn.iters_per_epoch is not set (the entry fills it in from the loader)')
        self._world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self._global_batch = cfg.batch_size * self._world_size
        self._peak_lr = scaled_lr(cfg.lr_per_256, self._global_batch)
        self._head_prefix = classifier_head_prefix(self._model)
        groups = param_groups_no_bn_bias_decay(self._model, cfg.weight_decay, self._peak_lr, self._head_prefix,
                                               cfg.backbone_lr_factor)
        self._optimizer = build_optimizer(cfg.optimizer, groups, self._peak_lr, **optimizer_options(cfg))
        self._lr_scheduler = build_lr_scheduler(
            self._optimizer,
            cfg.lr_schedule,
            total_iters=cfg.train_epoch * cfg.iters_per_epoch,
            warmup_iters=round(cfg.warmup_epochs * cfg.iters_per_epoch),
            warmup_start_factor=cfg.warmup_start_factor,
            final_lr_factor=cfg.final_lr_factor,
            step_milestones=[e * cfg.iters_per_epoch for e in cfg.lr_step_epochs],
            step_gamma=cfg.lr_step_gamma,
            flat_fraction=cfg.flat_fraction,
        )
        self._scaler = torch.amp.GradScaler('cuda') if self._amp_dtype == torch.float16 else None
        self._criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self._mixer = BatchMixer(self._cfg.model.num_classes, **cfg.mix)
        self._ema = ExponentialMovingAverage(self._model, cfg.ema.decay) if cfg.ema.enabled else None
        self._learn_model = self._model
        if cfg.sync_bn and self._world_size > 1:
            if not self._cuda:
                raise SettingError('policy.learn.sync_bn=True needs GPUs: torch SyncBatchNorm does not run on CPU')
            self._model = self._learn_model = nn.SyncBatchNorm.convert_sync_batchnorm(self._model)
        if cfg.multi_gpu and self._world_size > 1:
            device_ids = [torch.cuda.current_device()] if self._cuda else None
            # A frozen backbone (fine-tuning) produces no gradients for most parameters for a while.
            self._learn_model = nn.parallel.DistributedDataParallel(
                self._model, device_ids=device_ids, find_unused_parameters=cfg.freeze_backbone_epochs > 0)
        if cfg.compile:
            self._learn_model = torch.compile(self._learn_model)
        self._epoch = 0
        self._iteration = 0
        self._backbone_frozen = False

    def describe_compute(self) -> str:
        """What the training step runs on, for the run's first log lines: e.g. 'cuda:0 (NVIDIA H100 80GB HBM3),
        bf16 autocast, channels_last, DDP over 8 processes (nccl), SyncBatchNorm'."""
        device = str(self._device)
        if self._cuda:
            device += f' ({torch.cuda.get_device_name()})'
        else:
            device += f' ({torch.get_num_threads()} threads)'
        cfg = self._cfg.learn
        parts = [device, f'{str(self._amp_dtype).replace("torch.", "")} autocast' if self._amp_dtype else 'fp32']
        if self._scaler is not None:
            parts[-1] += ' + gradient scaler'
        if cfg.channels_last:
            parts.append('channels_last')
        if self._world_size > 1:
            parts.append(f'DDP over {self._world_size} processes ({dist.get_backend()})' if cfg.multi_gpu
                         else f'{self._world_size} processes without DDP')
        if cfg.sync_bn and self._world_size > 1:
            parts.append('SyncBatchNorm')
        if cfg.compile:
            parts.append('torch.compile')
        return ', '.join(parts)

    def _set_train_mode(self) -> None:
        self._learn_model.train()
        if self._cfg.learn.bn_eval:
            for module in self._model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def _freeze_backbone(self, frozen: bool) -> None:
        """Fine-tuning: train only the classifier head for the first ``freeze_backbone_epochs`` epochs."""
        if frozen == self._backbone_frozen:
            return
        for name, param in self._model.named_parameters():
            if not name.startswith(self._head_prefix):
                param.requires_grad_(not frozen)
        self._backbone_frozen = frozen

    def _forward_learn(self, data: List[torch.Tensor]) -> Dict[str, Any]:
        start = time.perf_counter()
        self._freeze_backbone(self._epoch < self._cfg.learn.freeze_backbone_epochs)
        img, target = self._to_input(data[0]), data[1].to(self._device, non_blocking=True)
        img, target = self._mixer(img, target, self._epoch + 1)
        if self._cfg.learn.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        self._set_train_mode()
        with self._autocast():
            logits = self._learn_model(img)
        loss = self._criterion(logits.float(), target)
        self._optimizer.zero_grad(set_to_none=True)
        grad_norm = self._backward_and_step(loss)
        lr = max(group['lr'] for group in self._optimizer.param_groups)  # the head's LR when fine-tuning
        self._lr_scheduler.step()
        self._iteration += 1
        if self._ema is not None and self._iteration % self._cfg.learn.ema.every_n_iters == 0:
            self._ema.update_parameters(self._model)
        acc1 = soft_target_accuracy(logits, target)
        out = {
            'loss': loss.item(),  # .item() waits for the GPU, so step_time below is real
            'lr': lr,
            'acc1': 100.0 * acc1.item(),
            'grad_norm': grad_norm,
            'batch_size': int(img.shape[0]),  # images, also when Mixup/CutMix made the targets soft
        }
        out['step_time'] = time.perf_counter() - start
        return out

    def _backward_and_step(self, loss: torch.Tensor) -> float:
        params = [p for p in self._model.parameters() if p.requires_grad]
        clip = self._cfg.learn.grad_clip_norm
        if self._scaler is not None:
            self._scaler.scale(loss).backward()
            self._scaler.unscale_(self._optimizer)
        else:
            loss.backward()
        if clip is None:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if self._scaler is not None:
            self._scaler.step(self._optimizer)  # skips the step when fp16 gradients overflowed
            self._scaler.update()
        else:
            self._optimizer.step()
        grad_norm = grad_norm.item()
        return grad_norm if math.isfinite(grad_norm) else float('nan')

    def _monitor_vars_learn(self) -> List[str]:
        return ['loss', 'lr', 'acc1', 'grad_norm', 'step_time']

    def _state_dict_learn(self) -> Dict[str, Any]:
        state = {
            'model': self._model.state_dict(),
            'optimizer': self._optimizer.state_dict(),
            'lr_scheduler': self._lr_scheduler.state_dict(),
            'epoch': self._epoch,
            'iteration': self._iteration,
        }
        if self._scaler is not None:
            state['grad_scaler'] = self._scaler.state_dict()
        if self._ema is not None:
            state['ema'] = self._ema.state_dict()
        return state

    def _load_state_dict_learn(self, state_dict: Dict[str, Any]) -> None:
        self._model.load_state_dict(state_dict['model'])
        self._optimizer.load_state_dict(state_dict['optimizer'])
        self._lr_scheduler.load_state_dict(state_dict['lr_scheduler'])
        if self._scaler is not None and 'grad_scaler' in state_dict:
            self._scaler.load_state_dict(state_dict['grad_scaler'])
        if self._ema is not None:
            if 'ema' not in state_dict:
                raise SettingError('the checkpoint has no EMA weights but policy.learn.ema.enabled=True; resume with '
                                   'the setting it was trained with')
            self._ema.load_state_dict(state_dict['ema'])
        self._epoch = state_dict['epoch']
        self._iteration = state_dict['iteration']

    def set_epoch(self, epochs_done: int) -> None:
        """The run's epochs completed: the Mixup/CutMix schedule and a frozen backbone's last epoch follow it."""
        self._epoch = epochs_done

    def set_tta(self, active: bool) -> None:
        """Whether the next evaluations add the test-time augmentation variants (``policy.eval.tta``)."""
        self._tta_active = active

    def _init_eval(self) -> None:
        self._set_device()
        self._eval_model = self._model  # DI-engine's name for it (get_attribute('eval_model'))
        models = {'': self._eval_model}
        ema = getattr(self, '_ema', None)  # learn mode's EMA, when this policy also trains
        if ema is not None:
            models['ema'] = ema.module
        tta = self._cfg.eval.tta
        self._runner = InferenceRunner(models, self._device, self._amp_dtype, self._cfg.learn.channels_last,
                                       tta.flip, tta.scales)
        # The training run switches TTA off for intermediate evaluations unless tta.every_eval is set.
        self._tta_active = True

    def _forward_eval(self, data: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{'logit': logits}`` (float32, CPU), plus ``logit_tta`` with test-time augmentation and
        ``logit_ema`` / ``logit_ema_tta`` for the weight average when there is one."""
        return self._runner(data, tta=self._tta_active)

    def _state_dict_eval(self) -> Dict[str, Any]:
        return {'model': self._model.state_dict()}

    def _load_state_dict_eval(self, state_dict: Dict[str, Any]) -> None:
        self._model.load_state_dict(state_dict['model'])

    # Supervised learning collects no data: collect mode exists only to honour the Policy interface.
    def _init_collect(self) -> None:
        raise NotImplementedError('ImageClassificationPolicy has no collect mode; create it with '
                                  "enable_field=['learn', 'eval']")

    def _forward_collect(self, data: Dict[int, Any], **kwargs) -> Dict[int, Any]:
        raise NotImplementedError('ImageClassificationPolicy has no collect mode')

    def _process_transition(self, obs: Any, policy_output: Dict[str, torch.Tensor], timestep: Any) -> Dict[str, Any]:
        raise NotImplementedError('ImageClassificationPolicy has no collect mode')

    def _get_train_sample(self, transitions: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        raise NotImplementedError('ImageClassificationPolicy has no collect mode')
