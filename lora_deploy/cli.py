"""The `lora-deploy` command: a thin click layer over the Python API.

Every command maps errors to one line on stderr and an exit code: 0 success,
1 verification found a difference (or a gate failed), 2 bad input.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import LoraDeployError

existing_dir = click.Path(exists=False, file_okay=False, path_type=Path)


def run_guarded(fn):
    """Turn typed errors into one line and an exit code; --debug shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except LoraDeployError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug: keep the promise of one line, point at --debug
            if debug:
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            click.echo(f"error: unexpected {type(exc).__name__}: {first[:300]} (rerun with --debug)", err=True)
            sys.exit(2)

    return wrapper


def emit_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lora-deploy")
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


@main.command("inspect")
@click.argument("adapter", type=existing_dir)
@click.option("--base", type=existing_dir, help="Base checkpoint: resolve targets and report the trainable fraction.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@run_guarded
def inspect_cmd(adapter: Path, base: Path | None, as_json: bool) -> None:
    """Show an adapter's variant, targets, per-module r/alpha/scaling and size."""
    from .describe import describe_adapter

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
        table.add_row(m["module"], str(m["r"]), f"{m['alpha']:g}", f"{m['scaling']:.4g}",
                      m.get("kind", "embedding" if m["embedding"] else "-"), f"{m['parameters']:,}")
    console.print(table)
    line = f"trainable parameters: {info['trainable_parameters']:,}"
    if "trainable_fraction" in info:
        line += f" ({100 * info['trainable_fraction']:.3f}% of {info['base_parameters']:,})"
    console.print(line)
    if info["replaced_tensors"]:
        console.print(f"replaces base tensors: {', '.join(info['replaced_tensors'])}")


@main.command()
@click.argument("base", type=existing_dir)
@click.argument("adapter", type=existing_dir)
@click.option("-o", "--output", "out", type=existing_dir, required=True, help="Output checkpoint directory.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True, help="Output dtype; auto keeps each tensor's base dtype.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 2GB, 500MB.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the merge manifest as JSON.")
@run_guarded
def merge(base: Path, adapter: Path, out: Path, dtype: str, max_shard_size: str, overwrite: bool, as_json: bool) -> None:
    """Merge ADAPTER into BASE, shard by shard, writing an ordinary HF checkpoint."""
    from .merge import merge as run_merge
    from .progress import byte_progress

    with byte_progress("merging", enabled=not as_json) as progress:
        result = run_merge(base, adapter, out, dtype=dtype, max_shard_size=max_shard_size,
                           overwrite=overwrite, progress=progress)
    if as_json:
        emit_json(result.manifest)
    else:
        click.echo(result.summary())
