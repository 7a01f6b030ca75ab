"""Images as files arrive: high bit depths scaled to 8 bits, extreme aspect ratios cropped in the
memory of the crop, and PIL's decompression-bomb limit as one clear error.

The eval transform's bit-for-bit parity with torchvision on ordinary photos is in
test_input_pipeline.py (`eval_transform`) and test_predict.py (`preprocess` against each source).
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image

from helpers import photos
from effnetv2_jax.transforms import eval_transform, open_image, to_rgb

SPEC = {'size': 224, 'resize': 'shorter', 'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': (0.5,) * 3, 'std': (0.5,) * 3}


def picture(channels: int = 3) -> np.ndarray:
    """Every 8-bit level, as a uint8 [16, 16, channels] array."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    return np.stack([np.roll(levels, 85 * c) for c in range(channels)], axis=-1)


def png_16_bit(path, array: np.ndarray) -> None:
    """`array` (uint16 [H, W, 2 | 3 | 4]: gray + alpha, RGB, RGBA) as a 16-bit PNG, which PIL
    reads but cannot write."""
    height, width, channels = array.shape
    colour_type = {2: 4, 3: 2, 4: 6}[channels]

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', crc)

    rows = b''.join(b'\0' + row.astype('>u2').tobytes() for row in array)  # filter 0 per row
    header = struct.pack('>IIBBBBB', width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header)
                     + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))


def read_rgb(path) -> np.ndarray:
    return np.asarray(to_rgb(open_image(path)))


# --- bit depths --------------------------------------------------------------------------------

def test_16_bit_png_scales_to_8_bits_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 255, 256, 32767, 32768, 65535]], np.uint16)).save(
        tmp_path / 'gray.png')
    assert Image.open(tmp_path / 'gray.png').mode == 'I;16'
    np.testing.assert_array_equal(read_rgb(tmp_path / 'gray.png')[0, :, 0],
                                  [0, 0, 1, 127, 128, 255])


@pytest.mark.parametrize('mode, values, suffix', [
    ('I;16', lambda v: (v * 257).astype('<u2'), 'png'),   # 16-bit grayscale PNG
    ('I;16B', lambda v: (v * 257).astype('>u2'), 'tiff'),  # big-endian 16-bit TIFF
    ('I', lambda v: (v * 257).astype(np.int32), 'tiff'),   # 32-bit integer TIFF; 16-bit PGM
    ('F', lambda v: (v / 255).astype(np.float32), 'tiff'),  # float TIFF
], ids=['I;16', 'I;16B', 'I', 'F'])
def test_high_bit_depth_copy_of_a_picture_reads_as_the_picture(tmp_path, mode, values, suffix):
    gray = picture(1)[..., 0]
    path = tmp_path / f'picture.{suffix}'
    Image.frombytes(mode, gray.shape[::-1], values(gray.astype(np.int64)).tobytes()).save(path)
    assert Image.open(path).mode == mode
    np.testing.assert_array_equal(read_rgb(path), np.repeat(gray[..., None], 3, -1))


@pytest.mark.parametrize('channels', [3, 4, 2], ids=['RGB', 'RGBA', 'LA'])
def test_16_bit_colour_png_reads_as_the_picture(tmp_path, channels):
    rgb = picture(3)
    png_16_bit(tmp_path / 'x.png', picture(channels).astype(np.uint16) * 257)
    expected = rgb if channels > 2 else np.repeat(rgb[..., :1], 3, -1)
    np.testing.assert_array_equal(read_rgb(tmp_path / 'x.png'), expected)


def test_values_beyond_the_range_of_their_mode_are_clipped():
    integers = Image.fromarray(np.array([[-5, 0, 65535, 70000]], np.int32))
    floats = Image.fromarray(np.array([[-0.5, np.nan, 1.0, 1.5, np.inf]], np.float32))
    np.testing.assert_array_equal(np.asarray(to_rgb(integers))[0, :, 0], [0, 0, 255, 255])
    np.testing.assert_array_equal(np.asarray(to_rgb(floats))[0, :, 0], [0, 0, 255, 255, 255])


@pytest.mark.parametrize('mode', ['LA', 'PA'])
def test_alpha_is_dropped_not_composited(mode):
    image = Image.fromarray(np.array([[[100, 0], [200, 255]]], np.uint8))  # 'LA'
    if mode == 'PA':
        image = image.convert('PA')
    assert image.mode == mode
    np.testing.assert_array_equal(np.asarray(to_rgb(image))[0, :, 0], [100, 200])


# --- extreme aspect ratios ---------------------------------------------------------------------

