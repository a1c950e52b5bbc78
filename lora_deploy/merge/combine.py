"""`compress` and `combine`: new PEFT adapters made from the updates of existing ones.

compress truncates each module's s·B·A to a lower rank (the best one, Eckart–Young);
combine makes one adapter whose update is a weighted combination of several adapters'
updates: exactly (linear, cat: stacked factors), re-factored to a rank (svd), or by TIES
or DARE on the dense updates of one module at a time, re-factored to a rank.

Outputs are written with scaling 1 (adapter.write): every input's scaling, rsLoRA's
included, is folded into the factors. Each module reports the error of its rank (the
discarded singular values) and the error measured on the factors as written, after
rounding to the output dtype.

Refused in one line, before anything is written: DoRA adapters (the magnitude vector
rescales W0 + ΔW, so it is not a term that can be truncated or summed), and in combine,
adapters for different bases, modules of different shapes, a lora_B bias under ties or
dare, and base tensors replaced (modules_to_save) differently by different adapters.
Replaced tensors that all adapters agree on, and compress's, are carried over unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from lora_deploy.adapter.read import Adapter, LoraModule, load_adapter, read_tensors, split_part
from lora_deploy.adapter.spectrum import lowrank_norm, module_spectrum, product_factors, rank_for_energy
from lora_deploy.adapter.write import Factors, lora_config, saved_tensors, write_adapter
from lora_deploy.errors import AdapterError, BadInputError
from lora_deploy.merge.arith import LowRank, dare, dense_truncate, stack, stacked_sum, ties, truncate, truncated_sum

COMPRESS_SCHEMA = "lora-deploy.compress/1"
COMBINE_SCHEMA = "lora-deploy.combine/1"
# combine --method: whether it is exact, and whether it takes --rank / --density.
METHODS = {
    "linear": {"exact": True, "rank": False, "density": False},
    "cat": {"exact": True, "rank": False, "density": False},
    "svd": {"exact": False, "rank": True, "density": False},
    "ties": {"exact": False, "rank": True, "density": True},
    "dare": {"exact": False, "rank": True, "density": True},
}


def refuse_dora(adapter: Adapter, doing: str) -> None:
    if adapter.config.use_dora:
        raise AdapterError(
            f"{adapter.path}: DoRA adapters cannot be {doing}: the magnitude vector rescales W0 + ΔW, "
            "so the update is not a low-rank term (merge it into the base instead)"
        )


def stored_factors(module: LoraModule, low: LowRank, dtype, bias: np.ndarray | None = None) -> Factors:
    """A product-layout LowRank in PEFT's stored shapes for this module, in `dtype`."""
    rank = low.rank
    a = low.a.reshape(rank, *module.a.shape[1:]).astype(dtype)
    b = low.b.reshape(module.b.shape[0], rank, *module.b.shape[2:]).astype(dtype)
    return Factors(a, b, module.embedding, None if bias is None else np.asarray(bias).astype(dtype))


def measured_error(terms: list[tuple[float, np.ndarray, np.ndarray]], written: Factors) -> float:
    """‖Σ c·b@a − B'A'‖_F with B', A' the factors as written (rounded), from the factors."""
    b = written.b.reshape(written.b.shape[0], written.rank)
    a = written.a.reshape(written.rank, -1)
    return lowrank_norm(*stack([*terms, (-1.0, b, a)]))


def carried_tensors(adapter: Adapter) -> dict[str, np.ndarray]:
    """The adapter's non-LoRA tensors (modules_to_save, trained biases) under their saved names."""
    if not adapter.replacements:
        return {}
    tensors, _ = read_tensors(adapter.path)
    return {k: t for k, t in tensors.items() if split_part(k)[1] is None and ".lora_" not in k}


def relative(error: float, norm: float) -> float:
    return error / norm if norm > 0 else 0.0


# ------------------------------------------------------------------------ compress


