"""Build of the optional compiled kernels; everything else is in pyproject.toml.

Layout: lora_deploy/_native/ holds one C file per extension module (its __init__.py lists
them and loads them: `kernel(name)`). Each is `optional`: without a C compiler, or if one
fails, the install still succeeds and the callers run their numpy code, which gives the
same results (LORA_DEPLOY_NATIVE=0 forces that code where the kernels are built).

    lora_deploy._native._f16     f16.c     float16 <-> float32, the merge's fused block (lora_deploy.arrays)
    lora_deploy._native._quant4  quant4.c  NF4/FP4 fake quantization (lora_deploy.merge.bnb)

No -march flags: x86 vector code is compiled per function (target attributes) and chosen
at run time, so one build runs on any x86-64. -ffp-contract=off keeps every a*b+c two
float32 roundings, never one FMA, so the kernels equal the numpy code bit for bit.
Declared here, not in pyproject.toml: setuptools still calls its pyproject ext-modules
table experimental.
"""

import os

from setuptools import Extension, setup

FLAGS = [] if os.name == "nt" else ["-ffp-contract=off"]  # gcc and clang; MSVC has no such flag


def kernel(name: str, source: str) -> Extension:
    return Extension(
        f"lora_deploy._native.{name}", [f"lora_deploy/_native/{source}"], extra_compile_args=FLAGS, optional=True
    )


setup(ext_modules=[kernel("_f16", "f16.c"), kernel("_quant4", "quant4.c")])
