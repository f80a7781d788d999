"""Tests for kiln.compiler.weights: lazy checkpoint reading, weight-map checks, conversion."""

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from kiln.compiler.weights import Checkpoint, Progress, ProgressLine, Source, convert, plan
from kiln.runtime.errors import KilnError


def _save(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    safetensors.numpy.save_file(tensors, path)
    return path


def _rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _write_sharded(d: Path, shards: dict[str, dict[str, np.ndarray]]) -> None:
    weight_map = {}
    for fname, tensors in shards.items():
        _save(d / fname, tensors)
        weight_map.update(dict.fromkeys(tensors, fname))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


# A tiny "model": two layers, a norm and an embedding, split over two shards.
TINY = {
    "model.embed_tokens.weight": _rand(8, 4, seed=1),
    "model.layers.0.mlp.weight": _rand(4, 4, seed=2),
    "model.layers.1.mlp.weight": _rand(4, 4, seed=3),
    "model.norm.weight": _rand(4, seed=4),
}
TINY_PARAMS = {name.removeprefix("model."): arr.shape for name, arr in TINY.items()}
TINY_MAP = {name.removeprefix("model."): Source((name,)) for name in TINY}


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    d = tmp_path / "tiny"
    d.mkdir()
    names = list(TINY)
    _write_sharded(
        d,
        {
            "model-00001-of-00002.safetensors": {n: TINY[n] for n in names[:2]},
            "model-00002-of-00002.safetensors": {n: TINY[n] for n in names[2:]},
        },
    )
    return d


# -- Checkpoint -------------------------------------------------------------------------------


def test_single_file(tmp_path: Path) -> None:
    a, b = _rand(2, 3), _rand(5, seed=1)
    f = _save(tmp_path / "model.safetensors", {"b": b, "a": a})
    with Checkpoint(tmp_path) as ck:
        assert ck.names() == ["a", "b"]
        assert ck.shape("a") == (2, 3)
        assert ck.dtype("a") == "F32"
        assert ck.file_of("b") == f
        assert ck.files() == [f]
        np.testing.assert_array_equal(ck.read("a"), a)
        np.testing.assert_array_equal(ck.read("b"), b)


def test_several_files_without_index(tmp_path: Path) -> None:
    _save(tmp_path / "b.safetensors", {"y": _rand(2)})
    _save(tmp_path / "a.safetensors", {"x": _rand(3)})
    ck = Checkpoint(tmp_path)
    assert ck.files() == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    assert ck.file_of("y") == tmp_path / "b.safetensors"


def test_sharded_reading_keeps_one_handle(tiny: Path) -> None:
    ck = Checkpoint(tiny)
    assert ck.names() == sorted(TINY)
    assert [f.name for f in ck.files()] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert ck.file_of("model.norm.weight").name == "model-00002-of-00002.safetensors"
    for name in ["model.norm.weight", "model.embed_tokens.weight", "model.layers.1.mlp.weight"]:
        np.testing.assert_array_equal(ck.read(name), TINY[name])
        assert ck._fh_path == ck.file_of(name)  # only the owning shard is open
    ck.close()
    assert ck._fh is None


def test_dtypes_read_exactly(tmp_path: Path) -> None:
    # Values chosen to exercise rounding-sensitive bits: bf16 has 8 mantissa bits.
    base = torch.tensor([[1.0, -2.5, 3.140625], [1e-3, -65504.0, 0.0]])
    bf16 = base.to(torch.bfloat16)
    f16 = base.to(torch.float16)
    safetensors.torch.save_file(
        {"bf": bf16, "h": f16, "f": base, "scalar": torch.tensor(7.0, dtype=torch.bfloat16)},
        tmp_path / "model.safetensors",
    )
    ck = Checkpoint(tmp_path)
    assert (ck.dtype("bf"), ck.dtype("h"), ck.dtype("f")) == ("BF16", "F16", "F32")
    for name, t in [("bf", bf16), ("h", f16), ("f", base)]:
        got = ck.read(name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, t.float().numpy())
    assert ck.read("scalar").shape == ()
    assert ck.read("scalar") == 7.0


def test_unsupported_dtype(tmp_path: Path) -> None:
    f = _save(tmp_path / "model.safetensors", {"q": np.arange(4, dtype=np.int8)})
    with pytest.raises(KilnError, match=rf"tensor q in {f}.* dtype I8"):
        Checkpoint(tmp_path).read("q")


def test_truncated_file(tmp_path: Path) -> None:
    f = _save(tmp_path / "model.safetensors", {"w": _rand(16, 16)})
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(KilnError, match=rf"{f} is truncated or corrupt \({size - 10} bytes, "):
        Checkpoint(tmp_path)


def test_truncated_inside_header(tmp_path: Path) -> None:
    f = _save(tmp_path / "model.safetensors", {"w": _rand(4)})
    f.write_bytes(f.read_bytes()[:12])
    with pytest.raises(KilnError, match=rf"{f} is truncated or corrupt"):
        Checkpoint(tmp_path)


def test_garbage_header(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    junk = b"this is not json at all!"
    f.write_bytes(len(junk).to_bytes(8, "little") + junk)
    with pytest.raises(KilnError, match=rf"{f} is not a valid safetensors file.*re-download"):
        Checkpoint(tmp_path)


def test_huge_header_length(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(KilnError, match=rf"{f} is not a valid safetensors file"):
        Checkpoint(tmp_path)


def test_header_size_mismatch(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    f = tmp_path / "model.safetensors"
    f.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(KilnError, match=rf"{f}.*tensor w is F32 \[4\] but spans 8 bytes"):
        Checkpoint(tmp_path)


def test_pickle_only_dir(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(KilnError, match=r"pytorch_model\.bin.*never loads pickle.*safe_serial"):
        Checkpoint(tmp_path)


def test_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(KilnError, match=rf"no weights found in {tmp_path}"):
        Checkpoint(tmp_path)


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(KilnError, match="does not exist"):
        Checkpoint(tmp_path / "nope")


def test_index_names_missing_shard(tiny: Path) -> None:
    (tiny / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        KilnError, match=r"model\.safetensors\.index\.json names shard model-00002-of-00002"
    ):
        Checkpoint(tiny)


def test_index_disagrees_with_shard(tiny: Path) -> None:
    index_path = tiny / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(KilnError, match=r"tensor model\.norm\.weight is in model-00001.*disagree"):
        Checkpoint(tiny)


def test_garbage_index(tiny: Path) -> None:
    (tiny / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(KilnError, match="not a valid safetensors index"):
        Checkpoint(tiny)


def test_tensor_in_two_files(tmp_path: Path) -> None:
    _save(tmp_path / "a.safetensors", {"w": _rand(2)})
    _save(tmp_path / "b.safetensors", {"w": _rand(2)})
    with pytest.raises(KilnError, match=r"tensor w is in both .*a\.safetensors and .*b\.safet"):
        Checkpoint(tmp_path)


def test_model_safetensors_wins_over_other_files(tmp_path: Path) -> None:
    _save(tmp_path / "model.safetensors", {"w": _rand(2)})
    _save(tmp_path / "consolidated.safetensors", {"w": _rand(2)})
    assert Checkpoint(tmp_path).files() == [tmp_path / "model.safetensors"]


# -- plan -------------------------------------------------------------------------------------


def test_plan_orders_by_shard(tiny: Path) -> None:
    params = dict(reversed(list(TINY_PARAMS.items())))  # model order opposite to shard order
    order = plan(Checkpoint(tiny), params, TINY_MAP)
    assert order == [
        "layers.0.mlp.weight",
        "embed_tokens.weight",
        "norm.weight",
        "layers.1.mlp.weight",
    ]


def test_plan_unmapped_param(tiny: Path) -> None:
    params = {**TINY_PARAMS, "lm_head.weight": (8, 4)}
    with pytest.raises(KilnError, match=r"bug.*no source for model parameter.*lm_head\.weight"):
        plan(Checkpoint(tiny), params, TINY_MAP)


def test_plan_missing_source(tiny: Path) -> None:
    params = {**TINY_PARAMS, "lm_head.weight": (8, 4)}
    wmap = {**TINY_MAP, "lm_head.weight": Source(("lm_head.weight",))}
    with pytest.raises(
        KilnError, match=rf"lm_head\.weight .*not found in checkpoint {tiny}.*does not match"
    ):
        plan(Checkpoint(tiny), params, wmap)


def test_plan_source_used_twice(tiny: Path) -> None:
    params = {**TINY_PARAMS, "lm_head.weight": (8, 4)}
    wmap = {**TINY_MAP, "lm_head.weight": Source(("model.embed_tokens.weight",))}
    with pytest.raises(
        KilnError,
        match=r"model\.embed_tokens\.weight in .*model-00001-of-00002\.safetensors \(by "
        r"embed_tokens\.weight and lm_head\.weight\)",
    ):
        plan(Checkpoint(tiny), params, wmap)


def test_plan_unexpected_tensor(tiny: Path) -> None:
    params = {k: v for k, v in TINY_PARAMS.items() if k != "norm.weight"}
    wmap = {k: v for k, v in TINY_MAP.items() if k != "norm.weight"}
    with pytest.raises(
        KilnError,
        match=r"unexpected tensor model\.norm\.weight in .*model-00002-of-00002\.safetensors: "
        r"the checkpoint does not match config\.json \(or this architecture is not supported\)",
    ):
        plan(Checkpoint(tiny), params, wmap)


def test_plan_unexpected_tensors_listed(tmp_path: Path) -> None:
    _save(tmp_path / "model.safetensors", {f"t{i}": _rand(1) for i in range(8)})
    with pytest.raises(KilnError, match=r"unexpected tensors t0 in .*t4 in .* and 3 more"):
        plan(Checkpoint(tmp_path), {}, {})


def test_plan_ignore_regex(tmp_path: Path) -> None:
    _save(
        tmp_path / "model.safetensors",
        {"model.layers.0.self_attn.rotary_emb.inv_freq": _rand(2), **TINY},
    )
    ck = Checkpoint(tmp_path)
    with pytest.raises(KilnError, match=r"unexpected tensor .*rotary_emb\.inv_freq in .*model\.s"):
        plan(ck, TINY_PARAMS, TINY_MAP)
    # fullmatch: a pattern matching only a prefix must not hide the tensor.
    with pytest.raises(KilnError, match="unexpected tensor"):
        plan(ck, TINY_PARAMS, TINY_MAP, ignore=[r"model\.layers\.\d+\.self_attn"])
    order = plan(ck, TINY_PARAMS, TINY_MAP, ignore=[r".*\.rotary_emb\.inv_freq"])
    assert sorted(order) == sorted(TINY_PARAMS)


def test_plan_shape_mismatch(tiny: Path) -> None:
    params = {**TINY_PARAMS, "norm.weight": (5,)}
    with pytest.raises(
        KilnError,
        match=r"tensor model\.norm\.weight in .*model-00002-of-00002\.safetensors has shape "
        r"\[4\] but parameter norm\.weight needs \[5\]",
    ):
        plan(Checkpoint(tiny), params, TINY_MAP)


def test_plan_unreadable_dtype(tmp_path: Path) -> None:
    f = _save(tmp_path / "model.safetensors", {"w": np.zeros(4, dtype=np.int8)})
    with pytest.raises(KilnError, match=rf"tensor w in {f} has dtype I8"):
        plan(Checkpoint(tmp_path), {"w": (4,)}, {"w": Source(("w",))})


def test_read_stored_keeps_the_dtype(tmp_path: Path) -> None:
    """Pre-quantized data (packed int32 words, fp16 scales) is read as stored, bit for bit."""
    words = np.array([[-1, 0x12345678], [-(2**31), 7]], np.int32)
    half = np.array([1.0, -65504.0, 6e-8], np.float16)
    _save(tmp_path / "model.safetensors", {"w": words, "h": half})
    ck = Checkpoint(tmp_path)
    got = ck.read_stored("w")
    assert got.dtype == np.int32 and got.shape == (2, 2)
    np.testing.assert_array_equal(got, words)
    assert ck.read_stored("h").tobytes() == half.tobytes()
    assert ck.nbytes("w") == 16


def test_source_validation() -> None:
    with pytest.raises(ValueError, match="combine"):
        Source(("a", "b"))
    with pytest.raises(ValueError, match="at least one"):
        Source(())
    with pytest.raises(TypeError):
        Source("abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one dtype per tensor"):
        Source(("a", "b"), np.concatenate, dtypes=("I32",))


# -- convert ----------------------------------------------------------------------------------


def _identity(name: str, arr: np.ndarray) -> dict[str, np.ndarray]:
    return {name: arr}


def test_convert_round_trip_and_deterministic(tiny: Path, tmp_path: Path) -> None:
    seen: list[Progress] = []
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    index = convert(Checkpoint(tiny), TINY_PARAMS, TINY_MAP, _identity, out1, progress=seen.append)
    convert(Checkpoint(tiny), TINY_PARAMS, TINY_MAP, _identity, out2)
    # Progress: before the first tensor, then after each; bytes are the tensors' data.
    total = sum(a.nbytes for a in TINY.values())
    assert [(p.tensors_done, p.tensors_total, p.bytes_total) for p in seen] == [
        (i, 4, total) for i in range(5)
    ]
    assert [p.bytes_done for p in seen][::4] == [0, total]
    assert all(a.bytes_done < b.bytes_done for a, b in itertools.pairwise(seen))
    assert index == dict.fromkeys(sorted(TINY_PARAMS), "params-00001.safetensors")
    assert json.loads((out1 / "params-index.json").read_text()) == index
    names1 = sorted(p.name for p in out1.iterdir())
    assert names1 == ["params-00001.safetensors", "params-index.json"]
    for name in names1:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes()
    loaded = safetensors.numpy.load_file(out1 / "params-00001.safetensors")
    for name, arr in TINY.items():
        np.testing.assert_array_equal(loaded[name.removeprefix("model.")], arr)


def test_convert_splits_shards(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # 4x4 f32 = 64 bytes; 8x4 = 128 bytes. A 100-byte budget forces several shards.
    index = convert(Checkpoint(tiny), TINY_PARAMS, TINY_MAP, _identity, out, shard_bytes=100)
    shards = sorted(set(index.values()))
    assert len(shards) >= 3
    assert shards[0] == "params-00001.safetensors"
    loaded: dict[str, np.ndarray] = {}
    for shard in shards:
        part = safetensors.numpy.load_file(out / shard)
        assert all(index[k] == shard for k in part)
        loaded.update(part)
    assert sorted(loaded) == sorted(TINY_PARAMS)
    for name, arr in TINY.items():
        np.testing.assert_array_equal(loaded[name.removeprefix("model.")], arr)

    # A later run with bigger shards removes the now-stale extra shard files.
    convert(Checkpoint(tiny), TINY_PARAMS, TINY_MAP, _identity, out)
    assert sorted(p.name for p in out.glob("params-*")) == [
        "params-00001.safetensors",
        "params-index.json",
    ]


def test_convert_transform_emits_several_outputs(tiny: Path, tmp_path: Path) -> None:
    def quantize(name: str, arr: np.ndarray) -> dict[str, np.ndarray]:
        if arr.ndim != 2:
            return {name: arr}
        scale = np.abs(arr).max(axis=1, keepdims=True) / 127
        q = np.round(arr / scale).astype(np.int8)
        return {f"{name}.q": q, f"{name}.scale": scale.astype(np.float16)}

    def outputs(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
        shape = TINY_PARAMS[name]
        if len(shape) != 2:
            return {name: (shape, "float32")}
        return {f"{name}.q": (shape, "int8"), f"{name}.scale": ((shape[0], 1), "float16")}

    out = tmp_path / "out"
    index = convert(Checkpoint(tiny), TINY_PARAMS, TINY_MAP, quantize, out, outputs=outputs)
    assert "layers.0.mlp.weight.q" in index
    assert "layers.0.mlp.weight.scale" in index
    assert "norm.weight" in index
    loaded = safetensors.numpy.load_file(out / index["layers.0.mlp.weight.q"])
    assert loaded["layers.0.mlp.weight.q"].dtype == np.int8
    # A transform that does not produce what `outputs` announced is a bug, caught at once.
    with pytest.raises(KilnError, match=r"bug in Kiln: parameter .* converted to"):
        convert(Checkpoint(tiny), TINY_PARAMS, TINY_MAP, _identity, out, outputs=outputs)
    assert not list(out.glob("*.tmp"))  # the half-written shard is gone


def test_shards_are_what_safetensors_writes(tmp_path: Path) -> None:
    """Kiln writes shards itself, tensor by tensor; the bytes equal safetensors' own writer's
    on the same tensors (every dtype Kiln emits, several shards)."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    made = {
        "a.w": rng.standard_normal((5, 3)).astype(np.float32),
        "b.q": rng.integers(0, 2**32, (4, 2), dtype=np.uint32),
        "b.s": rng.standard_normal(4).astype(np.float16),
        "c.z": rng.integers(0, 255, (3, 3), dtype=np.uint8),
        "c.i": rng.integers(-128, 127, (7,), dtype=np.int8),
        "d.h": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
        "e.i": rng.integers(-(2**31), 2**31, (3,), dtype=np.int32),
    }
    params = {"a": (5, 3), "b": (4, 2), "c": (3, 3), "d": (2, 2), "e": (3,)}
    _save(tmp_path / "model.safetensors", {k: np.zeros(v, np.float32) for k, v in params.items()})
    wmap = {k: Source((k,)) for k in params}
    parts = {p: {k: v for k, v in made.items() if k.startswith(p + ".")} for p in params}
    outputs = {p: {k: (v.shape, str(v.dtype)) for k, v in parts[p].items()} for p in params}
    index = convert(
        Checkpoint(tmp_path),
        params,
        wmap,
        lambda p, _: parts[p],
        tmp_path / "out",
        shard_bytes=100,
        outputs=outputs.__getitem__,
    )
    shards = sorted(set(index.values()))
    assert len(shards) >= 2
    for shard in shards:
        mine = {k: made[k] for k, v in index.items() if v == shard}
        expected = safetensors.numpy.save(mine)
        assert (tmp_path / "out" / shard).read_bytes() == expected, shard


def test_convert_streams_parameter_by_parameter(tiny: Path, tmp_path: Path) -> None:
    """Each shard is complete on disk before the next parameter is read: nothing accumulates
    in memory (one tensor per shard here)."""
    ck, out = Checkpoint(tiny), tmp_path / "out"
    real_read, on_disk = ck.read, []
    ck.read = lambda name: on_disk.append(sorted(p.name for p in out.glob("*"))) or real_read(name)  # type: ignore[method-assign]
    convert(ck, TINY_PARAMS, TINY_MAP, _identity, out, shard_bytes=1)
    assert on_disk == [
        [f"params-{i:05d}.safetensors" for i in range(1, n + 1)] for n in range(len(TINY))
    ]


def test_convert_combine_stacks(tmp_path: Path) -> None:
    ck_dir = tmp_path / "ck"
    ck_dir.mkdir()
    q, k, v = _rand(4, 4, seed=1), _rand(2, 4, seed=2), _rand(2, 4, seed=3)
    _save(ck_dir / "model.safetensors", {"q.weight": q, "k.weight": k, "v.weight": v})
    params = {"qkv.weight": (8, 4)}
    wmap = {"qkv.weight": Source(("q.weight", "k.weight", "v.weight"), np.concatenate)}
    seen: list[Progress] = []
    index = convert(
        Checkpoint(ck_dir), params, wmap, _identity, tmp_path / "out", progress=seen.append
    )
    out = safetensors.numpy.load_file(tmp_path / "out" / index["qkv.weight"])
    np.testing.assert_array_equal(out["qkv.weight"], np.concatenate([q, k, v]))
    # One parameter, three checkpoint tensors: progress counts the tensors.
    assert [(p.tensors_done, p.tensors_total, p.bytes_done) for p in seen] == [
        (0, 3, 0),
        (3, 3, 128),
    ]


def test_progress_line() -> None:
    """One line redrawn in place: tensors, bytes, ETA at the rate so far; the last state ends
    the line; states within the redraw interval are skipped, but never the last."""
    assert Progress(1, 4, 250, 1000, 10.0).eta == 30.0
    assert Progress(0, 4, 0, 1000, 0.0).eta is None
    out = io.StringIO()
    line = ProgressLine(out, interval=0)
    line(Progress(0, 291, 0, 13_480_000_000, 0.0))
    line(Progress(120, 291, 5_432_000_000, 13_480_000_000, 45.0))
    line(Progress(291, 291, 13_480_000_000, 13_480_000_000, 3725.0))
    first = "converting weights: 0/291 tensors, 0 B/13.48 GB, ETA --:--"
    second = "converting weights: 120/291 tensors, 5.43 GB/13.48 GB, ETA 1:07"
    last = "converting weights: 291/291 tensors, 13.48 GB/13.48 GB, done in 1:02:05"
    assert out.getvalue() == f"\r{first}\r{second.ljust(len(first))}\r{last}\n"
    line.end()  # the line is complete: nothing to end
    assert out.getvalue().endswith("1:02:05\n")
    out = io.StringIO()
    line = ProgressLine(out, interval=0)
    line(Progress(1, 2, 10, 20, 1.0))
    line.end()  # a failed conversion: the error must start on a line of its own
    assert out.getvalue() == "\rconverting weights: 1/2 tensors, 10 B/20 B, ETA 0:01\n"
    out = io.StringIO()
    line = ProgressLine(out, label="w", interval=3600)
    for done in range(4):
        line(Progress(done, 3, done * 1500, 4500, 1.0))
    assert out.getvalue() == "\rw: 0/3 tensors, 0 B/4.50 kB, ETA --:--\r" + (
        "w: 3/3 tensors, 4.50 kB/4.50 kB, done in 0:01\n"
    )


def test_convert_combine_wrong_shape(tmp_path: Path) -> None:
    ck_dir = tmp_path / "ck"
    ck_dir.mkdir()
    arrays = {f"{x}.weight": _rand(4, 4) for x in "qkv"}
    _save(ck_dir / "model.safetensors", arrays)
    params = {"qkv.weight": (12, 4)}
    wmap = {"qkv.weight": Source(tuple(arrays), np.stack)}  # stack gives (3, 4, 4)
    with pytest.raises(
        KilnError,
        match=r"parameter qkv\.weight built from q\.weight, k\.weight, v\.weight in "
        r".*model\.safetensors has shape \[3, 4, 4\] but the model needs \[12, 4\]",
    ):
        convert(Checkpoint(ck_dir), params, wmap, _identity, tmp_path / "out")


def test_convert_validates_before_reading(tiny: Path, tmp_path: Path) -> None:
    reads: list[str] = []
    ck = Checkpoint(tiny)
    real_read = ck.read
    ck.read = lambda name: reads.append(name) or real_read(name)  # type: ignore[method-assign]
    params = {k: v for k, v in TINY_PARAMS.items() if k != "norm.weight"}
    wmap = {k: v for k, v in TINY_MAP.items() if k != "norm.weight"}
    with pytest.raises(KilnError, match="unexpected tensor"):
        convert(ck, params, wmap, _identity, tmp_path / "out")
    assert reads == []
    assert not (tmp_path / "out").exists()


def test_convert_duplicate_output_name(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(KilnError, match="produced twice"):
        convert(
            Checkpoint(tiny),
            TINY_PARAMS,
            TINY_MAP,
            lambda n, a: {"x": a},
            tmp_path / "o",
            outputs=lambda n: {"x": (TINY_PARAMS[n], "float32")},
        )


def test_convert_non_contiguous_output(tiny: Path, tmp_path: Path) -> None:
    index = convert(
        Checkpoint(tiny),
        TINY_PARAMS,
        TINY_MAP,
        lambda n, a: {n: a.T},
        tmp_path / "out",
        outputs=lambda n: {n: (TINY_PARAMS[n][::-1], "float32")},
    )
    loaded = safetensors.numpy.load_file(tmp_path / "out" / index["embed_tokens.weight"])
    np.testing.assert_array_equal(
        loaded["embed_tokens.weight"], TINY["model.embed_tokens.weight"].T
    )


def test_plan_checks_each_combined_tensor_shape(tmp_path):
    """A q/k split that still adds up to the right total is refused before conversion."""
    safetensors.numpy.save_file(
        {
            "q": np.zeros((6, 4), np.float32),  # config says 4 rows of q and 4 of k
            "k": np.zeros((2, 4), np.float32),
        },
        str(tmp_path / "model.safetensors"),
    )
    source = Source(("q", "k"), lambda a: np.concatenate(a), ((4, 4), (4, 4)))
    with pytest.raises(KilnError, match=r"tensor q in .*model\.safetensors has shape \[6, 4\]"):
        plan(Checkpoint(tmp_path), {"qk": (8, 4)}, {"qk": source})
