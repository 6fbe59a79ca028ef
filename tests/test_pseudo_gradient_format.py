"""The pseudo-gradient pack format, in process: its values_digest recomputed from the
files, each bad manifest refused with the typed error naming the file and the key, the
writer's alignment rule and typed write errors, and a reader that checks finiteness by
default, survives short reads and names a truncated file."""

from __future__ import annotations

import errno
import io
import json
from pathlib import Path

import pytest
import torch
import xxhash

from fleet.codec import write_pack
from fleet.codec.codecs import codec_for
from fleet.codec.pseudo_gradient import (
    PseudoGradientReader,
    PseudoGradientSink,
    parse_pseudo_gradient_manifest,
    writing_pseudo_gradient,
)
from fleet.codec.readers import open_reader
from fleet.errors import (
    DigestMismatchError,
    ManifestError,
    NonFiniteValuesError,
    StorageFullError,
    UnknownPackFormatError,
    ValuesLengthError,
)

P = 1000


@pytest.fixture
def like(tmp_path):
    return write_pack(tmp_path / "global", {"w": torch.zeros(P)}, "schema")


def _write(path: Path, like, codec: str, values: torch.Tensor, block_size: int = 64) -> Path:
    with writing_pseudo_gradient(path, like, codec_for(codec, block_size)) as sink:
        for start in range(0, P, 128):
            sink.write(values[start : start + 128])
    return path


def _values(seed: int = 0) -> torch.Tensor:
    return torch.randn(P, generator=torch.Generator().manual_seed(seed))


def _digest(*files: Path) -> str:
    """xxh3_64 over each file's xxh3_64 (8 bytes), two files' worth (none: no bytes)."""
    digests = [xxhash.xxh3_64(f.read_bytes()).digest() for f in files]
    digests += [xxhash.xxh3_64(b"").digest()] * (2 - len(digests))
    return "xxh3_64:" + xxhash.xxh3_64(b"".join(digests)).hexdigest()


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8"])
def test_the_values_digest_is_recomputed_from_the_files(tmp_path, like, codec):
    path = _write(tmp_path / "pg", like, codec, _values())
    files = [path / "values.bin"] + ([path / "scales.f32le"] if codec == "int8" else [])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["values_digest"] == _digest(*files)
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["manifest.json", *(f.name for f in files)]
    )


def _raw(tmp_path: Path, like, codec: str = "int8") -> dict:
    path = _write(tmp_path / f"raw-{codec}", like, codec, _values())
    return json.loads((path / "manifest.json").read_text())


@pytest.mark.parametrize("raw", [["not", "a", "dict"], {"format": "fleet-pseudo-gradient-v2"}])
def test_another_format_is_an_unknown_format_error_naming_it(raw):
    with pytest.raises(UnknownPackFormatError) as info:
        parse_pseudo_gradient_manifest(raw, "somewhere/manifest.json")
    assert info.value.path == "somewhere/manifest.json"
    assert info.value.expected == "fleet-pseudo-gradient-v1"
    assert info.value.format == str(raw.get("format") if isinstance(raw, dict) else None)


@pytest.mark.parametrize(
    ("codec", "changes", "key", "detail"),
    [
        ("int8", {"values_digest": ...}, "values_digest", "required"),
        ("int8", {"parameter_count": "1000"}, "parameter_count", "integer"),
        ("int8", {"codec": "int4"}, "codec", "unknown codec 'int4'"),
        ("int8", {"layout": [5]}, "layout.0", "dictionary"),  # a nested key, by its path
        ("int8", {"block_size": 48}, "block_size", "power of two"),
        ("int8", {"block_size": ...}, "block_size", "int8 needs block_size and scales_file"),
        ("int8", {"scales_file": ...}, "block_size", "int8 needs block_size and scales_file"),
        ("int8", {"values_file": "../values.bin"}, "values_file", "not a plain file name"),
        ("int8", {"values_file": "a/b"}, "values_file", "not a plain file name"),
        ("int8", {"values_file": ""}, "values_file", "not a plain file name"),
        ("int8", {"scales_file": "."}, "values_file", "not a plain file name"),
        ("int8", {"scales_file": ".."}, "values_file", "not a plain file name"),
        ("int8", {"values_file": "v.bin"}, "values_file", "int8 codec writes"),
        ("fp16", {"scales_file": "scales.f32le"}, "values_file", "fp16 codec writes"),
    ],
)
def test_a_bad_manifest_is_a_manifest_error_naming_the_key(
    tmp_path, like, codec, changes, key, detail
):
    raw = _raw(tmp_path, like, codec)
    for name, value in changes.items():
        if value is ...:
            del raw[name]
        else:
            raw[name] = value
    with pytest.raises(ManifestError) as info:
        parse_pseudo_gradient_manifest(raw, "here/manifest.json")
    assert info.value.path == "here/manifest.json"
    assert info.value.key == key
    assert detail in info.value.detail


