"""Images as files arrive: high bit depths scaled to 8 bits, not clipped."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from effnetv2_jax.transforms import open_image, to_rgb


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
