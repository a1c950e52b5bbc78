"""The `lora-deploy` command: a thin click layer over the Python API.

Every command maps errors to one line on stderr and an exit code: 0 success,
1 verification found a difference (or a gate failed), 2 bad input, 3 a failed write or
a bug. Every command that writes follows one output policy (lora_deploy.io.staging.
check_output): an input is never an output, and an existing output is replaced only
with --overwrite.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
from pathlib import Path

import click

from lora_deploy.backends import registry
from lora_deploy.errors import InternalError, LoraDeployError, OutputError
from lora_deploy.options import (
    COMBINE_METHODS,
    GENAI_PRECISIONS,
    PACK_DTYPES,
    BenchOptions,
    CombineOptions,
    CompressOptions,
    ExportOptions,
    GenaiExportOptions,
    MergeOptions,
    TrtBuildOptions,
    TrtRefitOptions,
    VerifyOptions,
)
from lora_deploy.util import signal_handlers

# Existence and kind are checked by the API, in one line each.
directory = click.Path(exists=False, file_okay=False, path_type=Path)
a_file = click.Path(dir_okay=False, path_type=Path)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job cancelled, a container stopped), raised like Ctrl-C so the same
    cleanup runs: no half-written output, staging directories removed."""


def raise_terminated(signum, frame) -> None:
    raise Terminated()


def exit_interrupted(exc: KeyboardInterrupt, *, now: bool = False) -> None:
    """Exit 130 (SIGINT) or 143 (SIGTERM) with one line. `now`: without the interpreter's
    shutdown (`lora-deploy run` only, after its cleanup, while a step thread it cannot
    stop is still inside torch: the shutdown would abort it, exit 134)."""
    code = 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    ctx = click.get_current_context(silent=True)
    written = ctx.meta.get(OUTPUT_WRITTEN) if ctx is not None else None
    if written is not None:  # the work was done: only its report was cut short
        message = f"interrupted after {written} was written in full: the report was not printed"
    else:
        message = "interrupted: no partial output left behind"
    json_error(message, code)
    click.echo(message, err=True)
    if now:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def exit_reader_gone() -> None:
    """stdout's reader went away (`lora-deploy ... | head -0`): nothing is wrong with the
    command (its outputs are in place, or were staged and removed, as on Ctrl-C). Exit
    quietly, with the status of a process SIGPIPE stopped; stdout goes to /dev/null so
    the interpreter's last flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    sys.exit(128 + signal.SIGPIPE)


JSON_PRINTED = "lora_deploy.json_printed"  # ctx.meta key: the command printed its JSON document
OUTPUT_WRITTEN = "lora_deploy.output_written"  # ctx.meta key: the command's output is in place


def output_written(path: str | os.PathLike) -> None:
    """Say that the command's output is complete and in place: an interrupt from now on
    (while the report is hashed or printed) says so, rather than "no partial output"."""
    click.get_current_context().meta[OUTPUT_WRITTEN] = str(path)


def from_echo(exc: BaseException) -> bool:
    """Whether the error came from writing to stdout/stderr (click.echo): a full disk
    behind `> file`, say, not a bug of the command."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "echo" and Path(code.co_filename).parent.name == "click":
            return True
        tb = tb.tb_next
    return False


