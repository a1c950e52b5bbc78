"""What a bitsandbytes-quantized layer holds: dequant(quant(W)), computed as bitsandbytes
computes it, in numpy, without bitsandbytes.

QLoRA trains its adapter against the dequantized 4-bit (NF4/FP4) or LLM.int8 weights, not
against W. `fake_quant` returns exactly those values (float32), so a merge can add the
adapter's update to what training saw. The arithmetic follows bitsandbytes 0.50's CPU
path step by step (tests/merge/test_bnb.py compares every value, bit for bit):

* 4-bit: blocks of `blocksize` consecutive values (the weight flattened, row-major);
  absmax per block; x * (1/absmax), the last, partial block divided by absmax instead;
  the index is the number of midpoints between adjacent code values below that (what
  torch.bucketize does); dequantized = code[index] * absmax, in float32. The index is
  looked up rather than counted (`index_table`: one gather instead of 15 comparisons),
  and each block's 16 possible values are rounded to the output dtype once, then
  gathered (`fake_quant`).
* double quantization (bnb_4bit_use_double_quant): the absmax values minus their mean,
  quantized in blocks of 256 with bitsandbytes' 8-bit dynamic map (nearest code, a tie to
  the lower one), dequantized and the mean added back. The mean is torch's float32 mean,
  as bitsandbytes takes it (`torch_mean`): its last bit depends on the order of the
  additions, so torch's CPU order is reproduced, without importing torch (seconds of
  CPU): the sum split among torch's threads, each part summed by its cascade (tests
  compare it with torch at several thread counts and sizes).
* LLM.int8 (Int8Params): the weight cast to float16, absmax per row, round(x * (127 /
  absmax)) to int8, dequantized as q * absmax * (1/127) in float32.

bitsandbytes on a GPU takes the same steps; where CUDA rounds a mean or a division
differently, its values can differ from these in the last bit.

The 4-bit pass has a compiled twin, lora_deploy/_native/quant4.c (`_quant4`): the same
float32 steps per block in one pass over the weight (absmax, scale, code, the value
rounded to the output dtype, the error sums), AVX2 or AVX-512, without the GIL; its
values are this numpy code's, byte for byte (tests/merge/test_bnb_native.py).
`fake_quant` takes it where it is built, the CPU has AVX2 (its scalar C is no faster
than numpy here) and the dtypes are float32/float16/bfloat16. LORA_DEPLOY_NATIVE=0
forces the numpy code.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_deploy._native import kernel
from lora_deploy.arrays import round_to_float16, widen_float16
from lora_deploy.errors import BadInputError
from lora_deploy.merge.blocks import for_each_block

# bitsandbytes' get_4bit_type values (the NF4 quantiles; FP4 as 1 sign, 2 exponent, 1
# mantissa bit, scaled by its largest value).
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
FP4_VALUES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
ONTO_TYPES = ("nf4", "fp4", "int8")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
NESTED_BLOCKSIZE = 256  # double quantization: blocks of absmax values
GRID_POINTS, GRID_SCALE = 65536, 32767.5  # bitsandbytes' CPU 8-bit quantizer: its lookup grid over [-1, 1]
INT8_RECIPROCAL = np.float32(7.874015718698502e-3)  # bitsandbytes' 1/127 for int8 dequantization
# Values per block of work: a float32 chunk of 1 MB stays in cache through its passes.
CHUNK_ELEMENTS = 256 * 1024
# 4-bit values per block of work (fewer, larger blocks cost the thread pool less), at most
# CHUNK_BLOCKS blocks: a chunk's blocks times 16 code values fit the 16 bits index_table
# leaves them.
CHUNK_4BIT, CHUNK_BLOCKS = 256 * 1024, 1 << 12
KEY_SHIFT = np.uint32(16)  # index_table's key: the top 16 bits of order_bits(scaled)


@dataclass(frozen=True)
class BnbSpec:
    """How training quantized the base: `--onto`, `--blocksize`, `--double-quant`."""

    quant_type: str  # nf4 | fp4 | int8
    blocksize: int = 64
    double_quant: bool = False

    def __post_init__(self):
        if self.quant_type not in ONTO_TYPES:
            raise BadInputError(f"unknown --onto {self.quant_type!r} (choose {', '.join(ONTO_TYPES)})")
        if self.quant_type != "int8" and self.blocksize not in BLOCKSIZES:
            choices = ", ".join(map(str, BLOCKSIZES))
            raise BadInputError(f"--blocksize {self.blocksize} is not one bitsandbytes accepts ({choices})")

    def describe(self) -> str:
        if self.quant_type == "int8":
            return "int8 (LLM.int8, row-wise absmax)"
        return f"{self.quant_type}, blocksize {self.blocksize}" + (", double quant" if self.double_quant else "")


def code4(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """(code values sorted, midpoints between neighbours), float32, as bitsandbytes builds them."""
    raw = np.array(NF4_VALUES if quant_type == "nf4" else FP4_VALUES, dtype=np.float32)
    code = np.sort(raw / np.abs(raw).max())  # get_4bit_type divides by the largest magnitude
    return code, (code[:-1] + code[1:]) / np.float32(2)


def order_bits(values: np.ndarray) -> np.ndarray:
    """float32 values as uint32 patterns that order like the values when read as int32:
    a negative value's bits but the sign flipped (-0.0 lands just below +0.0)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return bits ^ ((bits >> np.uint32(31)) * np.uint32(0x7FFFFFFF))


