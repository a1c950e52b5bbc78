"""NF4 fake quantization (merge --onto nf4's per-weight pass): the compiled kernel on each
instruction set this CPU runs against the numpy code, on one weight.

One 5632x2048 float16 weight (a LLaMA-7B-like MLP matrix, normal values), NF4, blocksize
64 (--blocksize), written float16 with the error sums, as `merge --onto nf4` does for an
untargeted layer. Reported, medians of --rounds alternated rounds:
  kernel_<isa>_cpu_ns  - lora_deploy._native._quant4.fake_quant4 over the whole weight on
                         one thread, CPU ns per value (scalar, avx2, avx512 as available)
  native_wall_ns, native_cpu_ns - bnb.fake_quant with the kernel (its chunks on every core)
  numpy_wall_ns, numpy_cpu_ns   - bnb.fake_quant with LORA_DEPLOY_NATIVE=0

    python benchmarks/fake_quant_bench.py --rounds 7 --json benchmarks/results/fake_quant.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from lora_deploy._native import kernel
from lora_deploy.merge.bnb import BnbSpec, ErrorSums, code4, fake_quant

ISA_NAMES = ("scalar", "avx2", "avx512")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    w = (np.random.default_rng(0).standard_normal((5632, 2048)) * 0.02).astype(np.float16)
    out = np.empty_like(w)
    spec = BnbSpec("nf4", args.blocksize)
    quant4 = kernel("_quant4")
    code, mids = code4("nf4")
    absmax = np.empty(w.size // args.blocksize, np.float32)
    rows: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        rows.setdefault(name, []).append(seconds / w.size * 1e9)

    def whole(native: bool) -> None:
        os.environ["LORA_DEPLOY_NATIVE"] = "1" if native else "0"
        wall, cpu = time.perf_counter(), time.process_time()
        fake_quant(w, spec, out=out, errors=ErrorSums())
        label = "native" if native else "numpy"
        record(f"{label}_wall_ns", time.perf_counter() - wall)
        record(f"{label}_cpu_ns", time.process_time() - cpu)

    for r in range(args.rounds):
        jobs = [lambda: whole(False)]
        if quant4 is not None:
            jobs.append(lambda: whole(True))
            for isa in range(quant4.BEST_ISA + 1):

                def one(isa: int = isa) -> None:
                    src, dst = w.reshape(-1).view(np.uint16), out.reshape(-1).view(np.uint16)
                    cpu = time.thread_time()
                    quant4.fake_quant4(
                        src, 1, dst, 1, absmax, False, None, code, mids, args.blocksize, 0, w.size, True, isa=isa
                    )
                    record(f"kernel_{ISA_NAMES[isa]}_cpu_ns", time.thread_time() - cpu)

                jobs.append(one)
        for job in jobs if r % 2 == 0 else jobs[::-1]:
            job()
    os.environ.pop("LORA_DEPLOY_NATIVE", None)
    summary = {
        "what": f"fake_quant of one 5632x2048 float16 weight, NF4, blocksize {args.blocksize}, float16 out, error sums",
        "cpu": os.cpu_count(),
        "load_average_at_end": os.getloadavg()[0],
        "rounds": args.rounds,
        "medians_ns_per_value": {name: round(statistics.median(v), 3) for name, v in rows.items()},
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
