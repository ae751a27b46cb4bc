"""DICOM reading: every photometric interpretation, bit depth, transfer syntax and window gives bright = bone."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from kneeoa.errors import DataError
from kneeoa.formats.dicom import ENCODINGS, is_dicom, read_dicom, write_dicom


@pytest.fixture(scope="module")
def ramp() -> np.ndarray:
    """A left-to-right ramp with a bright 'bone' block: dark background, bright bone."""
    img = np.tile(np.linspace(0.1, 0.6, 48, dtype=np.float32), (40, 1))
    img[10:30, 20:30] = 0.95
    return img


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_every_transfer_syntax_and_photometric_reads_bright_bone(tmp_path, ramp, encoding, photometric):
    path = write_dicom(ramp, tmp_path / "f.dcm", spacing_mm=0.143, photometric=photometric, bits=12,
                       encoding=encoding)
    stored = pydicom.dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == ENCODINGS[encoding][0]
    d = read_dicom(path)
    assert d.photometric == photometric and d.bits_stored == 12 and not d.windowed
    assert d.image.dtype == np.float32 and d.image.min() >= 0 and d.image.max() <= 1
    assert _corr(d.image, ramp) > 0.999  # positive: MONOCHROME1 was inverted back
    assert d.image[20, 25] > d.image[20, 5] + 0.5
    assert d.pixel_spacing_mm == pytest.approx((0.143, 0.143))


@pytest.mark.parametrize("bits", [8, 16])
def test_8_and_16_bit(tmp_path, ramp, bits):
    d = read_dicom(write_dicom(ramp, tmp_path / "f.dcm", spacing_mm=0.2, bits=bits))
    assert pydicom.dcmread(d.path).BitsAllocated == bits
    # The percentile stretch maps the 0.5-99.5 % range of the stored values onto [0, 1].
    lo, hi = np.percentile(ramp[::4, ::4], (0.5, 99.5))
    expected = np.clip((ramp - lo) / (hi - lo), 0, 1)
    assert np.abs(d.image - expected).max() < (0.02 if bits == 8 else 0.001)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_voi_window_from_file(tmp_path, photometric):
    ramp = np.tile(np.linspace(0, 1, 101), (4, 1))
    # Window centred on mid-grey, a quarter of the 12-bit range wide: values outside saturate.
    d = read_dicom(write_dicom(ramp, tmp_path / "w.dcm", spacing_mm=0.1, bits=12, photometric=photometric,
                               window=(2047.5, 1024)))
    assert d.windowed
    row = d.image[0]
    assert row[:35].max() == 0 and row[66:].min() == 1
    assert row[50] == pytest.approx(0.5, abs=0.01)
    assert np.all(np.diff(row) >= 0)


def test_pixel_spacing_fallback_and_missing(tmp_path, ramp):
    path = write_dicom(ramp, tmp_path / "a.dcm", spacing_mm=None)
    assert read_dicom(path).pixel_spacing_mm is None
    ds = pydicom.dcmread(path)
    ds.PixelSpacing = ["0.15", "0.16"]
    ds.save_as(path)
    assert read_dicom(path).pixel_spacing_mm == pytest.approx((0.15, 0.16))


def test_tags_are_read(tmp_path, ramp):
    path = write_dicom(ramp, tmp_path / "a.dcm", spacing_mm=0.1, laterality="L", body_part="KNEE",
                       series_description="Bilateral PA Fixed Flexion Knee", study_description="knee study")
    d = read_dicom(path)
    assert (d.laterality, d.body_part, d.series_description, d.study_description) == (
        "L", "KNEE", "Bilateral PA Fixed Flexion Knee", "knee study")


def test_corrupt_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    with pytest.raises(DataError, match="broken.dcm"):
        read_dicom(bad)


def test_truncated_pixel_data(tmp_path, ramp):
    path = write_dicom(ramp, tmp_path / "cut.dcm", spacing_mm=0.1, encoding="rle")
    path.write_bytes(path.read_bytes()[:-400])
    with pytest.raises(DataError, match="cut.dcm"):
        read_dicom(path)


def test_non_image_dicom(tmp_path, ramp):
    path = write_dicom(ramp, tmp_path / "sr.dcm", spacing_mm=0.1)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(DataError, match="no PixelData"):
        read_dicom(path)


def test_colour_dicom_is_rejected(tmp_path, ramp):
    path = write_dicom(ramp, tmp_path / "rgb.dcm", spacing_mm=0.1)
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "RGB"
    ds.save_as(path)
    with pytest.raises(DataError, match="grayscale"):
        read_dicom(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_dicom(tmp_path / "nope.dcm")


def test_is_dicom_without_suffix(tmp_path, ramp):
    path = write_dicom(ramp, tmp_path / "001", spacing_mm=0.1)
    (tmp_path / "x.png").write_bytes(b"\x89PNG....")
    assert is_dicom(path) and not is_dicom(tmp_path / "x.png")


def test_unknown_encoding(tmp_path, ramp):
    with pytest.raises(DataError, match="Unknown DICOM encoding 'jpeg9'"):
        write_dicom(ramp, tmp_path / "a.dcm", spacing_mm=0.1, encoding="jpeg9")
