"""EXIF orientation: training, evaluation and prediction see the upright image (PIL.ImageOps.exif_transpose
semantics) from every decoder, without the region decoder's crop landing in the stored (sideways) pixels."""
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dizoo_imgcls.data.decode import EncodedImage, jpeg_orientation, resolve_decoder
from dizoo_imgcls.data.folder import ImageFolderSplit
from dizoo_imgcls.data.transforms import EvalPreset, TrainPreset
from dizoo_imgcls.predict import EvalReader

# Upright test picture: four solid quadrants, 96 px wide and 64 px high (not square: a missed rotation also
# shows in the size).
QUADRANTS = {'top_left': (220, 20, 20), 'top_right': (20, 200, 20), 'bottom_left': (20, 20, 220),
             'bottom_right': (230, 230, 230)}
HEIGHT, WIDTH = 64, 96
# EXIF orientation -> how a camera stored the upright picture (the inverse of exif_transpose's transpose).
STORED = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
          7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


def available_decoders():
    found = []
    for decoder in ('region', 'simplejpeg', 'pil'):
        try:
            resolve_decoder(decoder)
            found.append(decoder)
        except ValueError:
            pass
    return found


def upright_picture() -> np.ndarray:
    pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    h, w = HEIGHT // 2, WIDTH // 2
    pixels[:h, :w], pixels[:h, w:] = QUADRANTS['top_left'], QUADRANTS['top_right']
    pixels[h:, :w], pixels[h:, w:] = QUADRANTS['bottom_left'], QUADRANTS['bottom_right']
    return pixels


def tagged_file(orientation: int, fmt: str = 'JPEG') -> bytes:
    """The upright picture stored as a camera would for ``orientation``, with that EXIF tag."""
    image = Image.fromarray(upright_picture())
    if STORED[orientation] is not None:
        image = image.transpose(STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = 'test camera'  # a second tag, so the orientation is not the only IFD entry
    buffer = io.BytesIO()
    image.save(buffer, fmt, exif=exif.tobytes(), **({'quality': 95} if fmt == 'JPEG' else {}))
    return buffer.getvalue()


def assert_upright(chw: torch.Tensor, tolerance: int = 40) -> None:
    """The four quadrant colours where the upright picture has them (sampled at each quadrant's centre)."""
    hwc = chw.permute(1, 2, 0).numpy().astype(int)
    h, w = hwc.shape[:2]
    for (name, colour), (y, x) in zip(QUADRANTS.items(), ((h // 4, w // 4), (h // 4, 3 * w // 4),
                                                          (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4))):
        assert np.abs(hwc[y, x] - colour).max() <= tolerance, (name, hwc[y, x].tolist(), colour)


def test_the_test_files_carry_the_tag_pillow_reads():
    for orientation in STORED:
        data = tagged_file(orientation)
        stored = Image.open(io.BytesIO(data))
        assert stored.getexif().get(0x0112) == orientation
        assert ImageOps.exif_transpose(stored).size == (WIDTH, HEIGHT)
        assert jpeg_orientation(data) == orientation


@pytest.mark.parametrize('decoder', available_decoders())
@pytest.mark.parametrize('orientation', sorted(STORED))
def test_every_decoder_gives_the_pixels_of_exif_transpose(decoder, orientation):
    data = tagged_file(orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert('RGB')).astype(int)
    image = EncodedImage(data, decoder)
    assert image.size_hw == (HEIGHT, WIDTH)
    pixels = image.decode(1)
    assert pixels.shape == expected.shape and pixels.flags['C_CONTIGUOUS']
    assert np.abs(pixels.astype(int) - expected).max() <= 2  # libjpeg-turbo in both; rounding at most
    assert_upright(torch.from_numpy(pixels).permute(2, 0, 1))
    # a scaled decode (data.jpeg_draft) is rotated too
    assert image.decode(2).shape[:2] == (HEIGHT // 2, WIDTH // 2)


@pytest.mark.parametrize('orientation', [1, 3, 6, 8])
def test_png_with_exif_is_upright_too(orientation):
    image = EncodedImage(tagged_file(orientation, 'PNG'), 'auto')
    assert image.size_hw == (HEIGHT, WIDTH)
    assert np.array_equal(image.decode(1), upright_picture())  # lossless: exactly the upright picture


@pytest.mark.parametrize('orientation', [5, 6, 7, 8])
def test_random_training_crops_are_crops_of_the_upright_image(orientation):
    """Random crops with the default (region) decoder: the same box of the upright image as a crop of Pillow's
    exif_transpose result, for the same random draws, not a box of the stored sideways pixels."""
    data = tagged_file(orientation)
    upright = np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert('RGB'))
    preset = TrainPreset(32, crop_scale=(0.1, 0.5), hflip=False, reduced_decode=True)
    for seed in range(8):
        torch.manual_seed(seed)
        ours = preset(EncodedImage(data, 'auto'))
        torch.manual_seed(seed)
        reference = preset(upright)
        assert (ours.int() - reference.int()).abs().max() <= 3, seed


@pytest.mark.parametrize('orientation', [3, 6, 8])
def test_train_eval_and_predict_see_the_upright_image(tmp_path, orientation):
    for split in ('train', 'val'):
        (tmp_path / split / 'a').mkdir(parents=True)
        (tmp_path / split / 'a' / 'photo.jpg').write_bytes(tagged_file(orientation))
    # whole-image training crop (scale 1, no flip): the upright quadrants
    train = ImageFolderSplit(str(tmp_path / 'train'), {'a': 0}, TrainPreset(48, (1.0, 1.0), hflip=False))
    assert_upright(train[0][0])
    evaluation = ImageFolderSplit(str(tmp_path / 'val'), {'a': 0}, EvalPreset(48, crop_ratio=1.0),
                                  replace_unreadable=False)
    image, label = evaluation[0]
    assert label == 0
    # the eval center crop of the 64x96 upright picture is its middle 64x64: quadrant colours still in place
    assert_upright(image)
    reader = EvalReader({'image_size': 48, 'eval_image_size': None, 'eval_crop_ratio': 1.0, 'jpeg_draft': True,
                         'decoder': 'auto'})
    assert_upright(reader(str(tmp_path / 'val' / 'a' / 'photo.jpg')))


def test_orientation_read_from_the_header_bytes_is_robust():
    plain = tagged_file(1)
    assert jpeg_orientation(plain) == 1
    no_exif = io.BytesIO()
    Image.fromarray(upright_picture()).save(no_exif, 'JPEG')
    assert jpeg_orientation(no_exif.getvalue()) == 1
    # damaged EXIF blocks and truncated headers read as "no orientation", never raise
    data = tagged_file(6)
    start = data.index(b'Exif\x00\x00') + 6
    for damaged in (data[:start + 5], data[:start] + b'XX' + data[start + 2:], data[:start + 4] + b'\xff' * 4 +
                    data[start + 8:], data[:40]):
        assert jpeg_orientation(damaged) in range(1, 9)
    # XMP orientation, which Pillow reads when EXIF has none
    xmp = b'http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'
    segment = b'\xff\xe1' + (len(xmp) + 2).to_bytes(2, 'big') + xmp
    with_xmp = no_exif.getvalue()[:2] + segment + no_exif.getvalue()[2:]
    assert Image.open(io.BytesIO(with_xmp)).getexif().get(0x0112) == 8  # Pillow's reading
    assert jpeg_orientation(with_xmp) == 8
