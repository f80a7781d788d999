"""The `kiln` command line: compile, run, serve, bench, targets."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from kiln.runtime.errors import KilnError


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User mistakes print one line and exit 1; never a traceback (KILN_DEBUG=1 shows it)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        warnings.showwarning = lambda msg, *_a, **_k: click.echo(f"warning: {msg}", err=True)
        try:
            return fn(*args, **kwargs)
        except KilnError as e:
            if os.environ.get("KILN_DEBUG"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:
            if os.environ.get("KILN_DEBUG"):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            click.echo(
                f"internal error: {type(e).__name__}: {first} "
                "(this is a Kiln bug; rerun with KILN_DEBUG=1 for the traceback and report it)",
                err=True,
            )
            sys.exit(2)

    return wrapper


@click.group()
@click.version_option(package_name="kiln")
def main() -> None:
    """Kiln: compile Llama-family models ahead of time and run them anywhere."""


@main.command()
@click.argument("model")
@click.option(
    "--target",
    default="cpu",
    show_default=True,
    help="cpu, cuda, rocm, metal, or auto: the best this machine has (see `kiln targets`)",
)
@click.option("--quantization", default="q0f32", show_default=True, help="preset name")
@click.option("--output", "-o", default=None, help="artifact directory to write")
@click.option(
    "--arch",
    default=None,
    help="architecture(s): an LLVM CPU, sm_90,..., gfx942,... (defaults: `kiln targets`)",
)
@click.option("--dump-ir", default=None, help="write the IR after each pipeline phase here")
@click.option(
    "--platform",
    default=None,
    help="where the library runs: linux-x86_64, linux-aarch64 or macos-arm64 "
    "(default: this machine; others are cross-compiled)",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="show the weight conversion's progress on stderr (default: when it is a terminal)",
)
@click.option(
    "--tensor-parallel",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="shard the model over this many GPUs (NCCL), each holding 1/N of the weights",
)
@_friendly
def compile(
    model: str,
    target: str,
    quantization: str,
    output: str | None,
    arch: str | None,
    dump_ir: str | None,
    platform: str | None,
    progress: bool | None,
    tensor_parallel: int,
) -> None:
    """Compile MODEL (a checkpoint directory or hub id) into an artifact directory."""
    from kiln.compiler.api import compile as compile_model

    compile_model(
        model,
        target=target,
        quantization=quantization,
        output=output,
        arch=arch,
        dump_ir=dump_ir,
        progress=lambda msg: click.echo(msg, err=True),
        show_progress=progress,
        platform=platform,
        tensor_parallel=tensor_parallel,
    )


def _tensor_parallel(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The --tensor-parallel option of the commands that load an artifact."""
    return click.option(
        "--tensor-parallel",
        default=None,
        type=click.IntRange(min=1),
        help="run a tensor-parallel artifact on N GPUs, cuda:0..N-1 (replaces --device); N is "
        "the artifact's own --tensor-parallel",
    )(fn)


def _gpus(tensor_parallel: int | None) -> list[str] | None:
    return None if tensor_parallel is None else [f"cuda:{i}" for i in range(tensor_parallel)]


@main.command()
@click.argument("artifact")
@click.option("--prompt", "-p", required=True, help="text to continue (or the user message)")
@click.option("--chat", is_flag=True, help="wrap the prompt in the model's chat template")
@click.option("--max-tokens", default=128, show_default=True, type=int)
@click.option("--temperature", default=0.7, show_default=True, type=float, help="0 = greedy")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int, help="0 = off")
@click.option("--seed", default=None, type=int)
@click.option("--stop", multiple=True, help="stop string (repeatable)")
@click.option("--device", default="cpu", show_default=True)
@_tensor_parallel
@_friendly
def run(
    artifact: str,
    prompt: str,
    chat: bool,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: tuple[str, ...],
    device: str,
    tensor_parallel: int | None,
) -> None:
    """Generate text from a compiled ARTIFACT (a directory or a .kiln package), streaming it to
    stdout."""
    from kiln import load
    from kiln.runtime.sampler import SamplingParams

    sampling = dict(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop,
    )
    SamplingParams(**sampling)  # a bad option fails before the (slow) load
    with load(artifact, device=device, devices=_gpus(tensor_parallel)) as model:
        if chat:
            click.echo(model.chat([{"role": "user", "content": prompt}], **sampling))
            return
        pieces = model.stream(prompt, **sampling)  # a missing tokenizer fails before any output
        click.echo(prompt, nl=False)
        for piece in pieces:
            click.echo(piece, nl=False)
        click.echo()


