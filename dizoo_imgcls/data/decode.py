"""Image files to uint8 RGB arrays, JPEGs at 1/2, 1/4 or 1/8 scale on request, and only a crop's pixels.

JPEGs go through libjpeg-turbo: with TurboJPEG (``simplejpeg``) the loader delivers 1.4-1.7x the images per CPU
second that it does with Pillow as decoder (docs/BENCHMARKS.md, "Data loader"). Where the package's C extension
``_jpeg_region`` was built (setup.py compiles it against the system's libjpeg-turbo headers when present), a
transform's crop is decoded alone: the rows below it are never decoded, and the columns beside and rows above it
are not inverse-transformed, with the same pixels as a full decode. Everything else, and any JPEG that
libjpeg-turbo refuses or warns about, goes through Pillow, with every mode (CMYK, palette, RGBA, 16-bit,
grayscale) turned into 8-bit RGB. A file that cannot be read raises ``UnreadableImageError`` whose message says
why, so a dataset can skip it and name it.
"""
import io
import os
import re
import struct
import warnings
from contextlib import contextmanager
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # optional: the faster JPEG path; Pillow decodes everything without it
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

try:  # optional: built by setup.py where libjpeg-turbo's headers are installed (Debian/Ubuntu: libjpeg-dev)
    from . import _jpeg_region
except ImportError:  # pragma: no cover - depends on the environment
    _jpeg_region = None

Box = Tuple[int, int, int, int]  # top, left, height, width
DECODERS = ('auto', 'region', 'simplejpeg', 'pil')
JPEG_MAGIC = b'\xff\xd8\xff'
JPEG_END = b'\xff\xd9'
# What Pillow's and TurboJPEG's decoders raise on damaged data (Pillow uses all of these).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, Image.DecompressionBombError,
                 Image.DecompressionBombWarning)


class UnreadableImageError(Exception):
    """A file that is no usable image; the message is the reason (the caller adds the path)."""


