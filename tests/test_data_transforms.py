"""Transform presets and decoding: same crops as torchvision, reduced-scale JPEG decoding only where the crop
keeps its resolution, both decoders agreeing, and labels identical to DI-engine's stock ImageNetDataset."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from dizoo_imgcls.data.decode import (EncodedImage, UnreadableImageError, _jpeg_region, resolve_decoder, scale_box,
                                     simplejpeg)
from dizoo_imgcls.data.folder import ImageFolderSplit, PathTable, class_index
from dizoo_imgcls.data.loader import DATA_CONFIG, build_datasets, collate_images
from dizoo_imgcls.data.transforms import EvalPreset, TrainPreset, decode_factor, sample_crop


NO_SIMPLEJPEG = pytest.mark.skipif(simplejpeg is None, reason='no simplejpeg')
NO_REGION = pytest.mark.skipif(_jpeg_region is None or simplejpeg is None, reason='the C extension was not built')
DECODERS = ['pil', pytest.param('simplejpeg', marks=NO_SIMPLEJPEG), pytest.param('region', marks=NO_REGION)]


def smooth_jpeg(width: int, height: int, quality: int = 95) -> bytes:
    """A smooth colour gradient: resampling differences show up as real differences, not as texture aliasing."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 40.0)], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, 'JPEG', quality=quality)
    return buffer.getvalue()


def test_sampled_crops_respect_scale_ratio_and_bounds():
    torch.manual_seed(0)
    for _ in range(500):
        top, left, h, w = sample_crop(375, 500, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
        assert 0.07 <= h * w / (375 * 500) <= 1.0
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    torch.manual_seed(1)
    first = sample_crop(375, 500, (0.08, 1.0), (3 / 4, 4 / 3))
    torch.manual_seed(1)
    assert sample_crop(375, 500, (0.08, 1.0), (3 / 4, 4 / 3)) == first
    assert sample_crop(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3)) == (0, 493, 10, 13)  # fallback: central crop


def test_decode_factor_keeps_the_crop_at_least_output_size():
    assert decode_factor(100, 100, 128) == 1  # upsampled anyway: decode everything
    assert decode_factor(255, 400, 128) == 1
    assert decode_factor(256, 400, 128) == 2
    assert decode_factor(600, 520, 128) == 4
    assert decode_factor(3000, 2000, 128) == 8


@pytest.mark.parametrize('decoder', DECODERS)
def test_reduced_scale_decoding_changes_the_crop_only_within_resampling_noise(decoder, monkeypatch):
    factors = []
    decode_box = EncodedImage.decode_box
    monkeypatch.setattr(EncodedImage, 'decode_box', lambda self, box, factor=1, **kw: factors.append(factor) or
                        decode_box(self, box, factor, **kw))
    data = smooth_jpeg(1000, 750)
    for preset_cls, kwargs in ((TrainPreset, dict(crop_scale=(0.5, 1.0), hflip=False)), (EvalPreset, {})):
        outputs = []
        for reduced in (False, True):
            torch.manual_seed(3)  # the same crop for both
            outputs.append(preset_cls(128, reduced_decode=reduced, **kwargs)(EncodedImage(data, decoder)).float())
        assert outputs[0].shape == outputs[1].shape == (3, 128, 128)
        assert 0 < (outputs[0] - outputs[1]).abs().mean() < 2.5, preset_cls
    # train: a crop of >= half of 1000x750 keeps >= 128 px at 1/2 or 1/4; eval: the 146/750 center crop at 1/4
    assert factors[0] == 1 and factors[1] in (2, 4) and factors[2:] == [1, 4]