def json_error(message: str, exit_code: int) -> None:
    """With --json, an error is JSON on stdout too: {"error": ..., "exit_code": N}, unless
    the command already printed its document (which then carries the error itself)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.params.get("as_json") is True and not ctx.meta.get(JSON_PRINTED):
        try:
            click.echo(json.dumps({"error": message, "exit_code": exit_code}))
        except OSError:  # stdout is gone or full: stderr still gets the line
            pass


def run_guarded(fn):
    """Turn typed errors into one line and an exit code; --debug shows the traceback.

    Also gives the command a `--debug` of its own: errors say "rerun with --debug", and
    users add it at the end of the line, not before the subcommand.
    """

    @click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        ctx = click.get_current_context()
        debug = ctx.find_root().params.get("debug", False) or ctx.params.get("debug", False)
        try:
            with signal_handlers({signal.SIGTERM: raise_terminated}):
                return fn(*args, **kwargs)
        except LoraDeployError as exc:
            if debug:
                raise
            json_error(str(exc), exc.exit_code)
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            exit_interrupted(exc)
        except BrokenPipeError:
            exit_reader_gone()
        except Exception as exc:  # a bug: keep the promise of one line, point at --debug
            if isinstance(exc.__cause__, KeyboardInterrupt):  # Python 3.11 wraps one raised while a class is built
                exit_interrupted(exc.__cause__)
            if debug:
                raise
            if isinstance(exc, OSError) and from_echo(exc):  # `--json > /dev/full`: a write failed, exit 3
                click.echo(f"error: cannot write the report to standard output ({exc.strerror or exc})", err=True)
                sys.exit(OutputError.exit_code)
            first = str(exc).splitlines()[0] if str(exc) else ""
            message = f"unexpected {type(exc).__name__}: {first[:300]} (rerun with --debug)"
            json_error(message, InternalError.exit_code)
            click.echo(f"error: {message}", err=True)
            sys.exit(InternalError.exit_code)  # not 2: nothing says the input was at fault

    return wrapper


def emit_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, default=str))
    click.get_current_context().meta[JSON_PRINTED] = True


EXPORT_SCHEMA = "lora-deploy.export/1"


def stamped(schema: str, data: dict, artifacts: dict) -> dict:
    """A JSON report with its schema, time, tool version and the SHA-256 of each artifact
    (role -> path; a directory's weight files, see lora_deploy.io.provenance)."""
    from lora_deploy.io.provenance import artifact_hashes, report_header

    hashes = {role: artifact_hashes(path) for role, path in artifacts.items() if path is not None}
    return {**report_header(schema), "artifacts": hashes, **data}


def note(message: str) -> None:
    """Something the user should know that is not an error: one line on stderr."""
    click.echo(f"note: {message}", err=True)


class OneLineUsageError(click.UsageError):
    """A usage error shown like every other error: one line, `error: ...`, exit 2 (and, when
    the command line asked for --json, the same error as JSON on stdout)."""

    as_json = False

    def show(self, file=None) -> None:
        if self.as_json:
            click.echo(json.dumps({"error": self.format_message(), "exit_code": self.exit_code}))
        click.echo(f"error: {self.format_message()}", err=True)


class OneLineUsageGroup(click.Group):
    """click shows a usage error in four lines (Usage / Try / blank / Error); the README
    promises one. Every usage error (the group's options, an unknown command, a
    subcommand's arguments and options) is parsed below make_context or invoke, so both
    re-raise it as a OneLineUsageError. --help, and help shown for a bare group, are
    click's own."""

    group_class = type  # subgroups (export) are of this class too

    def make_context(self, info_name, args, *rest, **kwargs) -> click.Context:
        with one_line_usage_errors(args):
            return super().make_context(info_name, args, *rest, **kwargs)

    def invoke(self, ctx: click.Context):
        # The subcommand's own arguments are parsed in here: they are what is left of the line.
        with one_line_usage_errors([*getattr(ctx, "_protected_args", []), *ctx.args]):
            return super().invoke(ctx)


@contextlib.contextmanager
def one_line_usage_errors(args):
    try:
        yield
    except KeyboardInterrupt as exc:  # Ctrl-C while the line is parsed: click would say "Aborted!", exit 1
        exit_interrupted(exc)
    except click.exceptions.NoArgsIsHelpError:
        raise
    except click.UsageError as exc:
        error = exc if isinstance(exc, OneLineUsageError) else OneLineUsageError(exc.format_message(), exc.ctx)
        error.as_json = error.as_json or "--json" in args
        if error is exc:
            raise
        raise error from exc


def show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """--version: the version, and whether the merge's float16 arithmetic runs compiled."""
    if not value or ctx.resilient_parsing:
        return
    from lora_deploy import __version__  # read on use (lora_deploy/__init__.py)
    from lora_deploy.arrays import float16_kernel, quant4_kernel

    click.echo(f"lora-deploy, version {__version__}\nfloat16 kernels: {float16_kernel()}")
    click.echo(f"NF4/FP4 kernel (merge --onto): {quant4_kernel()}")
    ctx.exit()


@click.group(cls=OneLineUsageGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version", is_flag=True, expose_value=False, is_eager=True, callback=show_version, help="Show the version, exit."
)
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """Ship LoRA adapters: inspect, merge, verify, export, benchmark."""
    import logging
    import warnings

    if not debug:
        # Library chatter (exporter progress, deprecation notices) would bury our one-line results.
        warnings.filterwarnings("ignore")
        logging.getLogger().setLevel(logging.ERROR)
        for name in ("transformers", "torch", "onnxscript", "peft"):
            logging.getLogger(name).setLevel(logging.ERROR)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if "transformers" in sys.modules:  # already imported (embedding apps, tests): env is read too late
            sys.modules["transformers"].utils.logging.disable_progress_bar()


def ort_gpu_options(command):
    """ONNX Runtime on a GPU (bench and verify): which execution provider, and its options."""
    options = [
        click.option(
            "--provider",
            type=click.Choice(["cuda", "tensorrt"]),
            help="onnxruntime on --device cuda: the CUDA or TensorRT execution provider (needs onnxruntime-gpu)."
            "  [default: cuda]",
        ),
        click.option("--trt-fp16", is_flag=True, help="--provider tensorrt: let ONNX Runtime's TensorRT build fp16."),
        click.option(
            "--trt-cache",
            type=click.Path(file_okay=False, path_type=Path),
            help="--provider tensorrt: directory for its engine and timing caches.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command("inspect")
@click.argument("adapter", type=directory)
@click.option("--base", type=directory, help="Base checkpoint: resolve targets and report the trainable fraction.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@run_guarded
def inspect_cmd(adapter: Path, base: Path | None, as_json: bool) -> None:
    """Show an adapter's variant, targets, per-module r/alpha/scaling and size."""
    from lora_deploy.adapter.summary import describe_adapter

    info = describe_adapter(adapter, base)
    if as_json:
        emit_json(info)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{info['adapter']}[/]  variant={info['variant']}  r={info['r']}  alpha={info['lora_alpha']}")
    table = Table("module", "r", "alpha", "scaling", "kind", "params")
    for m in info["modules"]:
        table.add_row(
            m["module"],
            str(m["r"]),
            f"{m['alpha']:g}",
            f"{m['scaling']:.4g}",
            m.get("kind", "embedding" if m["embedding"] else "-"),
            f"{m['parameters']:,}",
        )
    console.print(table)
    line = f"trainable parameters: {info['trainable_parameters']:,}"
    if "trainable_fraction" in info:
        line += f" ({100 * info['trainable_fraction']:.3f}% of {info['base_parameters']:,})"
    console.print(line)
    if info["replaced_tensors"]:
        console.print(f"replaces base tensors: {', '.join(info['replaced_tensors'])}")
    if info.get("saved_base_tensors"):
        console.print(f"carries saved base tensors (not trained): {', '.join(info['saved_base_tensors'])}")
    if info.get("quantized_base_hint"):
        console.print(f"trained on a quantized base? {info['quantized_base_hint']} (merge --onto nf4|fp4|int8)")


@main.command("analyze")
@click.argument("adapter", type=directory)
@click.option("--base", type=directory, help="Base checkpoint: ||dW||/||W0|| and the amplification factor.")
@click.option("--compare", type=directory, help="Another adapter: subspace similarity phi(i, j) per module.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report (singular values, energy, phi) as JSON.")
@click.option("--plot", "plot_path", type=a_file, help="Write a PNG: energy per module, phi heat maps (matplotlib).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --plot file.")
@run_guarded
def analyze_cmd(adapter: Path, base: Path | None, compare: Path | None, as_json: bool, plot_path, overwrite) -> None:
    """Spectrum of each module's s*B*A, the rank it needs, and what compressing saves."""
    from lora_deploy.adapter.analysis import analyze_adapter, plot_analysis, require_matplotlib, summary_lines
    from lora_deploy.io.staging import check_output

    if plot_path is not None:
        require_matplotlib()
        check_output(plot_path, [adapter, base, compare], overwrite)
    report = analyze_adapter(adapter, base, compare)
    if plot_path is not None:
        plot_analysis(report, plot_path, overwrite=overwrite, inputs=[adapter, base, compare])
    if as_json:
        emit_json(report)
        return
    for line in summary_lines(report):
        click.echo(line)
    if plot_path is not None:
        click.echo(f"plot: {plot_path}")


class FloatList(click.ParamType):
    """Comma-separated numbers, e.g. 0.7,0.3."""

    name = "W1,W2,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)


@main.command("compress")
@click.argument("adapter", type=directory)
@click.option("-o", "--output", "out", type=directory, required=True, help="The PEFT adapter directory to write.")
@click.option("--rank", type=int, help="Truncate every module to this rank.")
@click.option("--energy", type=float, help="Or: the rank keeping this fraction of each module's ||dW||^2, e.g. 0.99.")
@click.option("--per-module", is_flag=True, help="With --energy: each module its own rank (else the largest for all).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (per-module error) as JSON.")
@run_guarded
def compress_cmd(adapter: Path, out: Path, as_json: bool, **params) -> None:
    """Truncate each module's s*B*A by SVD; write a PEFT adapter; report the Eckart-Young error."""
    from lora_deploy.merge.combine import compress_adapter

    report = compress_adapter(adapter, out, **CompressOptions.from_params(params).kwargs())
    if as_json:
        emit_json(report)
        return
    ranks = sorted({m["rank"] for m in report["modules"]})
    click.echo(
        f"wrote {report['output']}: {len(report['modules'])} modules at rank {'/'.join(map(str, ranks))}; "
        f"factors {report['bytes_before'] / 1e6:.3g} MB -> {report['bytes_after'] / 1e6:.3g} MB; "
        f"largest relative error {report['max_relative_error']:.3g} (Eckart-Young)"
    )
    if report["carried"]:
        note(f"carried over unchanged: {', '.join(report['carried'])}")


@main.command("combine")
@click.argument("adapters", type=directory, nargs=-1, required=True)
@click.option("-o", "--output", "out", type=directory, required=True, help="The PEFT adapter directory to write.")
@click.option("--weights", type=FloatList(), help="One weight per adapter, e.g. 0.7,0.3.  [default: 1 each]")
@click.option("--method", type=click.Choice(list(COMBINE_METHODS)), default="linear", show_default=True)
@click.option("--rank", type=int, help="svd/ties/dare: the output rank.  [default: the largest input rank]")
@click.option("--density", type=float, help="ties/dare: the fraction of each update's entries kept.")
@click.option("--seed", type=int, default=0, show_default=True, help="dare: seed of the random drop.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (per-module error) as JSON.")
@run_guarded
def combine_cmd(adapters: tuple[Path, ...], out: Path, as_json: bool, **params) -> None:
    """One adapter whose update is the weighted sum (or TIES/DARE) of the adapters' updates."""
    from lora_deploy.merge.combine import combine_adapters

    report = combine_adapters(adapters, out, **CombineOptions.from_params(params).kwargs())
    if as_json:
        emit_json(report)
        return
    ranks = sorted({m["rank"] for m in report["modules"]})
    how = "exact" if report["exact"] else f"largest relative error {report['max_relative_error']:.3g}"
    click.echo(
        f"wrote {report['output']}: {report['method']} of {len(report['adapters'])} adapters, "
        f"{len(report['modules'])} modules at rank {'/'.join(map(str, ranks))}; {how}"
    )


@main.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapter", type=directory)
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output checkpoint directory (with --onnx-like: the merged .onnx file, or genai folder).",
)
@click.option(
    "--side-file",
    "side_files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A file to carry into OUT and hash in the manifest (dataset_statistics.json, a separately saved head); "
    "repeatable.",
)
@click.option(
    "--onnx-like",
    "onnx_like",
    type=click.Path(path_type=Path),
    help="An ONNX export of BASE (export onnx, or an onnxruntime-genai build: its model.onnx, or its folder "
    "for a whole folder): write the merged model as ONNX with its graph, at copy speed.",
)
@click.option(
    "--base-check",
    type=click.Choice(["sampled", "full"]),
    default="sampled",
    show_default=True,
    help="--onnx-like: compare every value of the graph's initializers with BASE (full), or blocks of each (sampled).",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
    default="auto",
    show_default=True,
    help="Output dtype; auto keeps each tensor's base dtype.",
)
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 2GB, 500MB.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty output directory.")
@click.option(
    "--fsync", "durable", is_flag=True, help="fsync every output file before the final rename (power-loss safe)."
)
@click.option(
    "--sha256",
    is_flag=True,
    help="Also record every file's SHA-256 (the Hub's LFS ids) beside its BLAKE3 in the manifest (~1 s/GB of CPU).",
)
@click.option("--rehash", is_flag=True, help="Hash every input again, even one the digest memo knows unchanged.")
@click.option(
    "--onto",
    type=click.Choice(["nf4", "fp4", "int8"]),
    help="Merge onto dequant(quant(W)) as bitsandbytes computes it (what a QLoRA adapter was trained against), "
    "for every Linear layer but the output head; untargeted ones are written dequantized too.",
)
@click.option("--blocksize", type=int, default=None, help="--onto nf4|fp4: bitsandbytes' block size.  [default: 64]")
@click.option(
    "--double-quant", is_flag=True, help="--onto nf4|fp4: the scales were double-quantized (bnb_4bit_use_double_quant)."
)
@click.option(
    "--skip-modules",
    multiple=True,
    default=(),
    help="--onto: modules bitsandbytes left unquantized (llm_int8_skip_modules; name, suffix or regex); repeatable "
    "or comma-separated (a comma inside (), [] or {} is the regex's).",
)
@click.option(
    "--requantize",
    type=click.Choice(["fp8"]),
    help="A block-scaled FP8 base: write FP8 with fresh block scales (amax/448) in its layout, not bfloat16.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the merge manifest as JSON.")
@run_guarded
def merge(
    base: Path,
    adapter: Path,
    out: Path,
    onnx_like: Path | None,
    base_check: str,
    dtype: str,
    max_shard_size: str,
    overwrite: bool,
    durable: bool,
    sha256: bool,
    rehash: bool,
    as_json: bool,
    side_files: tuple[Path, ...] = (),
    onto: str | None = None,
    blocksize: int | None = None,
    double_quant: bool = False,
    skip_modules: tuple[str, ...] = (),
    requantize: str | None = None,
) -> None:
    """Merge ADAPTER into BASE, shard by shard, writing an ordinary HF checkpoint
    (with --onnx-like BASE.onnx: the merged ONNX model, from BASE's graph). BASE may be a
    checkpoint directory, a .safetensors file or a plain torch state dict (.pt/.pth/.bin,
    read weights-only)."""
    options = MergeOptions.from_params(click.get_current_context().params)
    if onnx_like is not None:
        if side_files:
            from lora_deploy.errors import BadInputError

            raise BadInputError("--side-file applies to checkpoint merges, not --onnx-like")
        if onto or requantize or blocksize is not None or double_quant or skip_modules:
            from lora_deploy.errors import BadInputError

            raise BadInputError(
                "--onto (--blocksize, --double-quant, --skip-modules) and --requantize apply to checkpoint merges, "
                "not --onnx-like"
            )
        merge_onnx_like(base, adapter, onnx_like, out, options, base_check, as_json)
        return
    if click.get_current_context().get_parameter_source("base_check") is not click.core.ParameterSource.DEFAULT:
        from lora_deploy.errors import BadInputError

        raise BadInputError("--base-check applies to --onnx-like only")
    from lora_deploy.merge import merge as run_merge  # here: --onnx-like does without it
    from lora_deploy.progress import byte_progress

    with byte_progress("merging", enabled=not as_json) as progress:
        result = run_merge(base, adapter, out, **options.kwargs(), progress=progress, side_files=side_files)
    output_written(out)
    if as_json:
        emit_json(result.manifest)
    else:
        click.echo(result.summary())
        merge_quant_lines(result.manifest, base, adapter)


def merge_quant_lines(manifest: dict, base: Path, adapter: Path) -> None:
    """A quantized path's one-line report; or, for a plain merge of an adapter that looks
    trained on a quantized base, a one-line hint."""
    from lora_deploy.merge.quant import quant_summary, quantized_training_hint

    if "quantization" in manifest:
        click.echo(quant_summary(manifest["quantization"]))
        return
    hint = quantized_training_hint(adapter, base)
    if hint is not None:
        click.echo(f"hint: {hint}", err=True)


def merge_onnx_like(
    base: Path, adapter: Path, graph: Path, out: Path, options: MergeOptions, base_check: str, as_json: bool
) -> None:
    """merge --onnx-like: the merged model as ONNX, from BASE's exported graph."""
    from lora_deploy.errors import BadInputError
    from lora_deploy.export.like import merge_onnx

    ctx = click.get_current_context()
    if options.dtype != "auto":
        raise BadInputError("--onnx-like keeps the graph's dtypes; --dtype must be auto")
    if ctx.get_parameter_source("max_shard_size") is not click.core.ParameterSource.DEFAULT:
        raise BadInputError("--max-shard-size does not apply to --onnx-like (one ONNX file and its data)")
    if options.sha256 or options.rehash:
        raise BadInputError("--sha256 and --rehash apply to checkpoint merges; --onnx-like --json records SHA-256")
    without_blas_workers()
    result = merge_onnx(
        base, adapter, graph, out, overwrite=options.overwrite, durable=options.durable, base_check=base_check
    )
    output_written(out)
    if as_json:
        emit_json(stamped(MERGE_ONNX_SCHEMA, result.to_dict(), {"base": base, "adapter": adapter, "onnx": out}))
    else:
        click.echo(result.summary())


MERGE_ONNX_SCHEMA = "lora-deploy.merge-onnx/1"


def without_blas_workers() -> None:
    """For a command whose BLAS calls run on one thread by design (the merge's rank-r
    products, merge/blocks.py), asked before numpy is imported: OpenBLAS then starts no
    worker threads. An idle worker spins after each call (measured here: most of a core
    for tens of ms) on the core the kernel copy or the hashing runs on."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


@main.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapter", type=directory)
@click.option("--merged", type=click.Path(path_type=Path), help="Merged checkpoint to check (weights and outputs).")
@click.option(
    "--module",
    help="A plain torch module: PKG.MOD:FACTORY returning the nn.Module; BASE (a .pt state dict, a safetensors file "
    "or directory) and --merged are loaded into it, and actions are compared (its action_kind: bins or continuous).",
)
@click.option("--onnx", "onnx_path", type=a_file, help="ONNX model to check in ONNX Runtime.")
@click.option(
    "--dynamic",
    "dynamic_path",
    type=a_file,
    help="Dynamic-adapter graph: checked with the adapter active and with none.",
)
@click.option(
    "--packed",
    "packed_path",
    type=a_file,
    help="The .onnx_adapter to activate on --dynamic (default: pack ADAPTER on the fly).",
)
@click.option(
    "--multi",
    "multi_path",
    type=a_file,
    help="Multi-adapter graph holding ADAPTER: its rows, no-adapter rows and a mixed batch.",
)
@click.option(
    "--part",
    "parts",
    multiple=True,
    metavar="NAME=FILE.onnx",
    help="--module: the graph of one part (export onnx --part NAME), checked alone on what the part receives and, "
    "with the other parts, as a chain whose actions are compared. Repeat.",
)
@click.option(
    "--engine",
    "engine_path",
    type=a_file,
    help="TensorRT engine (build trt): vs the unmerged reference and ONNX Runtime. Needs TensorRT and a GPU.",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Where ONNX Runtime runs --onnx (cuda: needs onnxruntime-gpu and an NVIDIA GPU).",
)
@ort_gpu_options
@click.option("--atol", type=float, help="Absolute output tolerance (default by dtype).")
@click.option("--rtol", type=float, help="Relative output tolerance (default by dtype).")
@click.option("--batch", type=int, default=2, show_default=True)
@click.option("--seq", type=int, default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--task", default="auto", show_default=True, help="Model task (see export onnx --task).")
@click.option(
    "--inputs",
    "inputs_path",
    type=a_file,
    help="Golden inputs (.npz of named arrays, e.g. real tokenized text): every output check runs on them too.",
)
@click.option(
    "--allow-no-effect",
    is_flag=True,
    help="Pass even when the adapter does not change the outputs beyond the tolerance (default: exit 1).",
)
@click.option(
    "--generate",
    "generate",
    type=click.IntRange(min=1),
    help="Check generation instead: N greedy tokens of each KV-cache graph (--onnx/--dynamic/--multi, export "
    "--task text-generation-with-past) or --merged, token for token against PEFT's unmerged generate.",
)
@click.option(
    "--genai",
    "genai_dir",
    type=directory,
    help="With --generate: an onnxruntime-genai folder (export genai); a dynamic one with its adapter active and none.",
)
@click.option("--report", type=a_file, help="Write the JSON report here.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --report file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@run_guarded
def verify(
    base,
    adapter,
    merged,
    onnx_path,
    dynamic_path,
    packed_path,
    multi_path,
    engine_path,
    inputs_path,
    generate,
    genai_dir,
    report,
    overwrite,
    as_json,
    module=None,
    parts=(),
    **params,
) -> None:
    """Check that artifacts compute what BASE + ADAPTER compute (exit 1 if not)."""
    from lora_deploy.errors import BadInputError
    from lora_deploy.io.staging import check_output
    from lora_deploy.proof.plain import parse_parts
    from lora_deploy.proof.verify import verify as run_verify

    options = VerifyOptions.from_params(click.get_current_context().params)
    inputs = [base, adapter, merged, onnx_path, dynamic_path, packed_path, multi_path, engine_path, inputs_path]
    inputs.append(genai_dir)
    if parts and module is None:
        raise BadInputError("--part checks the parts of a plain module: give --module package.module:factory")
    graphs_of_parts = parse_parts(parts)
    inputs += list(graphs_of_parts.values())
    if report:
        check_output(report, inputs, overwrite)  # before the work, not after it
    if module is None and base.is_file():
        raise BadInputError(f"{base}: not a checkpoint directory (a plain module's checkpoint file needs --module)")
    # Every path below takes verify's options (VerifyOptions) and refuses those it cannot use.
    graphs = {"merged_dir": merged, "onnx_path": onnx_path, "dynamic_path": dynamic_path}
    graphs.update(packed_path=packed_path, multi_path=multi_path, inputs_path=inputs_path)
    if module is not None:
        if generate is not None or genai_dir or engine_path:
            raise BadInputError(
                "--module checks --merged, --onnx, --dynamic and --multi on the CPU (no --generate, --genai "
                "or --engine yet)"
            )
        from lora_deploy.proof.plain import verify_module

        result = verify_module(base, adapter, module=module, parts=graphs_of_parts, **graphs, **options.kwargs())
    elif genai_dir is not None and generate is None:
        raise BadInputError("--genai checks generation: give --generate N")
    elif generate is not None and engine_path is not None:
        raise BadInputError("--engine checks outputs, not generation: drop --generate")
    elif generate is not None and genai_dir is not None:
        from lora_deploy.proof.genai import verify_genai

        result = verify_genai(base, adapter, genai_dir, generate, **graphs, **options.kwargs())
    elif generate is not None:
        from lora_deploy.proof.generate import verify_generation

        result = verify_generation(base, adapter, generate, **graphs, **options.kwargs())
    else:
        result = run_verify(base, adapter, engine_path=engine_path, **graphs, **options.kwargs())
    finish_verify(result, report, overwrite, inputs, as_json)


def finish_verify(result, report, overwrite, inputs, as_json) -> None:
    """The report file, the table or JSON, then exit 1 on a difference."""
    if report:
        write_json_atomic(report, result.to_dict(), overwrite=overwrite, inputs=inputs)
    if as_json:
        problem = result.problem()  # in the one JSON document, not a second one after it
        emit_json(result.to_dict() | ({} if problem is None else {"error": problem, "exit_code": 1}))
    else:
        print_checks(result)
    result.raise_if_different()


def print_checks(result) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    status = {"passed": "[green]pass[/]", "failed": "[red]FAIL[/]", "skipped": "[yellow]skip[/]"}
    table = Table("check", "result", "max abs", "cosine", "top-1")
    for c in result.checks:
        table.add_row(
            escape(c.name),  # names hold brackets: "outputs [generated]: ..."
            status[c.status],
            "-" if c.max_abs is None else f"{c.max_abs:.3g}",  # "-": not measured
            "" if c.cosine is None else f"{c.cosine:.7f}",
            "" if c.top1 is None else f"{100 * c.top1:.1f}%",
        )
    console = Console()
    console.print(table)
    for c in result.checks:
        if c.name.startswith(("effect", "actions")) or c.skipped:
            console.print(f"{c.name}: {'skipped: ' if c.skipped else ''}{c.detail}", markup=False, highlight=False)


def write_json_atomic(path: Path, data: dict, *, overwrite: bool = False, inputs=()) -> None:
    from lora_deploy.io.staging import write_file_atomic

    text = json.dumps(data, indent=2, default=str) + "\n"
    write_file_atomic(path, lambda f: f.write(text.encode("utf-8")), overwrite=overwrite, inputs=inputs)


@main.group()
def export() -> None:
    """Export a checkpoint to a deployable format."""


@export.command("onnx")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=a_file, required=True)
@click.option(
    "--module",
    help="A plain torch module: PKG.MOD:FACTORY (or path/to/file.py:FACTORY) returning the nn.Module; MODEL is "
    "then its checkpoint (a safetensors directory or file, or a .pt state dict read weights-only).",
)
@click.option(
    "--inputs",
    "inputs_path",
    type=click.Path(path_type=Path),
    help="--module: example inputs, an .npz whose array names are forward's arguments (e.g. recorded "
    "observations); default: the module's example_inputs().",
)
@click.option(
    "--static",
    is_flag=True,
    help="--module: fix every input dim to the example's (no dynamic batch); adapter graphs fix the LoRA rank too.",
)
@click.option(
    "--max-rank",
    type=int,
    help="--module --static adapter graphs: the fixed LoRA rank (default: the adapters' largest; smaller ranks are "
    "zero-padded by pack).",
)
@click.option(
    "--part",
    help="--module: export one part (a submodule path, e.g. blocks.0 or llm.model) on the inputs it receives in the "
    "whole model's forward on the example inputs; verify --part checks the parts' chain.",
)
@click.option(
    "--task",
    type=click.Choice(
        ["auto", "causal-lm", "sequence-classification", "token-classification", "feature-extraction"]
        + ["text-generation-with-past"]
    ),
    default="auto",
    show_default=True,
    help="text-generation-with-past: a decoder with its key/value cache as inputs and outputs (prefill and decode).",
)
@click.option("--opset", type=int, help="ONNX opset (default: the exporter's).")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "float16"]),
    default="float32",
    show_default=True,
    help="Graph dtype; auto follows the checkpoint (float16 stays float16, bfloat16 becomes float32).",
)
@click.option(
    "--stream-weights",
    is_flag=True,
    help="Trace without the weights and stream them from the checkpoint into OUT.data (memory: about one "
    "tensor); the ONNX Runtime check runs as --parity says.",
)
@click.option(
    "--parity",
    type=click.Choice(["auto", "full", "proxy", "skip"]),
    default="auto",
    show_default=True,
    help="--stream-weights: ONNX Runtime vs torch on the real model (full), on a 1-layer proxy of its config "
    "(proxy), or none; auto: full when it fits 1 GB, else proxy.",
)
@click.option(
    "--dynamic-adapters",
    is_flag=True,
    help="Keep LoRA separate: A/B of every targeted layer become overridable graph inputs (ONNX Runtime multi-LoRA).",
)
@click.option(
    "--multi-adapter",
    is_flag=True,
    help="One graph serving every --adapter at once; input adapter_ids picks one per batch row (-1 = base).",
)
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    type=directory,
    help="PEFT adapter whose targets (dynamic) or weights (multi) the graph takes. Repeat.",
)
@click.option("--targets", help="Dynamic graph targets without an adapter, e.g. q_proj,v_proj.")
@click.option(
    "--default-rank",
    type=click.IntRange(0, 1),
    default=0,
    show_default=True,
    help="--dynamic-adapters: rank of the zero LoRA defaults (1 for runtimes failing on a MatMul with K=0).",
)
@click.option(
    "--lora-defaults",
    type=click.Choice(["zeros", "none"]),
    default="zeros",
    show_default=True,
    help="--module --dynamic-adapters --static: none makes A/B required inputs, for TensorRT (its ONNX parser "
    "takes an input with a default as a constant weight); 'no adapter' is then zeros fed.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--json", "as_json", is_flag=True)
@run_guarded
def export_onnx(
    model,
    out,
    task,
    opset,
    dtype,
    stream_weights,
    parity,
    dynamic_adapters,
    multi_adapter,
    adapters,
    targets,
    default_rank,
    overwrite,
    as_json,
    module=None,
    inputs_path=None,
    static=False,
    part=None,
    max_rank=None,
    lora_defaults="zeros",
) -> None:
    """Export MODEL (an HF checkpoint directory; with --module a plain module's checkpoint) to
    ONNX, checked in ONNX Runtime."""
    from dataclasses import asdict

    from lora_deploy.errors import BadInputError
    from lora_deploy.export import export_checkpoint

    if dynamic_adapters or multi_adapter:
        if dynamic_adapters and multi_adapter:
            raise BadInputError("choose one of --dynamic-adapters and --multi-adapter")
        if stream_weights or (dtype != "float32" and (module is None or dtype != "float16")):
            raise BadInputError(
                "dynamic and multi-adapter graphs are exported with their weights, in float32 (a --module's also "
                "in float16)"
            )
        if default_rank and (multi_adapter or task == "text-generation-with-past"):
            raise BadInputError("--default-rank is for --dynamic-adapters graphs of the full sequence")
        if module is not None and task != "auto":
            raise BadInputError("--module adapter graphs take the module's own inputs: no --task")
        if static and module is None:
            raise BadInputError("--static adapter graphs are graphs of a --module")
        if part is not None:
            raise BadInputError("--part exports a part of a merged module; adapter graphs take the whole module")
        if lora_defaults != "zeros" and multi_adapter:
            raise BadInputError(
                "--lora-defaults none is for --dynamic-adapters: a multi-adapter graph's banks are its weights "
                "(TensorRT builds them in as such)"
            )
        if lora_defaults != "zeros" and (module is None or not static):
            raise BadInputError(
                "--lora-defaults none makes the LoRA inputs required inputs of fixed shape (for TensorRT): "
                "it needs --module and --static"
            )
        export_adapter_graph(
            model,
            out,
            task,
            opset,
            multi_adapter,
            adapters,
            targets,
            overwrite,
            as_json,
            default_rank,
            module,
            inputs_path,
            static,
            dtype,
            max_rank,
            lora_defaults,
        )
        return
    if default_rank:
        raise BadInputError("--default-rank needs --dynamic-adapters")
    if lora_defaults != "zeros":
        raise BadInputError("--lora-defaults needs --module --dynamic-adapters --static")
    if max_rank is not None:
        raise BadInputError("--max-rank fixes the LoRA rank of a --static --dynamic-adapters/--multi-adapter graph")
    if module is None and model.is_file():
        raise BadInputError(f"{model}: not a checkpoint directory (a plain module's checkpoint file needs --module)")
    if adapters or targets:
        raise BadInputError("--adapter and --targets need --dynamic-adapters or --multi-adapter")
    options = ExportOptions.from_params(click.get_current_context().params)
    run_export = export_checkpoint
    if task == "text-generation-with-past":
        from lora_deploy.export.generation import export_generation as run_export
    result = run_export(model, out, **options.kwargs())
    output_written(result.path)
    if as_json:
        emit_json(stamped(EXPORT_SCHEMA, asdict(result), {"model": model, "onnx": result.path}))
    else:
        error = "-" if result.max_abs_error is None else f"{result.max_abs_error:.2e}"
        check = f"ONNX Runtime vs torch max abs error {error}"
        if result.parity != "checked":
            check = f"{result.parity}: {check}" if result.parity.startswith("checked") else result.parity
        click.echo(
            f"exported {result.task} model to {result.path} (opset {result.opset}, {result.dtype}: "
            f"{result.dtype_source}; weights {result.weights}); {check}"
        )


@export.command("genai")
@click.argument("model", type=directory)
@click.option("-o", "--output", "out", type=directory, required=True, help="The model folder to write.")
@click.option(
    "--precision",
    type=click.Choice(list(GENAI_PRECISIONS)),
    default="fp32",
    show_default=True,
    help="fp32 and int4 build for the CPU; fp16 for CUDA (the builder has no fp16 CPU target).",
)
@click.option(
    "--dynamic-adapters",
    is_flag=True,
    help="Keep LoRA separate: the first --adapter's layers take overridable LoRA inputs; each adapter is written "
    "as NAME.onnx_adapter (og.Adapters / set_active_adapter switch them per generator).",
)
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    type=directory,
    help="PEFT adapter to ship with --dynamic-adapters (the first sets the LoRA layers). Repeat.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the folder's manifest as JSON.")
@run_guarded
def export_genai_cmd(model, out, precision, dynamic_adapters, adapters, overwrite, as_json) -> None:
    """Build an onnxruntime-genai model folder from MODEL with onnxruntime-genai's model builder."""
    from lora_deploy.errors import BadInputError
    from lora_deploy.export.genai import export_genai

    if dynamic_adapters != bool(adapters):
        raise BadInputError("--dynamic-adapters needs --adapter ADAPTER, and --adapter needs --dynamic-adapters")
    options = GenaiExportOptions.from_params(click.get_current_context().params)
    folder = export_genai(model, out, adapters=list(adapters), note=note, **options.kwargs())
    if as_json:
        emit_json(folder.manifest)
        return
    kind = f"dynamic, {len(folder.adapters)} adapter file(s)" if folder.dynamic else "merged"
    click.echo(
        f"built onnxruntime-genai folder {folder.path} ({folder.architecture}, {folder.precision} for "
        f"{folder.execution_provider}; {kind}); loads and generates in onnxruntime-genai"
    )


@main.command()
@click.option(
    "-o",
    "--output",
    "out",
    type=directory,
    default=Path("lora-deploy-demo"),
    show_default=True,
    help="Working directory for the example's files.",
)
@click.option("--family", type=click.Choice(["llama", "gpt2", "bert"]), default="llama", show_default=True)
@click.option(
    "--variant",
    default="plain",
    show_default=True,
    help="Adapter recipe: plain, rslora, patterns, lora_bias, dora, modules_to_save, embedding, all_linear.",
)
@run_guarded
def demo(out: Path, family: str, variant: str) -> None:
    """Run the whole deploy path on a built-in reference model and adapter."""
    from rich.console import Console
    from rich.table import Table

    from lora_deploy.examples.demo import run_demo

    console = Console()
    table = Table("stage", "time", "result", title=f"lora-deploy demo: {family} / {variant}")
    steps = run_demo(
        out,
        family=family,
        variant=variant,
        on_step=lambda s: console.print(f"[green]done[/] {s.name} ({s.seconds:.1f}s)"),
    )
    for s in steps:
        table.add_row(s.name, f"{s.seconds:.1f}s", s.result)
    console.print(table)
    console.print(f"all stages passed; artifacts in {out}")


@main.command("bench")
@click.option(
    "--model",
    "models",
    multiple=True,
    required=True,
    metavar="NAME=PATH",
    help="A variant to time: an .onnx file (onnxruntime) or an HF checkpoint directory (torch; with --module a "
    "checkpoint for the module). Repeat.",
)
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="[NAME=]PATH",
    help="Adapter for model NAME (default: the model named dynamic): an .onnx_adapter file active on "
    "every run (onnxruntime), or a PEFT adapter directory attached unmerged (torch).",
)
@click.option("--reference", help="Variant the others are compared with.  [default: base, else the first model]")
@click.option("--backend", type=click.Choice(list(registry.BACKENDS)), default="onnxruntime", show_default=True)
@click.option("--device", type=click.Choice(list(registry.DEVICES)), default="cpu", show_default=True)
@click.option(
    "--module",
    metavar="PACKAGE.MODULE:FACTORY",
    help="torch: a plain module from importable code (or path/to/file.py:FACTORY) returning the nn.Module; "
    "each --model PATH is then a checkpoint loaded into it (safetensors directory or file, or a .pt state dict "
    "read weights-only).",
)
@click.option(
    "--shapes",
    help="Comma-separated BATCHxSEQ; BATCHxSEQ+PAST (8x1+512) is a decode step of a KV-cache graph (SEQ new "
    "tokens after PAST cached ones).  [default: 1x1,1x128,8x128; with --inputs: the arrays' shape; with --module: "
    "the module's example_inputs() when it has them]",
)
@click.option(
    "--inputs",
    "inputs_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="An .npz of real inputs by input name (recorded observations, tokenized text); cast to each "
    "model's input types. Replaces --shapes.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="ONNX Runtime intra-op threads (inter-op is 1) / torch.set_num_threads.",
)
@click.option("--rounds", type=click.IntRange(min=1), default=50, show_default=True, help="Timed rounds per shape.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed calls per variant.")
@click.option(
    "--inner",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Calls per timed sample (raise it for sub-millisecond shapes).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample inputs.")
@click.option(
    "--generate",
    type=click.IntRange(min=1),
    metavar="N",
    help="KV-cache graphs: every shape is a prompt (BATCHxPROMPT) and every round one greedy generation of N new "
    "tokens per row; reports prefill and per-token decode latency (p50/p99) and tokens/s, gates on whole generations.",
)
@click.option(
    "--until-width",
    help="Adaptive rounds: after --rounds, keep adding rounds until every interval the gates decide on is at most "
    "this wide (relative), e.g. 1%, or --max-time is spent.",
)
@click.option("--max-time", help="Time budget of --until-width, e.g. 120s or 5min.  [default: 120s]")
@click.option("--cuda-graphs", is_flag=True, help="torch on cuda: replay each shape's forward from a CUDA graph.")
@ort_gpu_options
@click.option("--json", "json_path", type=a_file, help="Write the JSON report (schema lora-deploy.bench/3).")
@click.option("--markdown", "markdown_path", type=a_file, help="Write a Markdown summary.")
@click.option("--plot", "plot_path", type=a_file, help="Write a PNG plot of p50 latency.")
@click.option("--overwrite", is_flag=True, help="Replace existing --json/--markdown/--plot files.")
@click.option("--max-overhead", help="Exit 1 if a variant is provably slower than the reference by more, e.g. 2%.")
@click.option(
    "--baseline",
    "baseline_path",
    type=a_file,
    help="Earlier JSON report to check for regressions.",
)
@click.option(
    "--baseline-model",
    type=click.Path(exists=True, path_type=Path),
    help="The previous release's artifact: timed as 'previous' (the reference) in the same interleaved run and "
    "gated with --max-regression. The recommended regression gate.",
)
@click.option(
    "--max-regression",
    help="Allowed slowdown against --baseline or --baseline-model, e.g. 5%.  [default with either: 5%]",
)
@click.option(
    "--run-margin",
    help="Between-run allowance added to --max-regression against a saved --baseline.  [default: 3%]",
)
@click.option(
    "--allow-mismatch",
    is_flag=True,
    help="Compare with a --baseline of another configuration (threads, machine, libraries, inputs) "
    "instead of refusing; its gates are then inconclusive.",
)
@click.option(
    "--noise-runs",
    type=click.IntRange(min=3),
    help="Record a baseline's noise floor: repeat the measurement N times (every model reopened), store the spread "
    "of their medians; a later --baseline comparison against this report calibrates its margin from it.",
)
@click.option(
    "--sessions",
    type=click.IntRange(min=1),
    help="Sessions per variant: the rounds (or --duration) split between K fresh opens of every model, the "
    "intervals resampling sessions, then rounds; 1 leaves session-to-session variation out of them.  "
    "[default: 3; 1 with --until-width or --noise-runs]",
)
@click.option(
    "--on-inconclusive",
    type=click.Choice(["pass", "warn", "fail"]),
    default="warn",
    show_default=True,
    help="What a gate that cannot decide does (warn: passes, with a warning on stderr).",
)
@click.option("--rate", help="Control-loop mode: one call per tick at this rate, e.g. 100hz; ticks alternate variants.")
@click.option("--duration", help="Control-loop mode: how long each shape runs, e.g. 30s.  [default: 30s]")
@click.option("--max-p99", help="Control-loop mode: exit 1 if a variant's p99 exceeds this, e.g. 8ms (this machine).")
@click.option(
    "--max-misses",
    type=click.IntRange(min=0),
    help="Control-loop mode: exit 1 if a variant misses more deadlines (a call ending after the next tick).",
)
@click.option("--quiet", is_flag=True, help="No progress bar and no summary table.")
@run_guarded
def bench_cmd(
    models,
    adapters,
    reference,
    backend,
    device,
    module,
    shapes,
    inputs_path,
    threads,
    rounds,
    warmup,
    inner,
    seed,
    generate,
    until_width,
    max_time,
    cuda_graphs,
    provider,
    trt_fp16,
    trt_cache,
    json_path,
    markdown_path,
    plot_path,
    overwrite,
    max_overhead,
    baseline_path,
    baseline_model,
    max_regression,
    run_margin,
    allow_mismatch,
    noise_runs,
    sessions,
    on_inconclusive,
    rate,
    duration,
    max_p99,
    max_misses,
    quiet,
) -> None:
    """Time model variants interleaved and gate the overhead (exit 1 when a gate fails).

    Files are written before the gates are checked, so a failure keeps its evidence.
    """
    from lora_deploy.bench import bench, parse_adapter_specs, parse_model_specs, to_markdown
    from lora_deploy.progress import bench_progress

    options = BenchOptions.from_params(click.get_current_context().params)
    model_specs = parse_model_specs(models)
    adapter_specs = parse_adapter_specs(adapters, list(model_specs))
    show = None if quiet else (lambda report: click.echo(to_markdown(report), nl=False))
    with bench_progress(enabled=not quiet) as progress:
        bench(
            model_specs,
            adapters=adapter_specs,
            json_path=json_path,
            markdown_path=markdown_path,
            plot_path=plot_path,
            overwrite=overwrite,
            show=show,
            warn=lambda message: click.echo(f"warning: {message}", err=True),
            progress=progress,
            **options.kwargs(),
        )


def export_adapter_graph(
    model,
    out,
    task,
    opset,
    multi,
    adapters,
    targets,
    overwrite,
    as_json,
    default_rank=0,
    module=None,
    inputs_path=None,
    static=False,
    dtype="float32",
    max_rank=None,
    lora_defaults="zeros",
) -> None:
    from lora_deploy.errors import BadInputError

    if max_rank is not None and module is None:
        raise BadInputError("--max-rank fixes the LoRA rank of a --static adapter graph of a --module")
    if module is not None and multi:
        from lora_deploy.export.dynamic_module import export_multi_module

        if not adapters or targets:
            raise BadInputError("--multi-adapter needs at least one --adapter (and takes no --targets)")
        graph = export_multi_module(
            model,
            out,
            list(adapters),
            module=module,
            inputs_path=inputs_path,
            opset=opset,
            overwrite=overwrite,
            static=static,
            dtype=dtype,
            max_rank=max_rank,
        )
    elif module is not None:
        from lora_deploy.export.dynamic_module import export_dynamic_module

        if not adapters and not targets:
            raise BadInputError("--dynamic-adapters needs --adapter ADAPTER or --targets q,v")
        target_list = [t.strip() for t in targets.split(",") if t.strip()] if targets else None
        graph = export_dynamic_module(
            model,
            out,
            module=module,
            adapters=list(adapters),
            targets=target_list,
            inputs_path=inputs_path,
            opset=opset,
            default_rank=default_rank,
            overwrite=overwrite,
            static=static,
            dtype=dtype,
            max_rank=max_rank,
            lora_defaults=lora_defaults,
        )
    elif task == "text-generation-with-past":
        from lora_deploy.export.generation import export_generation_adapters

        target_list = [t.strip() for t in targets.split(",") if t.strip()] if targets else None
        graph = export_generation_adapters(
            model, out, adapters=list(adapters), targets=target_list, multi=multi, opset=opset, overwrite=overwrite
        )
    elif multi:
        from lora_deploy.export.multi import export_multi

        if not adapters:
            raise BadInputError("--multi-adapter needs at least one --adapter")
        graph = export_multi(model, out, list(adapters), task=task, opset=opset, overwrite=overwrite)
    else:
        from lora_deploy.export.dynamic import export_dynamic

        if not adapters and not targets:
            raise BadInputError("--dynamic-adapters needs --adapter ADAPTER or --targets q_proj,v_proj")
        target_list = [t.strip() for t in targets.split(",") if t.strip()] if targets else None
        graph = export_dynamic(
            model,
            out,
            adapters=list(adapters),
            targets=target_list,
            task=task,
            opset=opset,
            default_rank=default_rank,
            overwrite=overwrite,
        )
    output_written(graph.path)
    info = {
        "path": str(graph.path),
        "task": graph.task,
        "output": graph.output,
        "outputs": graph.outputs,
        "modules": sorted(graph.slots),
        "skipped": graph.skipped,
        "adapters": graph.adapters,
        "lora_inputs": graph.lora_inputs() if not multi else [],
        "dtype": graph.dtype,
        "rank": graph.rank,  # a static graph's fixed LoRA rank (null: symbolic)
        "lora_defaults": "zeros" if graph.lora_defaults else "none",  # none: required LoRA inputs (TensorRT)
    }
    for module in graph.skipped:
        note(f"skipped {module}: the {graph.task} graph does not compute it, so a LoRA there changes no output")
    if as_json:
        artifacts = {"model": model, "onnx": graph.path} | {f"adapter {i + 1}": a for i, a in enumerate(adapters)}
        emit_json(stamped(EXPORT_SCHEMA, info, artifacts))
    else:
        kind = f"multi-adapter graph ({len(graph.adapters)} adapters)" if multi else "dynamic-adapter graph"
        kind = f"KV-cache {kind}" if task == "text-generation-with-past" else kind
        shape = f", {graph.dtype}" + (f", static (LoRA rank {graph.rank})" if graph.rank is not None else "")
        shape += "" if graph.lora_defaults else ", LoRA inputs required (no defaults: for TensorRT)"
        click.echo(f"exported {kind} to {graph.path}: {len(graph.slots)} LoRA layers{shape}, checked in ONNX Runtime")


@main.command()
@click.argument("adapter", type=directory)
@click.option(
    "-o",
    "--output",
    "out",
    type=a_file,
    required=True,
    help="The .onnx_adapter file to write.",
)
@click.option(
    "--onnx",
    "onnx_path",
    type=a_file,
    help="Dynamic graph to check names and shapes against.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option(
    "--dtype",
    type=click.Choice(list(PACK_DTYPES)),
    help="dtype of the packed A and B (the graph's LoRA inputs must have it); default: --onnx's LoRA dtype, "
    "else float32.",
)
@run_guarded
def pack(adapter, out, onnx_path, overwrite, dtype) -> None:
    """Write ADAPTER in ONNX Runtime's adapter format for a dynamic-adapter graph."""
    from lora_deploy.backends.onnxrt.lora_format import pack_adapter

    path = pack_adapter(adapter, out, onnx_path=onnx_path, overwrite=overwrite, dtype=dtype, note=note)
    click.echo(f"packed {adapter} into {path} ({path.stat().st_size / 1e3:.1f} kB); scaling folded into B")


@main.group()
def build() -> None:
    """Build a runtime engine from an ONNX model."""


@build.command("trt")
@click.argument("model", type=a_file)
@click.option("-o", "--output", "out", type=a_file, required=True, help="The engine (MODEL.engine.json beside it).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option(
    "--shapes",
    multiple=True,
    default=(),
    metavar="NAME:MIN,OPT,MAX",
    help="Profile of a dynamic input, e.g. input_ids:1x1,1x128,8x512. Repeat.  [default: from the ONNX dims]",
)
@click.option("--timing-cache", type=a_file, help="Timing cache to read and update (specific to GPU, CUDA, TensorRT).")
@click.option("--refittable", type=click.Choice(["none", "all", "adapter-targets"]), default="none", show_default=True)
@click.option("--refit-targets", help="Modules whose weights adapter-targets marks refittable, e.g. q_proj,v_proj.")
@click.option("--strip-weights", is_flag=True, help="Leave refittable weights out of the plan (refit at deploy time).")
@click.option("--hardware-compat", type=click.Choice(["same", "ampere+"]), default="same", show_default=True)
@click.option("--version-compatible", is_flag=True, help="An engine later TensorRT versions can run (slower).")
@click.option("--workspace", help="Builder workspace limit, e.g. 4GB.")
@click.option("--base", type=directory, help="Checkpoint the ONNX was exported from: checks the weight name map.")
@click.option(
    "--converter",
    type=click.Choice(["builtin", "modelopt"]),
    default="builtin",
    show_default=True,
    help="TensorRT 11 fp16/bf16: what converts the ONNX (modelopt: nvidia-modelopt's autocast).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing engine and manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the engine manifest as JSON.")
@run_guarded
def build_trt(model, out, as_json, **params) -> None:
    """Build a TensorRT engine from MODEL (an .onnx file). Needs TensorRT and an NVIDIA GPU."""
    from lora_deploy.backends.trt.build import build_engine

    options = TrtBuildOptions.from_params(click.get_current_context().params)
    result = build_engine(model, out, **options.kwargs())
    output_written(out)
    if as_json:
        emit_json(result.manifest)
    else:
        click.echo(result.summary())


@main.command("refit")
@click.argument("engine", type=a_file)
@click.option("--base", type=directory, required=True, help="The base checkpoint the engine was built from.")
@click.option("--adapter", type=directory, required=True, help="The PEFT adapter to switch to.")
@click.option(
    "-o",
    "--output",
    "out",
    type=a_file,
    required=True,
    help="Write the refitted engine here (ENGINE is never changed).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing -o engine.")
@run_guarded
def refit_cmd(engine, base, adapter, **params) -> None:
    """Refit ENGINE to BASE + ADAPTER (W0 + dW from the base), no rebuild. Needs TensorRT and a GPU."""
    from lora_deploy.backends.trt.refit import refit_engine

    options = TrtRefitOptions.from_params(click.get_current_context().params)
    click.echo(refit_engine(engine, base, adapter, **options.kwargs()).summary())


@main.command("run")
@click.argument("pipeline", type=a_file, required=False)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a field of the pipeline file, e.g. steps.bench.rounds=5, gates.max_overhead=2%, out=dist. Repeat.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="The artifact bundle directory.  [default: the file's out:]",
)
@click.option("--only", multiple=True, metavar="STEP", help="Run only this step (and what it needs). Repeat.")
@click.option("--force", is_flag=True, help="Run every step again, whatever the cache holds.")
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    help="Steps run at once (adapters in parallel; bench always runs alone).  [default: the cores, at most 4]",
)
@click.option(
    "--ray",
    "ray_address",
    metavar="ADDRESS",
    help="Run the steps as tasks of this Ray cluster (local: start one for the run); the cache must be on "
    "storage every node reaches. Needs the ray extra.",
)
@click.option("--schema", is_flag=True, help="Print the JSON Schema of the pipeline format and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the pipeline manifest as JSON (step lines go to stderr).")
@run_guarded
def run_cmd(pipeline, overrides, out, only, force, jobs, ray_address, schema, as_json) -> None:
    """Run a pipeline file: every step into an artifact bundle that replaces the old one only
    when every required step passed (exit 1 when a gate or verification failed)."""
    from lora_deploy.errors import BadInputError

    if schema:
        from lora_deploy.pipeline.spec import pipeline_schema

        emit_json(pipeline_schema())
        return
    if pipeline is None:
        raise BadInputError("give a pipeline file: lora-deploy run PIPELINE.yaml (or --schema)")
    from lora_deploy.pipeline.run import PipelineFailed, run_pipeline, steps_running

    def echo(line: str) -> None:
        click.echo(line, err=as_json)

    try:
        result = run_pipeline(
            pipeline, overrides=overrides, out=out, only=only, force=force, jobs=jobs, ray=ray_address, echo=echo
        )
    except PipelineFailed as exc:
        if as_json:
            emit_json(exc.manifest | {"error": str(exc), "exit_code": exc.exit_code})
        raise
    except KeyboardInterrupt as exc:  # the run has cleaned up; its step threads cannot be stopped
        if steps_running():
            exit_interrupted(exc, now=True)
        raise
    if as_json:
        emit_json(result.manifest)
        return
    s = result.manifest["summary"]
    click.echo(
        f"bundle {result.out}: {s['passed']} steps passed ({s['cached']} from the cache), {s['skipped']} skipped, "
        f"in {s['seconds']:.1f}s; manifest {result.out / 'pipeline-manifest.json'}"
    )
