"""The value codecs byte by byte, against hand-computed encodings: blockwise absmax int8
(values, scales, a short last block, an all-zero block), fp16/bf16/fp32 as IEEE bits,
the files and manifest fields each codec names, and the registry."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from fleet.codec.codecs import CODECS, codec_for, le_bytes


def _f32(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


# Three blocks of 4: absmax 127 (scale 1), 254 (scale 2), and a short last block whose
# absmax is 12.7 (scale float32(12.7) / 127); no value falls on a rounding tie.
X = [127.0, -50.0, 3.4, 0.0, 254.0, 11.0, -254.0, 1.2, -12.7, 6.3]
Q = [127, -50, 3, 0, 127, 6, -127, 1, -127, 63]
SCALES = [1.0, 2.0, float(np.float32(np.float32(12.7) / np.float32(127.0)))]


def test_int8_is_blockwise_absmax_by_hand():
    codec = codec_for("int8", 4)
    values, scales = (bytes(p) for p in codec.encode(torch.tensor(X)))
    assert values == struct.pack("<10b", *Q)
    assert scales == _f32(SCALES)
    out = torch.full((12,), 99.0)
    got = codec.decode_into([values, scales], out)
    expected = [q * SCALES[i // 4] for i, q in enumerate(Q)]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    assert got.data_ptr() == out.data_ptr() and got.numel() == 10
    assert out[10:].tolist() == [99.0, 99.0], "only the first k values are written"


def test_int8_of_an_all_zero_block_is_zero_with_scale_zero():
    codec = codec_for("int8", 4)
    block = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -2.0, 0.0, 0.0])
    values, scales = (bytes(p) for p in codec.encode(block))
    assert values == bytes(4) + struct.pack("<4b", 64, -127, 0, 0)
    assert scales == _f32([0.0, float(np.float32(2.0) / np.float32(127.0))])
    assert codec.round_trip(block)[:4].tolist() == [0.0] * 4


def test_int8_decodes_blocks_whole_and_short():
    codec = codec_for("int8", 2)
    values = struct.pack("<5b", 1, -2, 3, 4, -5)
    scales = _f32([0.5, 2.0, 10.0])
    got = codec.decode_into([values, scales], torch.empty(5))
    assert got.tolist() == [0.5, -1.0, 6.0, 8.0, -50.0]


@pytest.mark.parametrize(("name", "fmt"), [("fp32", "<4f"), ("fp16", "<4e")])
def test_float_codecs_are_ieee_little_endian(name, fmt):
    x = [1.5, -2.0, 0.15625, 65504.0]
    codec = codec_for(name)
    (data,) = codec.encode(torch.tensor(x))
    assert bytes(data) == struct.pack(fmt, *x)
    assert codec.decode_into([bytes(data)], torch.empty(4)).tolist() == x


def test_bf16_is_the_top_half_of_float32():
    x = [1.5, -2.0, 0.15625, 3.0e38]  # exact in bfloat16 (8 bits of mantissa)
    x = [float(torch.tensor(v).to(torch.bfloat16).float()) for v in x]
    codec = codec_for("bf16")
    (data,) = codec.encode(torch.tensor(x))
    top = [struct.unpack("<I", struct.pack("<f", v))[0] >> 16 for v in x]
    assert bytes(data) == struct.pack("<4H", *top)
    assert codec.decode_into([bytes(data)], torch.empty(4)).tolist() == x


@pytest.mark.parametrize(
    ("dtype", "np_dtype"),
    [
        (torch.float32, "<f4"),
        (torch.float16, "<f2"),
        (torch.int16, "<i2"),
        (torch.int8, "<i1"),
        (torch.int32, "<i4"),
    ],
)
def test_le_bytes_are_numpys_little_endian_bytes(dtype, np_dtype):
    t = torch.tensor([[1, -2, 3], [4, 5, -6]], dtype=dtype).t()  # not contiguous
    assert bytes(le_bytes(t)) == np.ascontiguousarray(t.numpy()).astype(np_dtype).tobytes()


def test_le_bytes_of_bfloat16_are_its_bits():
    t = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    assert bytes(le_bytes(t)) == struct.pack("<2H", 0x3F80, 0xC000)


@pytest.mark.parametrize(
    ("name", "block_size", "count", "files", "fields", "align"),
    [
        ("fp32", 256, 10, [("values.bin", 40)], {}, 1),
        ("fp16", 256, 10, [("values.bin", 20)], {}, 1),
        ("bf16", 64, 10, [("values.bin", 20)], {}, 1),
        (
            "int8",
            4,
            10,
            [("values.bin", 10), ("scales.f32le", 12)],
            {"block_size": 4, "scales_file": "scales.f32le"},
            4,
        ),
        ("int8", 256, 0, [("values.bin", 0), ("scales.f32le", 0)], None, 256),
    ],
)
def test_each_codec_names_its_files_and_fields(name, block_size, count, files, fields, align):
    codec = codec_for(name, block_size)
    assert codec.name == name and codec.block_size == block_size and codec.align == align
    assert codec.files(count) == files
    assert codec.encoded_bytes(count) == sum(n for _, n in files)
    if fields is not None:
        assert codec.manifest_fields() == fields


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16", "int8"])
def test_round_trip_is_encode_then_decode(name):
    codec = codec_for(name, 4)
    block = torch.tensor(X)
    parts = [bytes(p) for p in codec.encode(block)]
    got = codec.round_trip(block)
    assert torch.equal(got, codec.decode_into(parts, torch.empty(10)))
    assert got.data_ptr() != block.data_ptr() and torch.equal(block, torch.tensor(X))


def test_the_registry_and_its_refusals():
    assert sorted(CODECS) == ["bf16", "fp16", "fp32", "int8", "topk"]
    assert (
        repr(codec_for("fp16")) == "FP16()" and repr(codec_for("int8", 8)) == "INT8(block_size=8)"
    )
    for block_size in (1, 2, 1 << 16):
        assert codec_for("int8", block_size).block_size == block_size
    assert codec_for("int8").block_size == 256
    with pytest.raises(
        ValueError, match=r"no codec 'int4' \(known: bf16, fp16, fp32, int8, topk\)"
    ):
        codec_for("int4")
    for block_size in (0, -4, 3, 6, 255):
        with pytest.raises(ValueError, match=f"power of two, got {block_size}"):
            codec_for("int8", block_size)
