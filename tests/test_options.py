"""Each stage's options record, its CLI command and its API function name the same settings."""

import inspect
from dataclasses import fields

import pytest

from lora_deploy import options
from lora_deploy.backends.onnxrt.lora_format import pack_adapter
from lora_deploy.backends.trt.build import build_engine
from lora_deploy.backends.trt.refit import refit_engine
from lora_deploy.bench import run_bench
from lora_deploy.cli import main
from lora_deploy.export import export_checkpoint
from lora_deploy.export.genai import export_genai
from lora_deploy.merge import merge
from lora_deploy.merge.combine import METHODS, combine_adapters, compress_adapter
from lora_deploy.proof.generate import verify_generation
from lora_deploy.proof.plain import verify_module
from lora_deploy.proof.verify import verify

CASES = [
    (options.MergeOptions, ("merge",), merge),
    (options.ExportOptions, ("export", "onnx"), export_checkpoint),
    (options.GenaiExportOptions, ("export", "genai"), export_genai),
    (options.PackOptions, ("pack",), pack_adapter),
    (options.VerifyOptions, ("verify",), verify),
    (options.BenchOptions, ("bench",), run_bench),
    (options.TrtBuildOptions, ("build", "trt"), build_engine),
    (options.TrtRefitOptions, ("refit",), refit_engine),
    (options.CompressOptions, ("compress",), compress_adapter),
    (options.CombineOptions, ("combine",), combine_adapters),
]


def command(path):
    cmd = main
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def flag_default(param):
    """click's default, with its "no default" sentinel read as the value the command then gets."""
    if type(param.default).__name__ == "Sentinel":
        return False if getattr(param, "is_flag", False) else None
    return param.default


@pytest.mark.parametrize("record, path, api", CASES, ids=[c[0].__name__ for c in CASES])
def test_every_field_is_a_flag_and_a_keyword(record, path, api):
    names = [f.name for f in fields(record)]
    params = {p.name: p for p in command(path).params}
    keywords = inspect.signature(api).parameters
    for name in names:
        assert name in params, f"{' '.join(path)} has no flag for {record.__name__}.{name}"
        assert name in keywords, f"{api.__name__} takes no {name}"
        default = record.__dataclass_fields__[name].default
        assert flag_default(params[name]) == default, (name, params[name].default, default)
        assert keywords[name].default == default, (name, keywords[name].default, default)


@pytest.mark.parametrize("api", [verify_generation, verify_module], ids=lambda f: f.__name__)
def test_every_verify_entry_point_takes_the_verify_options(api):
    """`verify --generate` and `--module` get the same **VerifyOptions.kwargs() as verify
    (each refuses what it cannot use): their keywords cannot drift from the record."""
    keywords = inspect.signature(api).parameters
    for f in fields(options.VerifyOptions):
        assert f.name in keywords, f"{api.__name__} takes no {f.name}"
        assert keywords[f.name].default == f.default, (f.name, keywords[f.name].default, f.default)


def test_records_are_frozen_and_hashable():
    merge_options = options.MergeOptions(dtype="float16")
    with pytest.raises(AttributeError):
        merge_options.dtype = "float32"
    assert hash(merge_options) == hash(options.MergeOptions(dtype="float16"))
    assert merge_options.kwargs() == {
        "dtype": "float16",
        "max_shard_size": "5GB",
        "overwrite": False,
        "durable": False,
        "sha256": False,
        "rehash": False,
        "onto": None,
        "blocksize": None,
        "double_quant": False,
        "skip_modules": (),
        "requantize": None,
    }


def test_from_params_takes_only_its_fields():
    picked = options.VerifyOptions.from_params({"atol": 0.1, "merged": "x", "debug": True})
    assert picked == options.VerifyOptions(atol=0.1)


def test_combine_methods_are_the_registry():
    assert options.COMBINE_METHODS == tuple(METHODS)