@main.command()
@click.argument("artifact")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--api-key",
    default=None,
    envvar="KILN_API_KEY",
    help="require 'Authorization: Bearer KEY' on /v1 (default: $KILN_API_KEY, else none)",
)
@click.option(
    "--max-queue",
    default=256,
    show_default=True,
    type=click.IntRange(min=0),
    help="generations that may wait beyond --max-batch-size; more get 429",
)
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--context-length", default=None, type=int, help="default: the model's")
@click.option("--model-name", default=None, help="the name clients use (default: the folder's)")
@click.option(
    "--shutdown-grace",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="seconds running requests get to finish on Ctrl-C/SIGTERM before they are cancelled",
)
@click.option("--device", default="cpu", show_default=True)
@_tensor_parallel
@_friendly
def serve(
    artifact: str,
    host: str,
    port: int,
    api_key: str | None,
    max_queue: int,
    max_batch_size: int,
    context_length: int | None,
    model_name: str | None,
    shutdown_grace: float,
    device: str,
    tensor_parallel: int | None,
) -> None:
    """Serve a compiled ARTIFACT over an OpenAI-compatible HTTP API, with a chat page at /."""
    from kiln.runtime.server import serve as serve_artifact

    serve_artifact(
        artifact,
        host=host,
        port=port,
        device=device,
        devices=_gpus(tensor_parallel),
        api_key=api_key,
        max_queue=max_queue,
        max_batch_size=max_batch_size,
        context_length=context_length,
        model_name=model_name,
        shutdown_grace=shutdown_grace,
        echo=lambda msg: click.echo(msg, err=True),
    )


@main.command()
@click.argument("artifact")
@click.option("--device", default="cuda", show_default=True)
@click.option(
    "--batches", default="8,32,64,128", show_default=True, help="batched decode sizes, e.g. 8,32"
)
@click.option(
    "--gemm-tflops",
    default=None,
    type=float,
    help="the device's dense GEMM peak, for prefill rooflines (bench/llm.py measures it)",
)
@click.option(
    "--step-graphs/--no-step-graphs",
    default=None,
    help="decode a lone request's steps as whole-step CUDA graphs (kiln.runtime.step_graph); "
    "default: where they run",
)
@_tensor_parallel
@_friendly
def bench(
    artifact: str,
    device: str,
    batches: str,
    gemm_tflops: float | None,
    step_graphs: bool | None,
    tensor_parallel: int | None,
) -> None:
    """Measure ARTIFACT on DEVICE: load time, decode at batch 1 and batched, prefill and time
    to first token, each next to its roofline."""
    from kiln.runtime.benchmark import run as run_bench

    try:
        sizes = tuple(int(b) for b in batches.split(",") if b.strip())
    except ValueError:
        raise KilnError(f"--batches {batches!r}: give batch sizes such as 8,32,64") from None
    run_bench(
        artifact, device, devices=_gpus(tensor_parallel), batches=sizes,
        gemm_flops=gemm_tflops and gemm_tflops * 1e12, step_graphs=step_graphs, say=click.echo,
    )  # fmt: skip


@main.command()
@click.argument("artifacts", nargs=-1, required=True)
@click.option("--output", "-o", required=True, help="the package file to write, e.g. model.kiln")
@_friendly
def package(artifacts: tuple[str, ...], output: str) -> None:
    """Bundle ARTIFACTS of one model (any targets and platforms) into one .kiln file with one
    copy of the weights and the TVM runtime of each platform; load it with
    `kiln run model.kiln --device auto` or kiln.load("model.kiln", device="auto")."""
    from kiln.compiler.package import build_package

    build_package(artifacts, output, progress=lambda msg: click.echo(msg, err=True))


@main.command()
def targets() -> None:
    """List compilation targets, their default architectures and what building for them needs."""
    from kiln.targets import TARGETS, detect_target

    for spec in TARGETS.values():
        click.echo(f"{spec.name:6} {spec.description}")
        click.echo(f"{'':6} default arch: {spec.default_arch or 'host ISA, generic'}")
        if spec.toolchain is not None:
            click.echo(f"{'':6} needs: {spec.toolchain()}")
        click.echo(f"{'':6} --platform: {', '.join(spec.platforms)}")
    click.echo(f"{'auto':6} the best target on the machine it runs on (here: {detect_target()})")


if __name__ == "__main__":
    main()
