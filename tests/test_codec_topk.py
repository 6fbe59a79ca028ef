"""The sparse ``topk`` codec (SparseLoCo, arXiv:2508.15706; docs/protocol.md section
4.4): its bytes against what ``files()`` says, the k largest ``|x|`` per block kept
with their signs and zeros elsewhere, the 2-bit levels byte by byte against a
hand-computed block, error feedback conveying a constant signal over rounds, every
malformed pack refused with a typed CodecError, and a DiLoCo job on real workers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from fleet.codec import read_pack, write_pack
from fleet.codec.codecs import TOPK, codec_for
from fleet.codec.pack import write_values_pack
from fleet.codec.pseudo_gradient import parse_pseudo_gradient_manifest, writing_pseudo_gradient
from fleet.codec.readers import open_reader
from fleet.diloco import DiLoCoConfig, DiLoCoRun, OuterOptimizerConfig
from fleet.diloco.config import PseudoGradientConfig
from fleet.diloco.exchange import publish_pseudo_gradient
from fleet.diloco.state import RoundRecord
from fleet.errors import CodecError, ManifestError, NonFiniteValuesError, ValuesLengthError
from tests.harness import DIGITS

P = 50_021  # not a multiple of any block: every pack ends with a short block


def _f32(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


@pytest.fixture(scope="module")
def like(tmp_path_factory):
    d = tmp_path_factory.mktemp("topk")
    return write_pack(d / "global", {"w": torch.zeros(P)}, "schema")


def _write(path: Path, like, codec: TOPK, x: torch.Tensor) -> Path:
    with writing_pseudo_gradient(path, like, codec) as sink:
        for start in range(0, x.numel(), 1 << 14):
            sink.write(x[start : start + (1 << 14)])
    return path


def _read(path: Path, chunk: int = P) -> torch.Tensor:
    out = torch.empty(P)
    with open_reader(path, check_finite=True) as reader:
        block = torch.empty(chunk)
        at = 0
        while reader.remaining:
            got = reader.read_into(block)
            out[at : at + got.numel()] = got
            at += got.numel()
    return out


# --------------------------------------------------------------------------- the format


@pytest.mark.parametrize(
    ("block_size", "per_block", "per_param"),
    [(4096, 456, 456 / 4096), (256, 28, 28 / 256), (1024, 104, 104 / 1024)],
)
def test_the_bytes_per_parameter_are_what_files_says_and_encode_writes(
    tmp_path, like, block_size, per_block, per_param
):
    """A full block of C values keeps C/16: ``ceil(k log2(C) / 8)`` bytes of indices,
    ``ceil(k / 4)`` of 2-bit codes and 8 of scales (456 bytes at C = 4096: 0.111 bytes
    per parameter; 0.109 at C = 256); a short last block keeps its share. ``files()``
    gives, for every length, exactly the bytes ``encode()`` returns and a written pack
    holds on disk."""
    codec = codec_for("topk", block_size)
    assert isinstance(codec, TOPK) and codec.top_k == block_size // 16
    assert codec.encoded_bytes(10 * block_size) == 10 * per_block
    assert codec.encoded_bytes(10 * block_size) / (10 * block_size) == pytest.approx(per_param)
    assert per_param <= 0.15
    torch.manual_seed(0)
    for n in (0, 1, 3, block_size - 1, block_size, block_size + 1, 3 * block_size + 77, P):
        parts = codec.encode(torch.randn(n))
        assert [len(p) for p in parts] == [size for _, size in codec.files(n)], n
    x = torch.randn(P)
    path = _write(tmp_path / "pg", like, codec, x)
    for name, size in codec.files(P):
        assert (path / name).stat().st_size == size
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["codec"] == "topk" and manifest["block_size"] == block_size
    assert manifest["top_k"] == block_size // 16 and manifest["scales_file"] == "scales.f32le"
    # the reader takes the pack in chunks of any multiple of the block, and gives the
    # sink's round trip
    assert torch.equal(_read(path, block_size), codec.round_trip(x))
    assert torch.equal(_read(path, 4 * block_size), codec.round_trip(x))


@pytest.mark.parametrize("block_size", [256, 4096])
def test_the_round_trip_keeps_the_k_largest_magnitudes_with_their_signs(block_size):
    """Per block exactly the top_k largest |x| decode to nonzero values, each with its
    sign and one of its block's two scales; every other value decodes to zero."""
    torch.manual_seed(1)
    x = torch.randn(P) * torch.logspace(-3, 0, P)  # distinct magnitudes over 3 decades
    codec = codec_for("topk", block_size)
    assert isinstance(codec, TOPK)
    got = codec.round_trip(x)
    starts = range(0, P, block_size)
    kept_total = 0
    for start in starts:
        block, decoded = x[start : start + block_size], got[start : start + block_size]
        k = codec.kept(block.numel())
        top = set(torch.topk(block.abs(), k).indices.tolist())
        assert set(decoded.nonzero().view(-1).tolist()) == top
        idx = sorted(top)
        assert torch.equal(torch.sign(decoded[idx]), torch.sign(block[idx]))
        assert len(set(decoded[idx].abs().tolist())) <= 2  # the two levels
        kept_total += k
    assert int((got != 0).sum()) == kept_total
    assert kept_total == (P // block_size) * codec.top_k + codec.kept(P % block_size)
    assert codec.kept(P % block_size) == -(-(P % block_size) * codec.top_k // block_size)


def test_the_two_bit_levels_by_hand():
    """C = 16, top_k = 4, a full block and a short one of 5 values (which keeps
    ceil(5 * 4 / 16) = 2). Full block: |x| ranks 5, 3 (high, mean 4) and 2, 1 (low,
    mean 1.5) at indices 1, 3, 11, 6; 4-bit indices, ascending, packed low nibble first:
    0x31, 0xB6; codes (bit 0 sign, bit 1 high) 3, 2, 1, 0 packed from the low bits:
    0x1B. Short block: 7 (high) at 1 and -0.5 (low) at 3: 0x31 and codes 2, 1: 0x06."""
    full = [0.1, -5.0, 0.2, 3.0, 0.0, 0.0, -1.0, 0.3, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]
    short = [0.0, 7.0, 0.0, -0.5, 0.25]
    codec = codec_for("topk", 16, top_k=4)
    values, scales = (bytes(p) for p in codec.encode(torch.tensor(full + short)))
    assert values == bytes([0x31, 0xB6, 0x1B, 0x31, 0x06])
    assert scales == _f32([1.5, 4.0, 0.5, 7.0])
    out = torch.full((23,), 99.0)
    got = codec.decode_into([values, scales], out[:21])
    expected = [0.0] * 21
    expected[1], expected[3], expected[6], expected[11] = -4.0, 4.0, -1.5, 1.5
    expected[16 + 1], expected[16 + 3] = 7.0, -0.5
    assert got.tolist() == expected
    assert out[21:].tolist() == [99.0, 99.0], "only the k values asked for are written"
    # one value kept: its own magnitude is the high level, the low level is 0
    one = codec_for("topk", 16, top_k=1)
    values, scales = (bytes(p) for p in one.encode(torch.tensor(full)))
    assert values == bytes([0x01, 0x03]) and scales == _f32([0.0, 5.0])


def test_the_registry_and_its_refusals():
    assert repr(codec_for("topk", 4096)) == "TOPK(block_size=4096, top_k=256)"
    assert codec_for("topk", 8).top_k == 1  # C / 16, at least one
    assert codec_for("topk", 16, top_k=16).files(16) == [("values.bin", 12), ("scales.f32le", 8)]
    for top_k in (0, 17):
        with pytest.raises(ValueError, match="top_k must be 1 to block_size 16"):
            codec_for("topk", 16, top_k=top_k)
    with pytest.raises(ValueError, match="top_k is for the topk codec, not int8"):
        codec_for("int8", 16, top_k=4)
    with pytest.raises(ValueError, match="power of two"):
        codec_for("topk", 48)
    assert PseudoGradientConfig(codec="topk").spec().codec == "topk"


# --------------------------------------------------------------------------- error feedback


def test_error_feedback_conveys_a_constant_signal(tmp_path):
    """The same pseudo-gradient g every round, through the exchange (the residual a v1
    pack between rounds, as on a worker): without feedback only each block's top 1/16
    is ever sent (the mean sent stays ~82 % off g); with it the residual carries the
    rest in full, and the sum of what was sent approaches the sum of g (the gap is the
    last residual, bounded, so the mean's error falls as 1 / rounds)."""
    n = 3 * 4096 + 501
    small = write_pack(tmp_path / "like", {"w": torch.zeros(n)}, "schema")
    torch.manual_seed(3)
    g = torch.randn(n) * 1e-3
    theta = torch.zeros(n)
    write_values_pack(tmp_path / "theta", theta, small)
    write_values_pack(tmp_path / "local", theta - g, small)
    codec = codec_for("topk", 4096)
    errors: dict[bool, list[float]] = {False: [], True: []}
    for feedback in (False, True):
        residual, sent = None, torch.zeros(n)
        for r in range(1, 65):
            d = tmp_path / f"{feedback}-{r}"
            out_res = d / "residual" if feedback else None
            publish_pseudo_gradient(
                tmp_path / "theta",
                tmp_path / "local",
                d / "pg",
                codec,
                residual=residual,
                out_residual=out_res,
            )
            with open_reader(d / "pg", check_finite=True) as reader:
                sent += reader.read_into(torch.empty(n))
            residual = out_res
            if r in (16, 32, 64):
                errors[feedback].append(float((sent - r * g).norm() / (r * g).norm()))
    assert all(e > 0.8 for e in errors[False])
    assert errors[True][0] < 0.45 and errors[True][1] < 0.25 and errors[True][2] < 0.13
    assert errors[True][2] < errors[True][1] / 1.6 < errors[True][0] / 1.6**2
    last = read_pack(tmp_path / "True-64" / "residual")[1]
    assert torch.allclose(64 * g - sent, last, atol=1e-5), "the residual is the gap"
    assert float(last.abs().max()) < 5 * float(g.abs().max()), "and it stays bounded"


# --------------------------------------------------------------------------- malformed packs


def test_a_malformed_topk_pack_gets_a_typed_codec_error(tmp_path, like):
    """Bytes no encoder writes are refused while read, by file, before the digest is
    checked: a truncated file (ValuesLengthError, up front or in decode), a non-finite
    scale (NonFiniteValuesError), an index beyond its short block or indices out of
    order (CodecError); a manifest without top_k, or with one beyond its block
    (ManifestError)."""
    codec = codec_for("topk", 256)
    x = torch.randn(P)
    good = _write(tmp_path / "good", like, codec, x)
    files = dict(codec.files(P))

    def copy(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        for f in good.iterdir():
            (path / f.name).write_bytes(f.read_bytes())
        return path

    short = copy("short")  # one byte missing: refused before any value is read
    (short / "values.bin").write_bytes((good / "values.bin").read_bytes()[:-1])
    with pytest.raises(ValuesLengthError) as info:
        open_reader(short)
    assert info.value.path == f"{short}/values.bin"
    assert (info.value.expected_bytes, info.value.actual_bytes) == (
        files["values.bin"],
        files["values.bin"] - 1,
    )
    parts = [(good / "values.bin").read_bytes(), (good / "scales.f32le").read_bytes()]
    with pytest.raises(ValuesLengthError) as info:  # in memory: parts of the wrong size
        codec.decode_into([parts[0], parts[1][:-4]], torch.empty(P), where="mem")
    assert info.value.path == "mem/scales.f32le"

    nan = copy("nan")  # the low scale of the last block: no decoded value shows it
    scales = bytearray(parts[1])
    scales[-8:-4] = _f32([float("nan")])
    (nan / "scales.f32le").write_bytes(bytes(scales))
    with pytest.raises(NonFiniteValuesError) as nan_info, open_reader(nan) as reader:
        reader.read_into(torch.empty(P))
    assert nan_info.value.path == f"{nan}/scales.f32le" and nan_info.value.count == 1

    # the last block holds P % 256 = 101 values and keeps 7, indices 8 bits each, then
    # 2 bytes of codes: its seventh index byte is its last index; 200 is beyond its 101
    assert codec.kept(P % 256) == 7
    beyond = copy("beyond")
    values = bytearray(parts[0])
    tail = codec._record_bytes(7)
    assert tail == 7 + 2
    values[-tail + 6] = 200
    (beyond / "values.bin").write_bytes(bytes(values))
    match = "topk index 200 in a block of 101 values"
    with pytest.raises(CodecError, match=match) as error, open_reader(beyond) as reader:
        reader.read_into(torch.empty(P))
    assert error.value.path == f"{beyond}/values.bin"
    values[-tail + 6] = values[-tail + 5]  # the same index twice
    with pytest.raises(CodecError, match="not strictly ascending"):
        codec.decode_into([bytes(values), parts[1]], torch.empty(P))
    first = bytearray(parts[0])  # the first block's first two indices swapped
    first[0], first[1] = first[1], first[0]
    with pytest.raises(CodecError, match="not strictly ascending"):
        codec.decode_into([bytes(first), parts[1]], torch.empty(P))

    raw = json.loads((good / "manifest.json").read_text())
    for changes, key, detail in (
        ({"top_k": None}, "block_size", "topk needs block_size, top_k and scales_file"),
        ({"scales_file": None}, "block_size", "topk needs block_size, top_k and scales_file"),
        ({"top_k": 257}, "top_k", "top_k must be 1 to block_size 256"),
        ({"top_k": 0}, "top_k", "greater than or equal to 1"),
        ({"block_size": 96}, "block_size", "power of two"),
    ):
        bad = {k: v for k, v in (raw | changes).items() if v is not None}
        with pytest.raises(ManifestError) as manifest_info:
            parse_pseudo_gradient_manifest(bad, "here/manifest.json")
        assert manifest_info.value.key == key and detail in manifest_info.value.detail


# --------------------------------------------------------------------------- on the fleet


def test_a_diloco_job_with_topk_pseudo_gradients_on_workers(fleet, two_workers):
    """Three rounds of two replicas on the session's workers with
    ``pseudo_gradient.codec = "topk"``: each replica publishes a topk pack of exactly
    the bytes its codec names (top_k of each block kept), carries its residual on its
    worker into the next round, and the outer step applies the decoded packs: the final
    global model is the initial one minus the weighted means of them (averaging, set
    here whatever the default). Losses are finite, and the eval loss falls each round."""
    root = fleet.shared
    deltas: dict[int, list[tuple[torch.Tensor, float]]] = {}
    codec = codec_for("topk", 256)
    assert isinstance(codec, TOPK)

    def keep_deltas(record: RoundRecord) -> None:
        deltas[record.round] = []
        for w in record.step.replicas:
            path = root.resolve(w.pack.path)
            manifest = json.loads((path / "manifest.json").read_text())
            assert manifest["codec"] == "topk" and manifest["top_k"] == codec.top_k
            count = manifest["parameter_count"]
            for name, size in codec.files(count):
                assert (path / name).stat().st_size == size
            with open_reader(path, check_finite=True) as reader:
                delta = reader.read_into(torch.empty(count)).clone()
            full, tail = divmod(count, 256)
            assert int((delta != 0).sum()) <= full * codec.top_k + codec.kept(tail)
            deltas[record.round].append((delta, w.weight))

    cfg = DiLoCoConfig(
        workload=DIGITS,
        replicas=2,
        rounds=3,
        inner_steps=15,
        outer=OuterOptimizerConfig(name="sgd", lr=1.0, momentum=0.0),
        pseudo_gradient=PseudoGradientConfig(codec="topk"),
    )
    run = DiLoCoRun.start(fleet, cfg, on_round=keep_deltas)
    job = run.run()
    assert job.status == "completed", job.error
    assert sorted(deltas) == [0, 1, 2]
    theta = read_pack(root.resolve(f"runs/{job.job_id}/checkpoint-0000/global"))[1]
    for r in range(3):
        total = sum(w for _, w in deltas[r])
        theta = theta - sum(d * (w / total) for d, w in deltas[r])
    final = read_pack(root.resolve(job.artifacts["final_pack"]))[1]
    assert torch.allclose(final, theta, atol=1e-6)
    records = run.rounds()
    assert [r.round for r in records] == [0, 1, 2]
    for record in records:
        assert [o.replica for o in record.merged] == [0, 1]
        assert record.eval is not None and record.eval.loss is not None
        assert torch.isfinite(torch.tensor(record.eval.loss))
        assert all(
            o.loss is not None and torch.isfinite(torch.tensor(o.loss)) for o in record.merged
        )
    losses = [r.eval.loss for r in records if r.eval is not None]
    # the sparse steps go downhill, every round (about 2.1, 1.5, 1.0 here)
    assert losses[0] > losses[1] > losses[2] and losses[2] < 0.75 * losses[0], losses
    # from round 1 each replica starts from the state (optimizer, residual) its worker kept
    assert all(o.state_source == "held" for r in records[1:] for o in r.merged)
