"""InferenceRunner: the one path from an image batch to logits (training eval, --eval-only, predict, label issues)."""
import torch

from dizoo_imgcls.inference import InferenceRunner
from dizoo_imgcls.model import create_model


def images(n=4, side=32, seed=0):
    return torch.randint(0, 256, (n, 3, side, side), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_float32_runner_gives_the_bare_models_logits_and_top_probabilities():
    torch.manual_seed(0)
    model = create_model('resnet18', 5).eval()
    batch = images()
    with torch.no_grad():
        expected = model(batch).float()
    model.train()  # the runner puts it in eval mode itself
    out = InferenceRunner(model)(batch)
    assert set(out) == {'logit'} and out['logit'].dtype == torch.float32 and out['logit'].device.type == 'cpu'
    assert torch.equal(out['logit'], expected) and not model.training
    probs, classes = InferenceRunner(model).top_probabilities(batch, topk=3)
    by_hand = torch.softmax(expected, dim=1).topk(3, dim=1)
    assert torch.equal(classes, by_hand.indices) and torch.allclose(probs, by_hand.values)
    assert InferenceRunner(model).top_probabilities(batch, topk=50)[0].shape == (4, 5)  # k clamped to the classes


def test_channels_last_and_bf16_autocast_change_the_memory_or_precision_not_the_answer():
    torch.manual_seed(0)
    model = create_model('resnet18', 5)
    batch = images()
    plain = InferenceRunner(model)(batch)['logit']
    seen = []
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    last = InferenceRunner(model, channels_last=True)(batch)['logit']
    assert seen[-1].is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(last, plain, atol=1e-4)
    bf16 = InferenceRunner(model, amp_dtype=torch.bfloat16)(batch)['logit']
    assert bf16.dtype == torch.float32  # computed in bf16, returned as float32
    assert torch.allclose(bf16, plain, atol=0.1 * plain.abs().max().item())


def test_tta_and_weight_average_outputs_and_tta_switched_off_per_call():
    torch.manual_seed(0)
    trained, average = create_model('resnet18', 3), create_model('resnet18', 3)
    runner = InferenceRunner({'': trained, 'ema': average}, tta_flip=True)
    batch = images(2)
    out = runner(batch)
    assert set(out) == {'logit', 'logit_tta', 'logit_ema', 'logit_ema_tta'}
    flipped = InferenceRunner(trained)(batch.flip(-1))['logit']
    by_hand = (torch.softmax(out['logit'], 1) + torch.softmax(flipped, 1)) / 2  # mean of the two views' softmax
    assert torch.allclose(out['logit_tta'].exp(), by_hand, atol=1e-6)
    assert set(runner(batch, tta=False)) == {'logit', 'logit_ema'}
    probs, _ = runner.top_probabilities(batch, topk=1, key='logit_tta')
    assert torch.allclose(probs[:, 0], by_hand.max(dim=1).values, atol=1e-6)