def resolve_decoder(decoder: str) -> str:
    """'auto' -> 'region' where the C extension is built, else 'simplejpeg' when installed, else 'pil'; an
    unknown or unavailable choice is an error."""
    if decoder not in DECODERS:
        raise ValueError(f"data.decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder in ('region', 'simplejpeg') and simplejpeg is None:
        raise ValueError(f"data.decoder={decoder!r} but the simplejpeg package is not installed "
                         "(pip install simplejpeg, or use 'auto' / 'pil')")
    if decoder == 'region' and _jpeg_region is None:
        raise ValueError("data.decoder='region' but dizoo_imgcls.data._jpeg_region was not built: install "
                         "libjpeg-turbo's headers (Debian/Ubuntu: apt-get install libjpeg-dev) and reinstall the "
                         "package, or use 'auto' / 'simplejpeg' / 'pil'")
    if decoder == 'auto':
        return 'region' if _jpeg_region is not None and simplejpeg is not None else (
            'simplejpeg' if simplejpeg is not None else 'pil')
    return decoder


def describe_error(error: BaseException) -> str:
    """A short reason for a log line or a check-data report."""
    if isinstance(error, UnreadableImageError):
        return str(error)
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        # Pillow's own message quotes twice the limit for the images it refuses outright; ours quotes the limit.
        size = re.search(r'\((\d+) pixels\)', str(error))
        return (f'{size.group(1) + " px is " if size else ""}over the decompression-bomb limit of '
                f'{Image.MAX_IMAGE_PIXELS} px (PIL.Image.MAX_IMAGE_PIXELS)')
    if isinstance(error, UnidentifiedImageError):
        return 'not an image (Pillow cannot identify the file format)'
    if isinstance(error, OSError) and error.errno is not None:
        return f'cannot read the file ({error.strerror})'
    return f'damaged image data ({type(error).__name__}: {error})'


@contextmanager
def unreadable_on_error():
    """Turn a decoder's exception into ``UnreadableImageError`` with a readable reason."""
    try:
        yield
    except UnreadableImageError:
        raise
    except DECODE_ERRORS as e:
        raise UnreadableImageError(describe_error(e)) from e


def check_pixel_limit(width: int, height: int) -> None:
    """Refuse images over Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise UnreadableImageError(f'{width}x{height} = {width * height} px is over the decompression-bomb limit of '
                                   f'{limit} px (PIL.Image.MAX_IMAGE_PIXELS)')


def pil_to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode; 16-bit grayscale keeps its top 8 bits instead of saturating."""
    if img.mode == 'RGB':
        return img
    if img.mode.startswith('I;16') or img.mode == 'I':
        wide = np.asarray(img, dtype=np.uint32) if img.mode != 'I' else np.clip(np.asarray(img), 0, 65535)
        img = Image.fromarray((wide >> 8).astype(np.uint8), mode='L')
    elif img.mode == 'P' and 'transparency' in img.info:
        img = img.convert('RGBA')  # the direct route warns once per image
    return img.convert('RGB')


def open_pil(data: bytes) -> Image.Image:
    """Pillow image (header read, pixels not yet decoded); over-limit images raise instead of warning."""
    with unreadable_on_error(), warnings.catch_warnings():
        warnings.simplefilter('error', Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def scale_box(box: Sequence[float], source_hw: Tuple[int, int], decoded_hw: Tuple[int, int], factor: int) -> Box:
    """A box in source pixels mapped to integer pixels of the image decoded at 1/``factor`` scale.

    A scaled JPEG decode maps source pixel x to x / factor exactly (each 8x8 block becomes a (8/factor)^2
    one); its size, ceil(side / factor), is rounded up, so dividing by the size ratio instead would shift
    boxes near the right and bottom edges by up to a decoded pixel. A decoder that returned the full size
    anyway (not a JPEG) maps 1:1."""
    top, left, h, w = box
    s = 1.0 if tuple(decoded_hw) == tuple(source_hw) else 1.0 / factor
    dh = min(decoded_hw[0], max(1, int(round(h * s))))
    dw = min(decoded_hw[1], max(1, int(round(w * s))))
    dtop = min(decoded_hw[0] - dh, int(round(top * s)))
    dleft = min(decoded_hw[1] - dw, int(round(left * s)))
    return dtop, dleft, dh, dw


class ImageSource:
    """What the transform presets read: ``size_hw``, ``decode(factor)`` (the whole image) and ``decode_box``."""
    height: int
    width: int

    @property
    def size_hw(self) -> Tuple[int, int]:
        return self.height, self.width

    def decode(self, factor: int = 1, fast_upsample: bool = False) -> np.ndarray:
        raise NotImplementedError

    def decode_box(self, box: Sequence[float], factor: int = 1, fast_upsample: bool = False) -> np.ndarray:
        """The pixels of ``box`` (top, left, height, width in source pixels, fractions allowed) of the image
        decoded at 1/``factor`` scale: an HxWx3 uint8 view."""
        pixels = self.decode(factor, fast_upsample)
        top, left, h, w = scale_box(box, self.size_hw, pixels.shape[:2], factor)
        return pixels[top:top + h, left:left + w]


class EncodedImage(ImageSource):
    """One image file's bytes: its size from the header, its pixels decoded on demand at 1/``factor`` scale
    (1, 2, 4 or 8; JPEG only, other formats always decode at full size), the whole image or one box of it."""

    def __init__(self, data: bytes, decoder: str = 'auto') -> None:
        if not data:
            raise UnreadableImageError('empty file (0 bytes)')
        self.data = data
        self._pil: Optional[Image.Image] = None
        decoder = resolve_decoder(decoder)
        self.turbo = decoder in ('region', 'simplejpeg') and data[:3] == JPEG_MAGIC
        if self.turbo:
            try:
                self.height, self.width = simplejpeg.decode_jpeg_header(data)[:2]
            except ValueError:
                self.turbo = False  # Pillow gets a go, and names the problem if it fails too
        # A file that does not end in the end-of-image marker (truncated, or trailing bytes) is decoded whole,
        # so whether it is refused does not depend on where a crop falls.
        self.region = self.turbo and decoder == 'region' and data.endswith(JPEG_END)
        if not self.turbo:
            self._pil = open_pil(data)
            self.width, self.height = self._pil.size
        check_pixel_limit(self.width, self.height)

    def decode(self, factor: int = 1, fast_upsample: bool = False) -> np.ndarray:
        """HxWx3 uint8 RGB; for a JPEG each side is ``ceil(side / factor)``.

        ``fast_upsample`` (TurboJPEG only) upsamples subsampled chroma by repeating samples instead of
        libjpeg's triangular filter: ~11% less time for a full-size decode of a 4:2:0 500x375 JPEG, and a
        mean difference of ~0.25/255 per pixel value (docs/BENCHMARKS.md, "Data loader")."""
        if self.turbo:
            height, width = self.decoded_hw(factor)
            try:
                return simplejpeg.decode_jpeg(self.data, colorspace='RGB', min_height=height, min_width=width,
                                              min_factor=factor, strict=True, fastupsample=fast_upsample)
            except ValueError:
                # strict TurboJPEG also refuses files with harmless warnings (extra bytes after the image):
                # Pillow decides, so both decoders accept and refuse the same files.
                self._pil = open_pil(self.data)
        return self._decode_pil(factor)

    def decoded_hw(self, factor: int) -> Tuple[int, int]:
        """The size of a JPEG decoded at 1/``factor`` scale: each side ``ceil(side / factor)``."""
        return -(-self.height // factor), -(-self.width // factor)

    def decode_box(self, box: Sequence[float], factor: int = 1, fast_upsample: bool = False) -> np.ndarray:
        if self.region:
            top, left, h, w = scale_box(box, self.size_hw, self.decoded_hw(factor), factor)
            try:
                pixels = _jpeg_region.decode_region(self.data, factor, top, left, h, w, fast_upsample)
                return np.frombuffer(pixels, np.uint8).reshape(h, w, 3)
            except ValueError:
                # Damaged, CMYK, or a libjpeg warning: simplejpeg's strict mode (the same libjpeg) would refuse it
                # too, so Pillow decides, as it always has for such files.
                self.turbo = False
        return super().decode_box(box, factor, fast_upsample)

    def _decode_pil(self, factor: int) -> np.ndarray:
        # A Pillow image is drafted and loaded once: a later decode, perhaps at another scale, opens a fresh one.
        img = self._pil if self._pil is not None else open_pil(self.data)
        self._pil = None
        with unreadable_on_error():
            if factor > 1 and img.format == 'JPEG':
                img.draft(img.mode if img.mode == 'CMYK' else 'RGB',
                          (max(1, self.width // factor), max(1, self.height // factor)))
            rgb = pil_to_rgb(img)
            rgb.load()
        return np.array(rgb)  # a writable copy: torch.from_numpy warns on Pillow's read-only buffer


class DecodedImage(ImageSource):
    """Pixels already in memory (a Pillow image or an array) behind the ``EncodedImage`` interface."""

    def __init__(self, image) -> None:
        self.pixels = np.array(pil_to_rgb(image)) if isinstance(image, Image.Image) else np.asarray(image)
        if self.pixels.ndim != 3 or self.pixels.shape[2] != 3 or self.pixels.dtype != np.uint8:
            raise ValueError(f'expected an HxWx3 uint8 RGB array, got {self.pixels.dtype} {self.pixels.shape}')
        self.height, self.width = self.pixels.shape[:2]

    def decode(self, factor: int = 1, fast_upsample: bool = False) -> np.ndarray:
        return self.pixels


def read_image_file(path: str, decoder: str = 'auto') -> EncodedImage:
    """The file's bytes behind ``EncodedImage``; ``UnreadableImageError`` for anything that is no image."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:  # missing, a directory, a broken symlink, no permission
        raise UnreadableImageError(describe_error(e)) from e
    return EncodedImage(data, decoder)


def load_rgb_array(path: str, decoder: str = 'auto') -> np.ndarray:
    """The whole image as HxWx3 uint8 RGB at full resolution (what --check-data decodes)."""
    image = read_image_file(path, decoder)
    return image.decode(1)


def is_hidden(name: str) -> bool:
    """Dot files: macOS ``.DS_Store`` and ``._name.jpg`` resource forks, editors' swap files."""
    return os.path.basename(name).startswith('.')