def compress_adapter(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    per_module: bool = False,
    overwrite: bool = False,
) -> dict:
    """Truncate every module's update to a lower rank and write the result as a PEFT adapter.

    rank=R: every module at min(R, its rank). energy=E: each module's smallest rank holding
    E of its ‖ΔW‖_F²; with per_module each keeps its own (rank_pattern), else all take the
    largest of them. Returns the report (per-module error bound and measured error).
    """
    if (rank is None) == (energy is None):
        raise BadInputError("compress: give exactly one of --rank and --energy")
    if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank < 1):
        raise BadInputError(f"compress: --rank must be a positive integer, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise BadInputError(f"compress: --energy must be in (0, 1], got {energy}")
    if per_module and energy is None:
        raise BadInputError("compress: --per-module applies to --energy (with --rank every module gets that rank)")
    source = load_adapter(adapter)
    refuse_dora(source, "compressed")
    modules, rows = {}, []
    with threadpool_limits(limits=1, user_api="blas"):  # rank-r work: see adapter.analysis
        # The singular values first (cheap), to choose the ranks; then one module at a time,
        # so the singular vectors of only one are held.
        sigmas = {name: module_spectrum(m, vectors=False).sigma for name, m in source.modules.items()}
        ranks = choose_ranks(sigmas, rank, energy, per_module)
        for name, module in source.modules.items():
            written, row = compress_module(module, ranks[name])
            modules[name] = written
            rows.append(row)
    tensors = saved_tensors(modules) | carried_tensors(source)
    config = lora_config(source.config.raw, modules)
    path = write_adapter(out, config, tensors, overwrite=overwrite, inputs=[adapter])
    return {
        "schema": COMPRESS_SCHEMA,
        "adapter": str(Path(adapter)),
        "output": str(path),
        "rank": rank,
        "energy": energy,
        "per_module": per_module,
        "carried": sorted(carried_tensors(source)) if source.replacements else [],
        **totals(rows),
        "modules": rows,
    }


def choose_ranks(sigmas: dict[str, np.ndarray], rank, energy, per_module: bool) -> dict[str, int]:
    """Each module's rank: min(rank, its own), or the smallest holding `energy` (each its own
    with per_module, else the largest of them for all)."""
    if rank is not None:
        return {name: min(int(rank), len(sigma)) for name, sigma in sigmas.items()}
    needed = {name: max(1, rank_for_energy(sigma, energy)) for name, sigma in sigmas.items()}
    if per_module:
        return needed
    uniform = max(needed.values())
    return {name: min(uniform, len(sigma)) for name, sigma in sigmas.items()}


def compress_module(module: LoraModule, rank: int) -> tuple[Factors, dict]:
    """The module's best rank-`rank` factors (in its dtype) and its report row."""
    low = truncate(module_spectrum(module), rank)
    bias = None if module.bias is None else module.scaling * np.asarray(module.bias, dtype=np.float64)
    written = stored_factors(module, low, module.a.dtype, bias)
    return written, {
        "module": module.name,
        "r": module.r,
        "rank": written.rank,
        "error": low.error,
        "relative_error": relative(low.error, low.norm),
        "measured_error": measured_error([(module.scaling, *product_factors(module))], written),
        "bytes_before": module.a.nbytes + module.b.nbytes,
        "bytes_after": written.a.nbytes + written.b.nbytes,
    }


def totals(rows: list[dict]) -> dict:
    return {
        "max_relative_error": max((r["relative_error"] for r in rows), default=0.0),
        "bytes_before": sum(r.get("bytes_before", 0) for r in rows),
        "bytes_after": sum(r.get("bytes_after", 0) for r in rows),
    }


# ------------------------------------------------------------------------ combine


def combine_adapters(
    adapters: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    method: str = "linear",
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """One adapter whose update is the weighted combination of the adapters' updates.

    linear / cat: Σ wᵢ·sᵢ·BᵢAᵢ exactly (rank Σ rᵢ, the same stacking under both names);
    svd: that sum re-factored to `rank` (default: the largest input rank); ties / dare:
    TIES or DARE of the modules' dense updates at `density`, re-factored to `rank`.
    Modules some adapters lack take the terms of those that hold them.
    """
    paths = list(adapters)
    if len(paths) < 2:
        raise BadInputError("combine: give at least two adapters")
    if method not in METHODS:
        raise BadInputError(f"combine: unknown method {method!r} (one of {', '.join(METHODS)})")
    spec = METHODS[method]
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise BadInputError(f"combine: {len(weights)} weights for {len(paths)} adapters")
    if not all(np.isfinite(weights)):
        raise BadInputError("combine: --weights must be finite numbers")
    if rank is not None and not spec["rank"]:
        raise BadInputError(f"combine: --method {method} is exact; --rank applies to svd, ties and dare")
    if density is None and spec["density"]:
        raise BadInputError(f"combine: --method {method} needs --density (the fraction of entries kept)")
    if density is not None and not spec["density"]:
        raise BadInputError(f"combine: --density applies to ties and dare, not {method}")
    if density is not None and not 0 < density <= 1:
        raise BadInputError(f"combine: --density must be in (0, 1], got {density}")
    if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank < 1):
        raise BadInputError(f"combine: --rank must be a positive integer, got {rank}")
    sources = [load_adapter(p) for p in paths]
    check_combinable(sources, method)
    names = list(dict.fromkeys(name for s in sources for name in s.modules))
    holders = {name: [(s, w) for s, w in zip(sources, weights) if name in s.modules] for name in names}
    if spec["rank"]:
        rank = check_rank(rank, method, sources, holders)
    dtypes = {s.modules[n].a.dtype for s in sources for n in s.modules}
    dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
    modules, rows = {}, []
    # Rank-r work runs on one BLAS thread (see adapter.analysis); ties and dare factor dense
    # matrices, where the threads help.
    threads = contextlib.nullcontext() if spec["density"] else threadpool_limits(limits=1, user_api="blas")
    with threads:
        for index, name in enumerate(names):
            module = holders[name][0][0].modules[name]
            terms = [(w * s.modules[name].scaling, *product_factors(s.modules[name])) for s, w in holders[name]]
            low, target = combine_module(method, terms, holders[name], name, rank, density, seed, index)
            biases = [
                w * s.modules[name].scaling * np.asarray(s.modules[name].bias, dtype=np.float64)
                for s, w in holders[name]
                if s.modules[name].bias is not None
            ]
            bias = sum(biases) if biases else None
            written = stored_factors(module, low, dtype, bias)
            modules[name] = written
            if target is None:
                measured = measured_error(terms, written)
            else:
                b, a = written.b.reshape(written.b.shape[0], -1), written.a.reshape(written.rank, -1)
                measured = float(np.linalg.norm(target - b.astype(np.float64) @ a.astype(np.float64)))
            rows.append(
                {
                    "module": name,
                    "adapters": len(holders[name]),
                    "rank": written.rank,
                    "error": low.error,
                    "relative_error": relative(low.error, low.norm),
                    "measured_error": measured,
                }
            )
    tensors = saved_tensors(modules) | carried_tensors(sources[0])
    config = lora_config(sources[0].config.raw, modules, target_modules=sorted(names))
    config["base_model_name_or_path"] = next(
        (s.config.base_model_name_or_path for s in sources if s.config.base_model_name_or_path), None
    )
    path = write_adapter(out, config, tensors, overwrite=overwrite, inputs=paths)
    return {
        "schema": COMBINE_SCHEMA,
        "adapters": [str(Path(p)) for p in paths],
        "output": str(path),
        "method": method,
        "exact": spec["exact"],
        "weights": weights,
        "rank": rank,
        "density": density,
        "seed": seed if method == "dare" else None,
        "max_relative_error": max(r["relative_error"] for r in rows),
        "modules": rows,
    }


def combine_module(method, terms, holders, name, rank, density, seed, index) -> tuple[LowRank, np.ndarray | None]:
    """The module's combined factors, and for ties/dare the dense matrix they approximate."""
    if method in ("linear", "cat"):
        return stacked_sum(terms), None
    if method == "svd":
        return truncated_sum(terms, rank), None
    deltas = [s.modules[name].scaling * (b @ a) for (s, _), (_, b, a) in zip(holders, terms)]
    weights = [w for _, w in holders]
    if method == "ties":
        merged = ties(deltas, weights, density)
    else:  # one generator per module, so a module's drop pattern does not depend on the others
        merged = dare(deltas, weights, density, np.random.default_rng([seed, index]))
    return dense_truncate(merged, min(rank, *merged.shape)), merged


def check_combinable(sources: list[Adapter], method: str) -> None:
    """Refuse, naming the adapter or module, what cannot be combined."""
    first = sources[0]
    for s in sources:
        refuse_dora(s, "combined")
    bases = {s.config.base_model_name_or_path for s in sources} - {None, ""}
    if len(bases) > 1:
        other = next(
            s
            for s in sources
            if s.config.base_model_name_or_path not in (None, "", first.config.base_model_name_or_path)
        )
        raise AdapterError(
            f"{other.path}: made for base {other.config.base_model_name_or_path!r}, but another adapter is for "
            f"{sorted(bases - {other.config.base_model_name_or_path})[0]!r}; adapters must share a base"
        )
    for s in sources[1:]:
        if s.config.fan_in_fan_out != first.config.fan_in_fan_out:
            raise AdapterError(f"{s.path}: fan_in_fan_out differs from {first.path}; the layers' layouts disagree")
    seen: dict[str, tuple[Adapter, LoraModule]] = {}
    for s in sources:
        for name, m in s.modules.items():
            if m.bias is not None and method in ("ties", "dare"):
                raise AdapterError(
                    f"{s.path}: module {name} has a lora_B bias; --method {method} cannot combine biases"
                )
            if name not in seen:
                seen[name] = (s, m)
                continue
            owner, other = seen[name]
            if (other.embedding, other.b.shape[0], other.a.shape[1:]) != (m.embedding, m.b.shape[0], m.a.shape[1:]):
                raise AdapterError(
                    f"{s.path}: module {name} has factors A {list(m.a.shape)} and B {list(m.b.shape)}, which do not "
                    f"combine with A {list(other.a.shape)} and B {list(other.b.shape)} in {owner.path}"
                )
    check_replacements(sources)


def check_replacements(sources: list[Adapter]) -> None:
    """Replaced base tensors are carried over only when every adapter replaces the same ones identically."""
    first = sources[0]
    for s in sources[1:]:
        names = set(first.replacements) ^ set(s.replacements)
        names |= {
            n
            for n in set(first.replacements) & set(s.replacements)
            if not np.array_equal(first.replacements[n], s.replacements[n])
        }
        if names:
            raise AdapterError(
                f"{s.path}: base tensor {sorted(names)[0]} (modules_to_save or trained bias) is replaced differently "
                f"than in {first.path}; a replaced tensor cannot be combined"
            )


def check_rank(rank: int | None, method: str, sources: list[Adapter], holders: dict) -> int:
    """The output rank: --rank, or the largest input rank; never above what the method can fill."""
    largest_input = max(m.r for s in sources for m in s.modules.values())
    rank = largest_input if rank is None else int(rank)
    if method == "svd":
        combined = max(sum(s.modules[name].r for s, _ in group) for name, group in holders.items())
        if rank > combined:
            raise BadInputError(f"combine: --rank {rank} is above the combined rank {combined} (the sum of the ranks)")
    else:
        full = max(min(m.b.shape[0], int(np.prod(m.a.shape[1:]))) for s in sources for m in s.modules.values())
        if rank > full:
            raise BadInputError(f"combine: --rank {rank} is above the largest module's full rank {full}")
    return rank