@functools.cache
def index_table(quant_type: str) -> np.ndarray:
    """The code index of a scaled value s as one lookup: with o = order_bits(s), the index
    (the number of midpoints below s) is (table[o >> 16] + o) >> 16 in uint32 arithmetic.

    The 2**16 values of o sharing their top 16 bits are one interval of float32 values
    (of one sign), in order; no interval holds two midpoints (asserted), so across one
    the index is `lo` up to and including the midpoint's own pattern, low bits `mid`,
    and lo + 1 above it. table[k] = (lo << 16) + 0xFFFF - mid - (k << 16) makes the sum
    (lo << 16) + 0xFFFF - mid + (o's low 16 bits), which carries into bit 16 exactly
    when o's low bits exceed mid; an interval without a midpoint has mid = 0xFFFF.
    Exact for every float32 but NaN (whose index does not matter: a NaN scaled value
    means a non-finite weight and a non-finite block); +inf gets its index, not a
    NaN's, in the one interval they share.
    """
    _, bounds = code4(quant_type)
    ordered = order_bits(bounds)
    keys = ordered >> KEY_SHIFT
    assert np.unique(keys).size == keys.size, f"{quant_type}: two midpoints share one interval"
    assert not (bounds.view(np.uint32) == np.uint32(0x80000000)).any()  # -0.0 would order below +0.0
    first = np.arange(1 << 16, dtype=np.uint32) << KEY_SHIFT  # each interval's lowest pattern
    with np.errstate(invalid="ignore"):  # NaN intervals: no midpoint below
        lo = (order_bits(first.view(np.float32)).view(np.float32)[:, None] > bounds).sum(axis=1)
    mid = np.full(first.size, 0xFFFF, np.uint32)
    mid[keys] = ordered & np.uint32(0xFFFF)
    return (lo.astype(np.uint32) << KEY_SHIFT) + np.uint32(0xFFFF) - mid - first


_scratch = threading.local()


