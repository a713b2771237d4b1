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

from ..errors import SettingError

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


EXIF_HEADER = b'Exif\x00\x00'
XMP_HEADER = b'http://ns.adobe.com/xap/1.0/\x00'
XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # Pillow's pattern (Image.getexif)
ORIENTATION_TAG = 0x0112
# EXIF orientation -> the numpy view that makes the stored pixels upright, as PIL.ImageOps.exif_transpose does
# (2 FLIP_LEFT_RIGHT, 3 ROTATE_180, 4 FLIP_TOP_BOTTOM, 5 TRANSPOSE, 6 ROTATE_270, 7 TRANSVERSE, 8 ROTATE_90).
UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: a[::-1].transpose(1, 0, 2),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: a[:, ::-1].transpose(1, 0, 2),
}


class UnreadableImageError(Exception):
    """A file that is no usable image; the message is the reason (the caller adds the path)."""


def resolve_decoder(decoder: str) -> str:
    """'auto' -> 'region' where the C extension is built, else 'simplejpeg' when installed, else 'pil'; an
    unknown or unavailable choice is an error."""
    if decoder not in DECODERS:
        raise SettingError(f"data.decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder in ('region', 'simplejpeg') and simplejpeg is None:
        raise SettingError(f"data.decoder={decoder!r} but the simplejpeg package is not installed "
                           "(pip install simplejpeg, or use 'auto' / 'pil')")
    if decoder == 'region' and _jpeg_region is None:
        raise SettingError("data.decoder='region' but dizoo_imgcls.data._jpeg_region was not built: install "
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


def _tiff_orientation(tiff: bytes) -> Optional[int]:
    """The Orientation tag of a TIFF structure's first IFD (EXIF's IFD0), or None."""
    order = {b'II': '<', b'MM': '>'}.get(tiff[:2])
    if order is None:
        return None
    try:
        (ifd,) = struct.unpack_from(order + 'I', tiff, 4)
        (entries,) = struct.unpack_from(order + 'H', tiff, ifd)
        for entry in range(ifd + 2, ifd + 2 + 12 * entries, 12):
            tag, kind = struct.unpack_from(order + 'HH', tiff, entry)
            if tag == ORIENTATION_TAG:
                return struct.unpack_from(order + ('H' if kind == 3 else 'I'), tiff, entry + 8)[0]
    except struct.error:  # a damaged EXIF block: no orientation, as Pillow reads it
        return None
    return None


def jpeg_orientation(data: bytes) -> int:
    """A JPEG's EXIF orientation (1..8; 1 where there is none), read from the marker segments before the first
    scan as Pillow reads them: the first ``Exif`` APP1's IFD0, else an XMP APP1's ``tiff:Orientation``. Costs
    one length read per segment (~1 us for a plain JFIF file); only an APP1 segment is looked into."""
    pos, end, xmp = 2, len(data), None
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA or marker == 0xD9:  # start of scan (or end of image): the header is over
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker == 0xE1:
            if data.startswith(EXIF_HEADER, pos + 4):
                orientation = _tiff_orientation(data[pos + 4 + len(EXIF_HEADER):pos + 2 + length])
                if orientation is not None:
                    return orientation if 1 <= orientation <= 8 else 1
            elif data.startswith(XMP_HEADER, pos + 4):
                xmp = (pos + 4 + len(XMP_HEADER), pos + 2 + length)
        pos += 2 + length
    if xmp is not None:
        match = XMP_ORIENTATION.search(data, *xmp)
        if match and 1 <= int(match[2]) <= 8:
            return int(match[2])
    return 1


def pil_orientation(img: Image.Image) -> int:
    """The EXIF (or XMP) orientation of a non-JPEG file (PNG, WebP, TIFF) from what Pillow read with its header;
    1 where none. Pillow's base ``getexif``: PNG's own would decode the pixels first, to find an eXIf chunk
    written after the image data, which is rare; here the pixels stay undecoded until a transform asks."""
    with unreadable_on_error():
        orientation = Image.Image.getexif(img).get(ORIENTATION_TAG, 1)
    return orientation if orientation in UPRIGHT else 1


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
    (1, 2, 4 or 8; JPEG only, other formats always decode at full size), the whole image or one box of it.

    Pixels, size and boxes are those of the upright image: an EXIF orientation other than 1 is applied after
    decoding, as ``PIL.ImageOps.exif_transpose`` does (a numpy view, copied once). ``stored_hw`` is the size as
    stored in the file. The region decoder reads stored pixels, so such files take the whole-image path."""

    def __init__(self, data: bytes, decoder: str = 'auto') -> None:
        if not data:
            raise UnreadableImageError('empty file (0 bytes)')
        self.data = data
        self._pil: Optional[Image.Image] = None
        decoder = resolve_decoder(decoder)
        jpeg = data[:3] == JPEG_MAGIC
        self.turbo = decoder in ('region', 'simplejpeg') and jpeg
        if self.turbo:
            try:
                self.stored_hw = tuple(simplejpeg.decode_jpeg_header(data)[:2])
            except ValueError:
                self.turbo = False  # Pillow gets a go, and names the problem if it fails too
        if not self.turbo:
            self._pil = open_pil(data)
            self.stored_hw = self._pil.size[::-1]
        check_pixel_limit(self.stored_hw[1], self.stored_hw[0])
        self.orientation = jpeg_orientation(data) if jpeg else pil_orientation(self._pil)
        self.height, self.width = self.stored_hw[::-1] if self.orientation >= 5 else self.stored_hw
        # A file that does not end in the end-of-image marker (truncated, or trailing bytes) is decoded whole,
        # so whether it is refused does not depend on where a crop falls.
        self.region = self.turbo and decoder == 'region' and data.endswith(JPEG_END) and self.orientation == 1

    def decode(self, factor: int = 1, fast_upsample: bool = False) -> np.ndarray:
        """HxWx3 uint8 RGB; for a JPEG each side is ``ceil(side / factor)``.

        ``fast_upsample`` (TurboJPEG only) upsamples subsampled chroma by repeating samples instead of
        libjpeg's triangular filter: ~11% less time for a full-size decode of a 4:2:0 500x375 JPEG, and a
        mean difference of ~0.25/255 per pixel value (docs/BENCHMARKS.md, "Data loader")."""
        pixels = None
        if self.turbo:
            height, width = self.decoded_hw(factor)
            try:
                pixels = simplejpeg.decode_jpeg(self.data, colorspace='RGB', min_height=height, min_width=width,
                                                min_factor=factor, strict=True, fastupsample=fast_upsample)
            except ValueError:
                # strict TurboJPEG also refuses files with harmless warnings (extra bytes after the image):
                # Pillow decides, so both decoders accept and refuse the same files.
                self._pil = open_pil(self.data)
        if pixels is None:
            pixels = self._decode_pil(factor)
        if self.orientation == 1:
            return pixels
        return np.ascontiguousarray(UPRIGHT[self.orientation](pixels))  # torch.from_numpy needs positive strides

    def decoded_hw(self, factor: int) -> Tuple[int, int]:
        """The stored size of a JPEG decoded at 1/``factor`` scale: each side ``ceil(side / factor)``."""
        return -(-self.stored_hw[0] // factor), -(-self.stored_hw[1] // factor)

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
                          (max(1, self.stored_hw[1] // factor), max(1, self.stored_hw[0] // factor)))
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
