"""Build a reference base checkpoint and a trained LoRA adapter.

    python models/build.py --family llama --variant plain --out DIR \
        [--dtype float16] [--max-shard-size 200KB] [--seed 0] [--steps 40] [--force]
    python models/build.py --minilm --out DIR
    python models/build.py --robot policy|vla --out DIR [--seed 0] [--steps 30] [--force]

writes DIR/base (a Hugging Face checkpoint) and DIR/adapter (a PEFT adapter).
With --minilm the base is the installed all-MiniLM-L6-v2 (its path is printed)
and only DIR/adapter is written. With --robot, a reference robot controller
(lora_deploy/examples/robot.py): DIR/base.pt (a plain state dict), DIR/adapter,
DIR/observations.npz and, for the token VLA, DIR/dataset_statistics.json. See
models/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from lora_deploy.examples import models as ref


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--family", choices=ref.FAMILIES)
    what.add_argument("--minilm", action="store_true", help="train an adapter for the real all-MiniLM-L6-v2")
    what.add_argument("--robot", choices=("policy", "vla"), help="a reference robot controller (plain nn.Module)")
    parser.add_argument("--variant", choices=ref.VARIANTS, default="plain")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=sorted(ref.DTYPES), default="float32")
    parser.add_argument("--max-shard-size", default=None, help='e.g. "200KB"; default: one file')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the module's)")
    parser.add_argument("--force", action="store_true", help="replace DIR/base and DIR/adapter if present")
    args = parser.parse_args(argv)
    if args.family and not ref.supported(args.family, args.variant):
        parser.error(f"variant {args.variant!r} is not supported for family {args.family!r}")
    for name in ("base", "adapter") if not args.robot else ("base.pt", "adapter"):
        path = args.out / name
        if path.exists():
            if not args.force:
                parser.error(f"{path} exists (use --force to replace it)")
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return args


def build(args: argparse.Namespace) -> None:
    steps = {} if args.steps is None else {"steps": args.steps}
    if args.robot:
        from lora_deploy.examples import robot

        for role, path in robot.build_controller(args.robot, args.out, seed=args.seed, **steps).items():
            print(f"{role + ':':<12} {path}")
        return
    if args.minilm:
        # The MiniLM adapter is the tests' own (tests/minilm.py): not part of the package.
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests import minilm

        minilm.train_minilm_adapter(args.out / "adapter", seed=args.seed, **steps)
        print(f"base:    {minilm.minilm_dir()}")
        print(f"adapter: {args.out / 'adapter'}")
        return

    base = args.out / "base"
    # The adapter is always trained on the float32 base, so it is the same
    # adapter the test fixtures use whatever --dtype/--max-shard-size say;
    # the requested base is written afterwards in its place.
    ref.build_base(args.family, base, seed=args.seed)
    ref.train_adapter(base, args.out / "adapter", variant=args.variant, seed=args.seed, **steps)
    if args.dtype != "float32" or args.max_shard_size:
        shutil.rmtree(base)
        ref.build_base(args.family, base, dtype=args.dtype, max_shard_size=args.max_shard_size, seed=args.seed)
    print(f"base:    {base}")
    print(f"adapter: {args.out / 'adapter'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    build(args)
    print(f"built in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
