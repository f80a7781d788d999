"""`kiln.compile`: Hugging Face checkpoint -> artifact directory."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi

import kiln
from kiln.compiler import artifact
from kiln.compiler.combine import (
    Groups,
    combine_layout,
    combine_projections,
    combine_sources,
    combine_splits,
)
from kiln.compiler.config import read_hf_config, resolve_model
from kiln.compiler.export import ENTRY_POINTS, export
from kiln.compiler.pipeline import relax_pipeline
from kiln.compiler.quantization import (
    QUANTIZATIONS,
    for_checkpoint,
    get_quantization,
    imports_checkpoint,
)
from kiln.compiler.quantization.base import float_layout
from kiln.compiler.weights import Checkpoint, ProgressLine, convert, plan
from kiln.models import family_of
from kiln.models.sharding import shard_weight_map
from kiln.runtime.artifact import MANIFEST
from kiln.runtime.errors import KilnError
from kiln.runtime.externs import EXTERNS
from kiln.runtime.host import host_platform
from kiln.targets import get_target
from kiln.targets.cross import build_target, check_platform, linker

PAGE_SIZE = 16
PREFILL_CHUNK = 1024


class KilnWarning(UserWarning):
    """Something the user should know that does not stop the compile."""


# Generic x86-64 has no F16C: LLVM converts each fp16 value through a compiler-rt call
# (docs/TVM.md); the tiny code model's 512-token q0f16 prefill took 142 s against 8.4 s.
GENERIC_X86_FP16 = (
    "float16 compiled for generic x86-64 (no --arch) converts every value through a library call "
    "(no F16C) and runs ~15x slower: add --arch native (this machine's CPU) or --arch x86-64-v3 "
    "(any x86-64 with AVX2 and F16C) where the artifact will run on such a CPU"
)


def _prepare_output(output: Path) -> Path:
    """Never clobber what is not ours: an existing output must be empty or a Kiln artifact.
    The build goes to a staging folder that replaces `output` only once it is complete."""
    if output.exists():
        if not output.is_dir():
            raise KilnError(f"output {output} is a file: choose a directory path for the artifact")
        if any(output.iterdir()) and not (output / MANIFEST).is_file():
            raise KilnError(
                f"output directory {output} is not empty and is not a Kiln artifact: "
                "choose another --output or empty it"
            )
    staging = output.parent / f".{output.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def compile(
    model: str | Path,
    target: str = "cpu",
    quantization: str = "q0f32",
    output: str | Path | None = None,
    arch: str | None = None,
    dump_ir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    show_progress: bool | None = None,
    platform: str | None = None,
    tensor_parallel: int = 1,
) -> Path:
    """Compile `model` (checkpoint directory or hub id) for `target`; returns the artifact path.

    `output` defaults to `<model name>-<target>-<quantization>` in the current directory.
    `dump_ir` writes the IR after every pipeline phase into that directory.
    `show_progress` draws the weight conversion's progress (tensors, bytes, ETA) on stderr;
    None, the default, draws it when stderr is a terminal.
    `platform` ("linux-x86_64", "linux-aarch64", "macos-arm64") is where the host code runs;
    None is this machine (kiln.targets.cross cross-compiles for the others).
    `tensor_parallel` N > 1 shards the model over N GPUs (kiln.models.sharding): one program
    that every GPU runs on its own shard, with NCCL all-reduces, and each GPU's weights
    (params/rank-R/); kiln.load(..., devices=[...]) runs it over a Disco session.
    """
    say = progress or (lambda _msg: None)
    spec = get_target(target)
    target = spec.name  # "auto" resolves to this machine's best target
    platform = check_platform(platform, spec.platforms, target)
    link = {"fcompile": linker(platform)} if platform != host_platform() else {}
    preset = get_quantization(quantization)
    if preset.model_dtype not in spec.dtypes:
        runs = [q.name for q in QUANTIZATIONS.values() if q.model_dtype in spec.dtypes]
        raise KilnError(
            f"quantization {quantization} computes in {preset.model_dtype}, which target "
            f"{target} does not run: choose one of {', '.join(runs)}"
        )
    if tensor_parallel != 1:
        _check_tensor_parallel(tensor_parallel, spec.device, preset)
    model_dir = resolve_model(model)
    hf_config = read_hf_config(model_dir)
    # A pre-quantized checkpoint fixes the preset (and its group size): check the pairing.
    preset, hf_config = for_checkpoint(preset, hf_config, model_dir)
    family = family_of(hf_config)
    config = family.config_class.from_hf(hf_config, tensor_parallel=tensor_parallel)
    ckpt = Checkpoint(model_dir)
    out = Path(output or f"{model_dir.name}-{target}-{quantization}").expanduser().resolve()

    # One library per build: a target whose code runs on one arch only (ROCm) builds each apart.
    builds = spec.split_arch(arch) if spec.split_arch else [arch]
    model_nn = family.model_class(config, preset.model_dtype)
    # The preset swaps in its quantized layers; the weight map builds the float parameters
    # (layout.sources) and layout.transform turns each into the model parameters it becomes.
    layout = preset.quantize_model(model_nn)
    exported = export(model_nn, config.attention_spec(), preset.model_dtype, config.vocab_size)
    layout.check(exported.params)
    # Parallel projections (q/k/v, gate/up) become one matmul of their joined weights: the
    # one pass that changes the parameters runs before anything is built from them.
    exported, groups = combine_projections(exported, layout)
    full = _full_shapes(family, config, layout)
    weight_map = combine_sources(family.weight_map(config), groups, full)
    layout = combine_layout(layout, groups)
    layout.check(exported.params)
    # What conversion fills, for each GPU: the float parameters, or a pre-quantized
    # checkpoint's tensors.
    param_shapes, weight_map = layout.conversion(weight_map)
    rank_maps = _rank_weight_maps(family, config, weight_map, groups, full)
    # Check the checkpoint against the model before spending time on codegen.
    plan(ckpt, param_shapes, rank_maps[0], family.ignore)
    # Inputs are good (a mistake is one error, with no warning before it): what to know.
    generic_x86 = spec.device == "cpu" and not arch and platform == "linux-x86_64"
    if generic_x86 and preset.model_dtype == "float16":
        warnings.warn(GENERIC_X86_FP16, KilnWarning, stacklevel=2)

    staging = _prepare_output(out)
    try:
        start = time.time()
        libraries: dict[str | None, str] = {}
        device_code: dict[str | None, dict[str, Any]] = {}
        externs: set[str] = set()  # Kiln's functions the code calls (the runtime loads them)
        for build in builds:
            tvm_target = build_target(spec, build, platform)
            name = f"{target}-{build}" if spec.split_arch else target
            say(f"compiling {family.name} for {name} ({tvm_target.kind.name})")
            dump = Path(dump_ir) if dump_ir else None
            if dump and spec.split_arch:
                dump = dump / build
            pipeline = relax_pipeline(spec, tvm_target, dump)
            with tvm.transform.PassContext(config=dict(spec.pass_config)):
                executable = tvm.compile(exported.mod, tvm_target, relax_pipeline=pipeline)
            libraries[build] = f"model-{name}{spec.library_suffix}"
            device_code[build] = spec.export(
                executable, str(staging / libraries[build]), build, **link
            )
            device_code[build]["tvm_target"] = str(tvm_target)
            externs.update(artifact.kiln_externs(executable))
        # Externs go into the artifact, built here (for its archs), so the machine that runs it
        # needs their libraries (cuBLAS) but no compiler. (A cross-compiled artifact's are built
        # where it first runs.)
        for name in sorted(externs) if not link else ():
            extern = EXTERNS[name]
            archs = device_code[builds[0]].get("archs")
            shutil.copyfile(extern.build(archs), staging / extern.artifact_file)
        compile_seconds = time.time() - start
        if spec.split_arch:
            target_info = {"arch": ",".join(builds), "device_code": device_code}
        else:
            mcpu = tvm_target.attrs.get("mcpu")
            target_info = {"arch": mcpu or arch or spec.default_arch, **device_code[arch]}

        say(f"converting weights to {preset.name}")
        if show_progress is None:
            show_progress = sys.stderr is not None and sys.stderr.isatty()
        line = ProgressLine(sys.stderr) if show_progress else None
        rank_dirs = ["params"] if tensor_parallel == 1 else [
            f"params/rank-{r}" for r in range(tensor_parallel)
        ]  # fmt: skip
        try:
            param_files = [
                convert(
                    ckpt,
                    param_shapes,
                    rank_map,
                    layout.transform,
                    staging / rank_dir,
                    family.ignore,
                    progress=line,
                    outputs=layout.produces,
                )
                for rank_map, rank_dir in zip(rank_maps, rank_dirs, strict=True)
            ]
        finally:
            if line is not None:
                line.end()
        tokenizer_files = artifact.copy_tokenizer(model_dir, staging)
        if "tokenizer.json" not in tokenizer_files:
            warnings.warn(
                f"{model_dir} has no tokenizer.json: the artifact works on token ids only "
                "(prefill_logits, generate_ids); add the tokenizer files and recompile for text",
                KilnWarning,
                stacklevel=2,
            )
        # decode's copy captured per batch size, and the most sequences it takes
        batch_graphs = {}
        if spec.batch_graphs:
            entry, most = spec.batch_graphs
            batch_graphs = {"batch_graphs": {"entry": entry, "max_batch": most}}
        artifact.write_manifest(
            staging,
            {
                "model": {
                    "family": family.name,
                    "architecture": hf_config["architectures"][0],
                    "source": str(model),
                    "config": config.to_json(),
                },
                "quantization": preset.to_json(),
                "target": {
                    "name": spec.name,
                    "device": spec.device,
                    "platform": platform,
                    **target_info,
                    **({"externs": sorted(externs)} if externs else {}),
                },
                "library": libraries[builds[0]],
                # arch -> library, for targets that build one library per arch
                **({"libraries": libraries} if spec.split_arch else {}),
                "entry_points": list(ENTRY_POINTS),
                **batch_graphs,
                **({"tensor_parallel": tensor_parallel} if tensor_parallel > 1 else {}),
                # Shapes are one GPU's; a sharded artifact lists each GPU's file of a tensor.
                "params": [
                    {
                        "name": name,
                        "shape": list(shape),
                        "dtype": dtype,
                        **(
                            {"file": f"params/{param_files[0][name]}"}
                            if tensor_parallel == 1
                            else {
                                "files": [
                                    f"{d}/{files[name]}"
                                    for d, files in zip(rank_dirs, param_files, strict=True)
                                ]
                            }
                        ),
                    }
                    for name, shape, dtype in exported.params
                ],
                "kv_cache": {
                    "kind": "paged",
                    "page_size": PAGE_SIZE,
                    "prefill_chunk_size": PREFILL_CHUNK,
                    "num_layers": config.num_hidden_layers,
                    "num_kv_heads": config.num_key_value_heads // tensor_parallel,  # per GPU
                    "head_dim": config.head_dim,
                    "dtype": preset.model_dtype,
                    "context_length": config.context_length,
                    "sliding_window": config.sliding_window,
                },
                "tokenizer": "tokenizer.json" in tokenizer_files,
                "versions": _versions(),
                "build": {"compile_seconds": round(compile_seconds, 2)},
            },
        )
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"wrote {out}")
    return out


def _check_tensor_parallel(ranks: Any, device: str, preset: Any) -> None:
    if not isinstance(ranks, int) or ranks < 1:
        raise KilnError(f"tensor_parallel is {ranks!r}; it must be an integer >= 1")
    # The sharded program's all-reduces run on NCCL through Disco. CPU builds run only over a
    # Disco session that the caller provides (Kiln's tests do, with a collective of their own).
    if device not in ("cuda", "cpu"):
        raise KilnError(
            f"--tensor-parallel runs on NVIDIA GPUs (NCCL), not on {device}: compile for "
            "--target cuda, or leave --tensor-parallel out"
        )
    if imports_checkpoint(preset):
        raise KilnError(
            f"--tensor-parallel cannot split {preset.name}'s weights, which are imported as "
            "published: compile the full-precision checkpoint with q4f16 (or another preset) "
            "to shard it, or leave --tensor-parallel out"
        )


def _full_shapes(family: Any, config: Any, layout: Any) -> dict[str, tuple[int, ...]]:
    """The float parameters' shapes in the whole model (one GPU's are a share of them)."""
    if config.tensor_parallel == 1:
        return layout.sources
    whole = dataclasses.replace(config, tensor_parallel=1)
    return float_layout(family.model_class(whole, "float32"), "float32").sources


def _rank_weight_maps(
    family: Any, config: Any, weight_map: dict[str, Any], groups: Groups, full: dict[str, Any]
) -> list[dict[str, Any]]:
    """Each GPU's weight map (one, the family's own, without tensor parallelism)."""
    ranks = config.tensor_parallel
    if ranks == 1:
        return [weight_map]
    splits, full = combine_splits(family.weight_splits(config, list(full)), full, groups)
    return [shard_weight_map(weight_map, splits, full, r, ranks) for r in range(ranks)]


def _versions() -> dict[str, Any]:
    return {"kiln": kiln.__version__, "tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__}