def chunk_scratch(step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """This thread's arrays for a chunk of `step` values (float32 x2, uint32, intp), reused
    from chunk to chunk: no fresh pages to fault in for every chunk."""
    arrays = getattr(_scratch, "arrays", None)
    if arrays is None or arrays[0].size < step:
        arrays = tuple(np.empty(step, dtype) for dtype in (np.float32, np.float32, np.uint32, np.intp))
        _scratch.arrays = arrays
    return arrays


@functools.cache
def block_offsets(step: int, size: int) -> np.ndarray:
    """For each value of a chunk, 16 * its block's place in the chunk, shifted up 16 bits:
    added to index_table's sum, it makes the index one into the chunk's (blocks, 16) values."""
    offsets = (np.arange(step, dtype=np.uint32) // np.uint32(size)) << np.uint32(20)
    offsets.flags.writeable = False
    return offsets


def code_index(scaled: np.ndarray, quant_type: str) -> np.ndarray:
    """The number of midpoints below each scaled value (uint8), by index_table."""
    ordered = order_bits(scaled)
    return ((index_table(quant_type)[ordered >> KEY_SHIFT] + ordered) >> KEY_SHIFT).astype(np.uint8)


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map()), float32, sorted."""
    data: list[float] = []
    exponent_bits, non_sign_bits = 7, 7
    for i in range(exponent_bits):
        items = 2 ** (i + non_sign_bits - exponent_bits) + 1
        bounds = _linspace_f32(0.1, 1.0, items)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10 ** (-(exponent_bits - 1) + i))
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    return np.sort(np.array(data, dtype=np.float32))


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32: a float32 step, the first half counted up from start and
    the rest down from end, each value one fused multiply-add (exact in float64 here: a
    product of two float32 values fits its mantissa)."""
    start64, end64 = float(np.float32(start)), float(np.float32(end))
    step = float((np.float32(end) - np.float32(start)) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    up = start64 + step * i
    down = end64 - step * (steps - 1 - i)
    return np.where(i < steps // 2, up, down).astype(np.float32)


def widen(w: np.ndarray) -> np.ndarray:
    """float32 values of a float16/bfloat16/float32 array (exact)."""
    if w.dtype == np.float16:
        return widen_float16(w)
    if w.dtype.itemsize == 2:  # bfloat16: the high half of a float32
        return (w.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return w.astype(np.float32, copy=False)


def magnitude_bits(w: np.ndarray) -> np.ndarray:
    """|w| as unsigned integers that order like the magnitudes (IEEE: the bits less the sign)."""
    unsigned = np.uint16 if w.dtype.itemsize == 2 else np.uint32
    return w.view(unsigned) & unsigned((1 << (8 * w.dtype.itemsize - 1)) - 1)


def absmax_4bit(flat: np.ndarray, blocksize: int) -> np.ndarray:
    """absmax per block of a flat array (the last block may be partial), float32: the
    largest magnitude's bits, found with integer maxima (no float pass over the weight)."""
    n = flat.size
    full = n - n % blocksize
    wide = flat.dtype.itemsize == 4
    bits = np.empty(-(-n // blocksize), dtype=np.uint32 if wide else np.uint16)
    step = max(blocksize, CHUNK_ELEMENTS - CHUNK_ELEMENTS % blocksize)

    def block(start: int) -> None:
        stop = min(start + step, full)
        magnitudes = magnitude_bits(flat[start:stop]).reshape(-1, blocksize)
        np.max(magnitudes, axis=1, out=bits[start // blocksize : stop // blocksize])

    for_each_block(block, range(0, full, step))
    if full < n:
        bits[-1] = magnitude_bits(flat[full:]).max()
    return widen(bits.view(flat.dtype))


def nested_absmax(absmax: np.ndarray) -> np.ndarray:
    """absmax as double quantization leaves it: offset + dequant(quant(absmax - offset))."""
    offset = torch_mean(absmax)  # torch's float32 mean, as bitsandbytes takes it
    centred = absmax - offset
    scales = absmax_4bit(centred, NESTED_BLOCKSIZE)
    per_value = np.repeat(scales, NESTED_BLOCKSIZE)[: centred.size]  # each value's block scale
    with np.errstate(divide="ignore", invalid="ignore"):
        normed = centred / per_value  # bitsandbytes' CPU kernel divides
    # Its CPU kernel looks the code up on a grid of 65536 points over [-1, 1]: the
    # nearest grid point (rounded in float32), then the code value nearest to that point.
    grid = np.floor((normed + np.float32(1)) * np.float32(GRID_SCALE) + np.float32(0.5))
    np.nan_to_num(grid, copy=False, nan=GRID_SCALE)  # 0/0: times 0 anyway
    np.clip(grid, 0, GRID_POINTS - 1, out=grid)
    out = np.take(grid_code(), grid.astype(np.int32))
    out *= per_value
    out += offset
    return out.astype(np.float32, copy=False)


# torch's CPU sum (aten/src/ATen/native/cpu/SumKernel.cpp, cascade_sum), as it orders the
# float32 additions of a contiguous 1-D tensor; checked against torch itself in
# tests/merge/test_bnb.py.
TORCH_GRAIN = 32768  # at::internal::GRAIN_SIZE: below it, or with one thread, one serial pass
TORCH_LANES = 8  # Vectorized<float> lanes its sum runs with (the AVX2 and AVX-512 builds alike)
TORCH_ILP = 4  # row_sum's independent accumulators


def torch_mean(values: np.ndarray, threads: int | None = None) -> np.float32:
    """torch.from_numpy(values).mean() (float32, 1-D), bit for bit, on `threads` threads
    (default: as many as torch would use in this process, `torch_threads`)."""
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    n = x.size
    threads = torch_threads() if threads is None else threads
    if n < TORCH_GRAIN or threads == 1:
        total = _cascade(x)
    else:  # two passes: at::parallel_for's parts (one per thread used), then their sum
        used = min(threads, -(-n // TORCH_GRAIN))
        part = -(-n // used)
        partial = np.zeros(threads, np.float32)
        for t in range(used):
            partial[t] = _cascade(x[t * part : min(n, (t + 1) * part)])
        total = _cascade(partial)
    total = np.float32(np.float32(0) + total)  # stored into a zero-filled output
    with np.errstate(invalid="ignore", divide="ignore"):  # no values: 0 / 0, NaN as torch gives
        return np.float32(total / np.float32(n))  # sum, then div_ by the count, in float32


def torch_threads() -> int:
    """torch.get_num_threads() as this process has it: torch's own where it is loaded,
    else its default (OMP_NUM_THREADS, else MKL_NUM_THREADS, else the physical cores)."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        return int(torch.get_num_threads())
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        try:
            value = int(os.environ.get(name, ""))
        except ValueError:
            continue
        if value > 0:
            return value
    return physical_cores()


@functools.cache
def physical_cores() -> int:
    """Cores, not hardware threads, of the machine (what torch's default thread count
    counts: every core present, whatever this process's affinity)."""
    cores = set()
    for topology in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            continue
    return len(cores) or os.cpu_count() or 1


def _cascade(x: np.ndarray) -> np.float32:
    """One thread's sum of x: vectors of TORCH_LANES summed by row_sum, then the leftover
    values and the vector's lanes one by one (vectorized_inner_sum); fewer values than
    a vector: row_sum over the values themselves."""
    lanes = TORCH_LANES if x.size >= TORCH_LANES else 1
    vectors = x.size // lanes
    acc = _row_sum(x[: vectors * lanes].reshape(vectors, lanes))
    if lanes == 1:
        return np.float32(acc[0])
    total = np.float32(0)
    for value in (*x[vectors * lanes :], *acc):
        total = np.float32(total + value)
    return total


def _row_sum(units: np.ndarray) -> np.ndarray:
    """row_sum: TORCH_ILP accumulators (multi_row_sum), the leftover units into the first,
    then the others added to it in order. A unit is a row of `units` (lanes side by side)."""
    n, width = units.shape
    rows = n // TORCH_ILP
    parts = _multi_row_sum(units[: rows * TORCH_ILP].reshape(rows, TORCH_ILP * width)).reshape(TORCH_ILP, width)
    for i in range(rows * TORCH_ILP, n):
        parts[0] += units[i]
    for k in range(1, TORCH_ILP):
        parts[0] += parts[k]
    return parts[0]


def _multi_row_sum(rows: np.ndarray) -> np.ndarray:
    """multi_row_sum per column: four levels of accumulators; level 0 sums `step` rows at a
    time, each level passes its sum up after `step` of the level below; the leftover
    rows go to level 0, and the levels are added together at the end."""
    power = max(4, _ceil_log2(rows.shape[0]) // 4)
    step = 1 << power
    level0, rest0 = _grouped_sums(rows, step)
    level1, rest1 = _grouped_sums(level0, step)
    level2, rest2 = _grouped_sums(level1, step)
    _, rest3 = _grouped_sums(level2, max(1, level2.shape[0] + 1))  # the top level keeps adding
    total = rest0
    for rest in (rest1, rest2, rest3):
        total += rest
    return total


def _grouped_sums(rows: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(sums of each whole group of `step` consecutive rows, sum of the rows after them),
    each added up in order from zero, in float32."""
    groups = rows.shape[0] // step
    whole = rows[: groups * step].reshape(groups, step, rows.shape[1])
    sums = np.zeros((groups, rows.shape[1]), np.float32)
    for j in range(step):
        sums += whole[:, j]
    rest = np.zeros(rows.shape[1], np.float32)
    for row in rows[groups * step :]:
        rest += row
    return sums, rest


def _ceil_log2(x: int) -> int:
    """ATen's utils::CeilLog2 (1 for x <= 2)."""
    return 1 if x <= 2 else (x - 1).bit_length()


@functools.cache
def dynamic_code() -> tuple[np.ndarray, np.ndarray]:
    """dynamic_map() and its nearest_code_on_grid, built once (read-only)."""
    code = dynamic_map()
    on_grid = nearest_code_on_grid(code)
    code.flags.writeable = on_grid.flags.writeable = False
    return code, on_grid


@functools.cache
def grid_code() -> np.ndarray:
    """For each grid point, the dynamic map's value nearest to it (read-only)."""
    code, on_grid = dynamic_code()
    values = code[on_grid]
    values.flags.writeable = False
    return values


def nearest_code_on_grid(code: np.ndarray) -> np.ndarray:
    """For each of the GRID_POINTS points g / GRID_SCALE - 1, the index of the nearest code value."""
    points = np.arange(GRID_POINTS, dtype=np.float64) / GRID_SCALE - 1
    left = np.clip(np.searchsorted(code, points, side="right") - 1, 0, code.size - 1)
    right = np.minimum(left + 1, code.size - 1)
    return np.where(np.abs(points - code[right]) < np.abs(points - code[left]), right, left)


def fake_quant(
    w: np.ndarray, spec: BnbSpec, out: np.ndarray | None = None, errors: ErrorSums | None = None
) -> np.ndarray:
    """dequant(quant(w)) as bitsandbytes computes it, float32 (or written into `out`, any
    float dtype, each value rounded once from float32), in w's shape. With `errors`, the
    squared distance of what was written from w is summed on the way (no second pass)."""
    if spec.quant_type == "int8":
        return fake_quant_int8(w, out, errors)
    if w.dtype.name not in ("float16", "bfloat16", "float32"):  # the 4-bit passes read 16/32-bit floats
        raise BadInputError(
            f"--onto {spec.quant_type}: a {w.dtype.name} weight; bitsandbytes quantizes float16, bfloat16 or "
            "float32 weights (transformers loads the base in one of them first): convert the base"
        )
    native = kernel("_quant4")  # None: not built, or LORA_DEPLOY_NATIVE=0
    out_dtype = np.dtype(np.float32) if out is None else out.dtype
    # its scalar C (no AVX2 here) is no faster than numpy's vectorized passes: numpy then
    vectorized = native is not None and native.BEST_ISA > 0
    if vectorized and w.dtype.name in NATIVE_KINDS and out_dtype.name in NATIVE_KINDS:
        if out is None or out.flags.c_contiguous:
            return fake_quant_native(native, w, spec, out, errors)
    flat = w.reshape(-1)
    n, size = flat.size, spec.blocksize
    absmax = absmax_4bit(flat, size)
    scale = nested_absmax(absmax) if spec.double_quant else absmax
    inverse = np.float32(1) / np.maximum(absmax, np.float32(1e-38))  # torch's 1.0 / t: a reciprocal
    code, _ = code4(spec.quant_type)
    table = index_table(spec.quant_type)
    result = np.empty(n, np.float32) if out is None else out.reshape(-1)
    step = max(size, min(CHUNK_4BIT - CHUNK_4BIT % size, CHUNK_BLOCKS * size))
    offsets = block_offsets(step, size)

    def block(start: int) -> None:
        stop = min(start + step, n)
        wide, scaled, flip, key = (a[: stop - start] for a in chunk_scratch(step))
        x = widen_float16(flat[start:stop], wide) if flat.dtype == np.float16 else widen(flat[start:stop])
        whole = (stop - start) // size * size
        first, count = start // size, -(-(stop - start) // size)  # blocks here, the last maybe partial
        if whole:
            np.multiply(
                x[:whole].reshape(-1, size),
                inverse[first : first + whole // size, None],
                out=scaled[:whole].reshape(-1, size),
            )
        if whole < x.size:  # the last, partial block: divided, as bitsandbytes does
            np.divide(x[whole:], np.maximum(absmax[-1], np.float32(1e-38)), out=scaled[whole:])
        # index_table's lookup, in place: scaled's bits become order_bits(scaled)
        ordered = scaled.view(np.uint32)
        np.right_shift(scaled.view(np.int32), 31, out=flip.view(np.int32))
        flip >>= np.uint32(1)
        ordered ^= flip
        np.right_shift(ordered, KEY_SHIFT, out=key)
        sums = np.take(table, key, out=flip, mode="wrap")  # keys are in range: "wrap" skips a buffered check
        sums += ordered
        sums += offsets[: x.size]  # 16 * (the block's place in this chunk), carried into the index
        np.right_shift(sums, KEY_SHIFT, out=key)  # the index into `levels`
        # each block's 16 values, code * scale in float32, rounded once to the output dtype
        levels = np.empty((count, code.size), result.dtype)
        store(code * scale[first : first + count, None], levels)
        np.take(levels.reshape(-1), key, out=result[start:stop], mode="wrap")
        if errors is not None:  # the distance of what was written from w
            diff = np.take(widen(levels).reshape(-1), key, out=scaled, mode="wrap")
            diff -= x
            errors[start] = (float(np.dot(diff, diff)), float(np.dot(x, x)))

    for_each_block(block, range(0, n, step))
    return result.reshape(w.shape)


# The compiled kernel's dtype codes; 16-bit values cross as their uint16 bits.
NATIVE_KINDS = {"float32": 0, "float16": 1, "bfloat16": 2}


def fake_quant_native(
    quant4, w: np.ndarray, spec: BnbSpec, out: np.ndarray | None = None, errors: ErrorSums | None = None
) -> np.ndarray:
    """fake_quant's 4-bit path by the compiled kernel: chunks of whole blocks spread over
    the cores, each one pass (with --double-quant, a first pass finds every absmax)."""
    flat = np.ascontiguousarray(w).reshape(-1)
    n, size = flat.size, spec.blocksize
    result = np.empty(n, np.float32) if out is None else out.reshape(-1)
    src, dst = raw_bits(flat), raw_bits(result)
    kinds = NATIVE_KINDS[flat.dtype.name], NATIVE_KINDS[result.dtype.name]
    absmax = np.empty(-(-n // size), np.float32)
    code, mids = code4(spec.quant_type)
    step = max(size, CHUNK_4BIT - CHUNK_4BIT % size)
    starts = range(0, n, step)
    scale = None
    if spec.double_quant:

        def find_absmax(start: int) -> None:
            stop = min(start + step, n)
            quant4.fake_quant4(src, kinds[0], None, kinds[1], absmax, False, None, code, mids, size, start, stop, False)

        for_each_block(find_absmax, starts)
        scale = nested_absmax(absmax)

    def block(start: int) -> None:
        stop = min(start + step, n)
        given = (absmax, spec.double_quant, scale, code, mids)  # absmax read back when double-quantized
        sums = quant4.fake_quant4(src, kinds[0], dst, kinds[1], *given, size, start, stop, errors is not None)
        if errors is not None:
            errors[start] = sums

    for_each_block(block, starts)
    return result.reshape(w.shape)


def raw_bits(flat: np.ndarray) -> np.ndarray:
    """A flat float array as the kernel takes it: float32 itself, 16-bit floats as uint16."""
    return flat.view(np.uint16) if flat.dtype.itemsize == 2 else flat


def fake_quant_int8(w: np.ndarray, out: np.ndarray | None = None, errors: ErrorSums | None = None) -> np.ndarray:
    """LLM.int8 as Int8Params stores it: float16 rows, absmax per row, int8 values."""
    rows = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
    result = np.empty(rows.shape, np.float32) if out is None else out.reshape(rows.shape)
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))

    def block(start: int) -> None:
        half = rows[start : start + step].astype(np.float16)
        if not np.isfinite(half).all():
            raise BadInputError(
                "--onto int8: a weight is NaN or Inf or exceeds float16's range (bitsandbytes casts to float16 first)"
            )
        x = half.astype(np.float32)
        stats = np.max(np.abs(x), axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.rint(x * ((np.float32(1) / stats) * np.float32(127.0)))  # torch's 127.0 / t: 127 * (1 / t)
        q[np.broadcast_to(stats == 0, q.shape)] = 0  # an all-zero row stays zero
        q += np.float32(0)  # an int8 has no -0: rint's -0.0 becomes 0
        q *= stats
        q *= INT8_RECIPROCAL
        store(q, result[start : start + step], widen(rows[start : start + step]), errors, start)

    for_each_block(block, range(0, rows.shape[0], step))
    return result.reshape(w.shape)


class ErrorSums(dict):
    """Per block of work: (sum of (written - w)^2, sum of w^2); the blocks run on several threads."""

    def relative(self) -> float:
        # in the order of the blocks, not of the threads finishing them: the same figure every run
        diff, norm = (sum(v[i] for _, v in sorted(self.items())) for i in (0, 1))
        return float(np.sqrt(diff / norm)) if norm > 0 else float(np.sqrt(diff))


def store(
    values: np.ndarray, out: np.ndarray, w: np.ndarray | None = None, errors: ErrorSums | None = None, key: int = 0
) -> None:
    """float32 values into `out`, rounded once to its dtype; with `errors`, the distance of
    what was written from `w` (float32, the same shape) recorded under `key`."""
    if out.dtype == np.float16:
        round_to_float16(values, out)
    else:
        out[...] = values
    if errors is not None and w is not None:
        diff = widen(out).reshape(w.shape) - w
        flat, base = diff.reshape(-1), w.reshape(-1)
        errors[key] = (float(np.dot(flat, flat)), float(np.dot(base, base)))