def test_a_bad_manifest_on_disk_names_its_file(tmp_path, like):
    path = _write(tmp_path / "pg", like, "int8", _values())
    raw = json.loads((path / "manifest.json").read_text())
    raw["block_size"] = 3
    (path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError) as info:
        open_reader(path)
    assert info.value.path == f"{path}/manifest.json" and info.value.key == "block_size"


def test_only_the_last_block_may_be_unaligned(tmp_path, like):
    unaligned = "only the last block may hold other than 64k values"
    with (
        pytest.raises(ValueError, match=unaligned),
        writing_pseudo_gradient(tmp_path / "pg", like, codec_for("int8", 64)) as sink,
    ):
        sink.write(torch.zeros(100))
        sink.write(torch.zeros(900))
    assert not (tmp_path / "pg").exists()


class _Full(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_a_storage_full_error_naming_the_pack():
    sink = PseudoGradientSink([_Full()], codec_for("fp16"), "runs/j/pg")
    with pytest.raises(StorageFullError) as info:
        sink.write(torch.zeros(8))
    assert info.value.path == "runs/j/pg" and info.value.errno == errno.ENOSPC


class _Trickle(io.RawIOBase):
    """A file that hands out at most 3 bytes a read (a remote store's short reads)."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = 3 if n < 0 else min(n, 3)
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out


def _reader(path: Path, **kwargs) -> PseudoGradientReader:
    with open_reader(path) as probe:
        manifest = probe.manifest
    files = [_Trickle((path / name).read_bytes()) for name, _ in manifest.files()]
    return PseudoGradientReader(manifest, files, str(path), **kwargs)


def test_short_reads_give_the_same_values_and_digest(tmp_path, like):
    path = _write(tmp_path / "pg", like, "int8", _values())
    with open_reader(path) as direct:
        expected = direct.read_into(torch.empty(P)).clone()
    reader = _reader(path)
    got = torch.empty(P)
    for start in range(0, P, 256):
        reader.read_into(got[start : start + 256])
    reader.finish()  # the digest of what was read matches
    assert torch.equal(got, expected)


def test_the_reader_refuses_non_finite_values_unless_told_not_to(tmp_path, like):
    values = _values()
    values[[5, 700]] = 1e6  # past fp16's range: infinite once encoded
    path = _write(tmp_path / "pg", like, "fp16", values)
    reader = _reader(path)
    reader.read_into(torch.empty(P // 2))  # one in each half: counted over the blocks
    reader.read_into(torch.empty(P // 2))
    with pytest.raises(NonFiniteValuesError) as info:
        reader.finish()
    assert info.value.count == 2 and str(path) in info.value.path
    quiet = _reader(path, check_finite=False)
    assert int(torch.isinf(quiet.read_into(torch.empty(P))).sum()) == 2
    quiet.finish()


def test_a_truncated_file_is_a_values_length_error_naming_it(tmp_path, like):
    path = _write(tmp_path / "pg", like, "int8", _values())
    with open_reader(path) as probe:
        manifest = probe.manifest
    values = (path / "values.bin").read_bytes()[:500]
    files = [_Trickle(values), _Trickle((path / "scales.f32le").read_bytes())]
    reader = PseudoGradientReader(manifest, files, str(path))
    with pytest.raises(ValuesLengthError) as info:
        reader.read_into(torch.empty(P))
    assert info.value.path == f"{path}/values.bin"
    assert (info.value.expected_bytes, info.value.actual_bytes) == (P, 500)


def _corrupt(tmp_path: Path, like) -> Path:
    path = _write(tmp_path / "pg", like, "int8", _values())
    data = bytearray((path / "values.bin").read_bytes())
    data[321] ^= 0x04
    (path / "values.bin").write_bytes(bytes(data))
    return path


def test_a_flipped_byte_is_a_digest_mismatch_with_both_digests(tmp_path, like):
    path = _corrupt(tmp_path, like)
    recorded = json.loads((path / "manifest.json").read_text())["values_digest"]
    with pytest.raises(DigestMismatchError) as info, open_reader(path) as reader:
        reader.read_into(torch.empty(P))
    assert info.value.path == f"{path}/values.bin"
    assert info.value.expected == recorded
    assert info.value.actual == _digest(path / "values.bin", path / "scales.f32le")


def test_only_a_reader_left_cleanly_after_the_last_value_checks(tmp_path, like):
    path = _corrupt(tmp_path, like)
    with open_reader(path) as reader:  # not every value read: nothing to check yet
        reader.read_into(torch.empty(P // 2))
    # an error inside the block is not replaced
    with pytest.raises(KeyError), open_reader(path) as reader:
        reader.read_into(torch.empty(P))
        raise KeyError("the caller's own error")