def strip(length: int) -> Image.Image:
    """A 1-pixel-wide 'L' column of `length` rows; row y is y // 100 (mod 256)."""
    hundreds = np.arange(-(-length // 100), dtype=np.uint32) % 256
    return Image.fromarray(np.repeat(hundreds.astype(np.uint8), 100)[:length, None])


@pytest.mark.parametrize('transpose', [False, True])
def test_a_1_x_20000_png_gives_the_crop_of_its_middle(tmp_path, transpose):
    image = strip(20000).transpose(Image.Transpose.TRANSPOSE) if transpose else strip(20000)
    image.save(tmp_path / 'strip.png')
    out = eval_transform(open_image(tmp_path / 'strip.png'), SPEC)
    assert out.shape == (224, 224, 3)
    assert set(np.unique(out)) == {99, 100}  # the source's rows (columns) 9999.56 to 10000.44


def test_the_crop_of_a_column_does_not_depend_on_its_height():
    """Pillow takes the resize box in float32: rows beyond 2**24 would lose their fraction."""
    short, tall = strip(2000), strip(20_000_000)
    tall.paste(short.crop((0, 900, 1, 1100)), (0, 9_999_900))  # same middle rows
    np.testing.assert_array_equal(eval_transform(tall, SPEC), eval_transform(short, SPEC))


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason="reads Linux's /proc")
def test_an_extreme_aspect_ratio_takes_the_memory_of_the_crop(tmp_path):
    """Peak memory (VmHWM: ru_maxrss would count pytest's, inherited through exec) of the transform
    in a fresh process. Resizing the whole 1 x 20000 image before cropping would take
    73 x 1460000 RGBX pixels, 426 MB, for a 64-pixel crop."""
    strip(20000).save(tmp_path / 'strip.png')
    script = f"""
import json
from effnetv2_jax.transforms import eval_transform, open_image
def peak_kib():
    return next(int(line.split()[1]) for line in open('/proc/self/status') if 'VmHWM' in line)
image = open_image({str(tmp_path / 'strip.png')!r})
before = peak_kib()
crop = eval_transform(image, {json.dumps({**SPEC, 'size': 64})})
print(json.dumps([peak_kib() - before, crop.shape]))
"""
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            check=True)
    growth_kib, shape = json.loads(result.stdout)
    assert shape == [64, 64, 3]
    assert growth_kib < 16 * 1024  # 16 MB: the process's noise, not the image's


def test_images_up_to_12_to_1_are_torchvisions_crop_exactly():
    image = Image.fromarray(photos()[2]).crop((0, 235, 512, 277))  # 512 x 42, the astronaut's
    reference = T.Compose([T.Resize(256), T.CenterCrop(224)])
    np.testing.assert_array_equal(eval_transform(image, SPEC), np.asarray(reference(image)))


@pytest.mark.parametrize('interpolation', ['bilinear', 'bicubic'])
def test_beyond_12_to_1_the_crop_is_within_2_levels_of_torchvisions(interpolation):
    """Only the crop's region is resampled, with float32 box coordinates: filter weights move by
    about 1e-7, so a value may round one level apart in each of the two passes. Measured here:
    206 (bilinear) and 49 (bicubic) of the 150528 values 1 apart; on random strips, rarely 2."""
    image = Image.fromarray(photos()[1]).crop((0, 200, 600, 218))  # 600 x 18, the coffee's
    mode = T.InterpolationMode(interpolation)
    reference = np.asarray(T.Compose([T.Resize(256, mode), T.CenterCrop(224)])(image))
    out = eval_transform(image, {**SPEC, 'interpolation': interpolation})
    assert np.abs(out.astype(int) - reference).max() <= 2


# --- the decompression-bomb limit --------------------------------------------------------------

@pytest.mark.parametrize('side', [11, 30])  # 110 pixels: PIL warns; 900, over twice: PIL raises
def test_files_over_the_pixel_limit_are_one_clear_error(tmp_path, monkeypatch, recwarn, side):
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)
    Image.new('RGB', (10, side)).save(tmp_path / 'big.png')
    with pytest.raises(ValueError) as error:
        open_image(tmp_path / 'big.png')
    assert str(error.value) == (f"cannot read image {tmp_path / 'big.png'}: more than 100 pixels, "
                                "PIL's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS)")
    assert len(recwarn) == 0


def test_files_at_the_pixel_limit_are_read(tmp_path, monkeypatch, recwarn):
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)
    Image.new('RGB', (10, 10)).save(tmp_path / 'limit.png')
    assert open_image(tmp_path / 'limit.png').size == (10, 10)
    assert len(recwarn) == 0