def test_the_fast_jpeg_decoder_is_what_auto_picks():
    """simplejpeg is an install requirement, and CI's machine has libjpeg-turbo's headers, so the region decoder is
    built there: a broken wheel or a failed build would silently make every run decode slower."""
    if (simplejpeg is None or _jpeg_region is None) and os.environ.get('CI') != 'true':
        pytest.skip('simplejpeg or the C extension is missing here (both are in CI, where this must not skip)')
    image = EncodedImage(smooth_jpeg(16, 16))
    assert resolve_decoder('auto') == 'region' and image.turbo and image.region
    assert _jpeg_region.LIBJPEG_TURBO_VERSION >= 2001000


def jpeg_variants():
    """JPEGs whose decoding takes different paths in libjpeg: chroma subsampling 4:2:0 / 4:2:2 / 4:4:4, grayscale,
    progressive, restart markers, a size that is no multiple of the MCU."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:203, 0:301]
    smooth = np.stack([x % 256, y + 20, 128 + 100 * np.sin(x / 9.0 + y / 13.0)], -1)
    pixels = np.clip(smooth + rng.normal(0, 25, smooth.shape), 0, 255).astype(np.uint8)  # texture for the IDCT
    variants = {}
    for name, image, options in (('420', pixels, dict(subsampling=2)), ('422', pixels, dict(subsampling=1)),
                                 ('444', pixels, dict(subsampling=0)), ('gray', pixels[..., 0], {}),
                                 ('progressive', pixels, dict(progressive=True)),
                                 ('restarts', pixels, dict(restart_marker_blocks=3))):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, 'JPEG', quality=90, **options)
        variants[name] = buffer.getvalue()
    return variants


@NO_REGION
def test_region_decoding_gives_the_pixels_of_a_whole_decode():
    rng = np.random.default_rng(1)
    for name, data in jpeg_variants().items():
        region, whole = EncodedImage(data, 'region'), EncodedImage(data, 'simplejpeg')
        assert region.region, name
        for factor in (1, 2, 4, 8):
            for fast in (False, True):
                full = whole.decode(factor, fast_upsample=fast)
                assert full.ndim == 3 and full.shape[2] == 3
                boxes = [(0, 0, 203, 301), (202, 300, 1, 1), (0, 150, 203, 1), (37, 0, 1, 301)]
                for _ in range(12):
                    h, w = rng.integers(1, 204), rng.integers(1, 302)
                    boxes.append((rng.integers(0, 204 - h), rng.integers(0, 302 - w), h, w))
                for box in boxes:
                    top, left, h, w = scale_box(box, (203, 301), full.shape[:2], factor)
                    crop = region.decode_box(box, factor, fast_upsample=fast)
                    assert crop.flags.writeable and crop.flags.c_contiguous
                    np.testing.assert_array_equal(crop, full[top:top + h, left:left + w], err_msg=f'{name} {box}')


@NO_REGION
def test_region_decoding_leaves_damaged_and_odd_files_to_the_whole_image_path(monkeypatch):
    calls = []
    decode_region = _jpeg_region.decode_region
    monkeypatch.setattr(_jpeg_region, 'decode_region', lambda *a: calls.append(a[1:]) or decode_region(*a))
    data = jpeg_variants()['420']
    truncated = EncodedImage(data[:len(data) // 2], 'region')  # no end-of-image marker: not decoded by region
    assert not truncated.region
    with pytest.raises(UnreadableImageError, match='truncated'):
        truncated.decode_box((0, 0, 10, 10))
    assert calls == []
    buffer = io.BytesIO()
    Image.new('CMYK', (40, 30), (0, 255, 255, 0)).save(buffer, 'JPEG')  # libjpeg has no CMYK -> RGB conversion
    cmyk = EncodedImage(buffer.getvalue(), 'region')
    crop = cmyk.decode_box((5, 5, 10, 20))
    assert len(calls) == 1 and crop.shape == (10, 20, 3) and crop[..., 0].min() > 200 and crop[..., 1].max() < 50
    damaged = bytearray(data)
    damaged[len(data) // 3:len(data) // 3 + 200] = bytes(200)  # zeros in the middle of the entropy-coded data

    def outcome(decoder):  # the pixels, or the reason the file is refused
        try:
            return EncodedImage(bytes(damaged), decoder).decode_box((0, 0, 203, 301))
        except UnreadableImageError as e:
            return str(e)
    region, pil = outcome('region'), outcome('pil')  # libjpeg warns: the region decode fails and Pillow decides
    assert len(calls) == 2
    assert (isinstance(region, str) and region == pil) if isinstance(pil, str) else np.array_equal(region, pil)
    with pytest.raises(IndexError, match='outside'):  # a box outside the image is a bug, never silently clipped
        decode_region(data, 1, 200, 0, 10, 10, False)


@NO_SIMPLEJPEG
def test_decoders_agree_at_every_scale():
    data = smooth_jpeg(500, 375, quality=90)
    for factor in (1, 2, 4, 8):
        a, b = EncodedImage(data, 'simplejpeg').decode(factor), EncodedImage(data, 'pil').decode(factor)
        assert a.shape == b.shape == (-(-375 // factor), -(-500 // factor), 3)
        assert np.abs(a.astype(int) - b).max() <= 1


@NO_SIMPLEJPEG
def test_fast_chroma_upsampling_only_in_full_size_training_decodes(monkeypatch, tmp_path):
    data = smooth_jpeg(500, 375, quality=90)  # Pillow's default 4:2:0 chroma subsampling
    accurate, fast = (EncodedImage(data).decode(1, fast_upsample=flag).astype(int) for flag in (False, True))
    assert (accurate != fast).any() and np.abs(accurate - fast).mean() < 0.5  # a different filter, same image
    calls = []
    decode_box = EncodedImage.decode_box
    monkeypatch.setattr(EncodedImage, 'decode_box', lambda self, box, factor=1, fast_upsample=False: calls.append(
        (factor, fast_upsample)) or decode_box(self, box, factor, fast_upsample))
    for size, factor in ((300, 1), (64, 4)):  # the whole 500x375 image: too small for 1/2 at 300 px; 1/4 at 64
        outputs = []
        for flag in (False, True):
            torch.manual_seed(0)
            outputs.append(TrainPreset(size, crop_scale=(1.0, 1.0), fast_upsample=flag)(EncodedImage(data)).float())
        difference = (outputs[0] - outputs[1]).abs().mean()
        assert (0 < difference < 0.5) if factor == 1 else difference == 0
        assert calls[-2:] == [(factor, False), (factor, factor == 1)]
    EvalPreset(300, crop_ratio=1.0)(EncodedImage(data))
    assert calls[-1] == (1, False)  # eval decodes accurately
    for split in ('train', 'val'):
        (tmp_path / split / 'a').mkdir(parents=True)
        (tmp_path / split / 'a' / '0.jpg').write_bytes(data)
    for flag in (True, False):  # the config key reaches the training preset (on by default)
        config = dict(DATA_CONFIG, root=str(tmp_path), image_size=32, **({} if flag else dict(jpeg_fast_upsample=False)))
        assert build_datasets(config)[0].transform.fast_upsample is flag


@pytest.mark.parametrize('decoder', DECODERS)
def test_scaled_decode_boxes_map_by_the_factor_up_to_the_right_edge(decoder):
    """1033 px decode at 1/8 to ceil(1033 / 8) = 130 px, but source x is decoded x / 8 exactly: a box near the right
    edge must not drift by the rounding of the size (1000 * 130 / 1033 = 125.85 would give 126)."""
    pixels = np.zeros((64, 1033, 3), np.uint8)
    pixels[:, 1000:1008] = 255  # one 8 px block column: one decoded column at 1/8
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, 'JPEG', quality=95)
    decoded = EncodedImage(buffer.getvalue(), decoder).decode(8)
    assert decoded.shape[1] == 130 and int(decoded[:, :, 0].mean(0).argmax()) == 125
    assert scale_box((0, 1000, 64, 8), (64, 1033), decoded.shape[:2], 8) == (0, 125, 8, 1)
    assert scale_box((2, 3, 4, 5), (10, 10), (10, 10), 4) == (2, 3, 4, 5)  # not scaled (not a JPEG): 1:1


@pytest.mark.parametrize('decoder', DECODERS)
def test_a_second_decode_at_another_scale_has_that_scale(decoder):
    image = EncodedImage(smooth_jpeg(517, 333), decoder)
    assert image.decode(4).shape == (84, 130, 3) and image.decode(1).shape == (333, 517, 3)


def test_the_bomb_message_quotes_the_configured_limit(monkeypatch):
    buffer = io.BytesIO()
    Image.new('RGB', (100, 100)).save(buffer, 'PNG')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)  # Pillow itself refuses over 2x this, quoting 2000
    with pytest.raises(UnreadableImageError, match=r'^10000 px is over the decompression-bomb limit of 1000 px'):
        EncodedImage(buffer.getvalue())


def test_eval_matches_torchvision_resize_and_center_crop():
    data = smooth_jpeg(292, 292)
    ours = EvalPreset(128, 0.875, reduced_decode=False)(EncodedImage(data)).float()
    reference = v2.Compose([v2.Resize(146, antialias=True), v2.CenterCrop(128), v2.PILToTensor()])
    theirs = reference(Image.open(io.BytesIO(data)).convert('RGB')).float()
    assert (ours - theirs).abs().mean() < 0.5


def test_presets_accept_pillow_images_and_arrays():
    image = Image.new('L', (64, 48), 77)
    for preset in (TrainPreset(32), EvalPreset(32)):
        out = preset(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8 and int(out.float().mean().round()) == 77
        assert preset(np.full((48, 64, 3), 5, np.uint8)).shape == (3, 32, 32)


def test_presets_write_hwc_memory_and_batches_stay_channels_last(tmp_path):
    data = smooth_jpeg(500, 375, quality=90)
    images = [TrainPreset(64)(EncodedImage(data)), EvalPreset(64)(EncodedImage(data)),
              EvalPreset(64, crop_ratio=1.0)(np.zeros((64, 80, 3), np.uint8))]  # a crop at output size: no resample
    for image in images:
        assert image.shape == (3, 64, 64) and image.permute(1, 2, 0).is_contiguous()  # CHW view of HWC memory
    items = [(image, label) for label, image in enumerate(images)]
    images_batch, labels = collate_images(items)
    assert images_batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(images_batch, torch.stack(images)) and labels.tolist() == [0, 1, 2]
    assert collate_images([(torch.zeros(2), 1)])[0].shape == (1, 2)  # other items: default_collate
    # Through worker processes (shared memory, pickled strides) the batch keeps its layout.
    for i in range(4):
        (tmp_path / f'{i}.jpg').write_bytes(data)
    dataset = [(EvalPreset(64)(EncodedImage((tmp_path / f'{i}.jpg').read_bytes())), i) for i in range(4)]
    batch, _ = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1,
                                                     collate_fn=collate_images)))
    assert batch.is_contiguous(memory_format=torch.channels_last) and torch.equal(batch[1], dataset[1][0])


def test_path_table_round_trips_any_file_name():
    names = ['a/1.jpg', 'ünï/çødé.JPEG', 'b/' + 'x' * 300 + '.png', '']
    table = PathTable(names)
    assert len(table) == 4 and [table[i] for i in range(4)] == names


def test_labels_identical_to_stock_imagenet_dataset(imagenette_root):
    from dizoo.image_classification.data import ImageNetDataset

    classes = class_index(os.path.join(imagenette_root, 'train'))
    for split in ('train', 'val'):
        ours = ImageFolderSplit(os.path.join(imagenette_root, split), classes)
        stock = ImageNetDataset(os.path.join(imagenette_root, split), is_training=split == 'train')
        assert len(ours) == len(stock.data)
        assert {ours.path(i): int(ours.targets[i]) for i in range(len(ours))} == dict(stock.data)
