/* lora_deploy._native._f16: float16 <-> float32 for the merge's blocks, compiled.

   The same results as lora_deploy.arrays' numpy path, bit for bit, NaN included:
   - widen: float16 -> float32, exact; a NaN keeps its payload (moved up 13 bits) and
     is not quieted, as numpy's cast does.
   - round: float32 -> float16, to nearest, ties to even; past float16's largest finite
     -> Inf; subnormal results exact; NaN -> 0x7E00 with the input's sign, payload
     dropped, as the numpy path's bit-pattern rounding gives (numpy's astype and torch's
     vectorized .to(float16) keep the payload's top bits: a NaN stays a NaN either way).
   - max_magnitude: the largest 16- or 32-bit pattern with its sign bit cleared, one pass
     without a temporary (arrays.all_finite compares it with the dtype's Inf pattern).
   - scaled_add_round: out = round(widen(w) + product * scaling), the merge's block; the
     product and the sum are each rounded to float32 (never fused into an FMA: built with
     -ffp-contract=off), so it equals the numpy path's `block *= s; block += w; round`.
     (Where both w and the product are NaN, the sign of the NaN written may be the other
     one's than numpy's; the merge refuses NaN outputs anyway.)

   On x86 the loops use F16C + AVX2 when the CPU has them (chosen at run time, so the
   build needs no -march flags). vcvtph2ps would quiet a signalling NaN: eight float16
   values holding a NaN are widened by the scalar code; vcvtps2ph keeps a NaN's top
   payload bits: they are cleared. Elsewhere the portable scalar code runs. The GIL is
   released around the loops: the merge runs its blocks on several threads.

   Arguments are C-contiguous buffers (numpy arrays), of item size 2 (float16) or 4
   (float32), with the same number of items; outputs must be writable and must not
   overlap the inputs. The optional last argument `simd` (default True) set to False
   runs the scalar code, for tests. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* ---- scalar, portable ---- */

static inline uint32_t
widen_one(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1F) /* Inf, NaN: payload kept, not quieted */
        return sign | 0x7F800000u | (m << 13);
    if (e != 0)
        return sign | ((e + 112u) << 23) | (m << 13);
    if (m == 0)
        return sign;
    e = 113; /* subnormal: m * 2**-24, normalized */
    while (!(m & 0x400u)) {
        m <<= 1;
        e--;
    }
    return sign | (e << 23) | ((m & 0x3FFu) << 13);
}

static inline uint16_t
round_one(uint32_t f)
{
    uint32_t sign = (f >> 16) & 0x8000u, t = f & 0x7FFFFFFFu;
    if (t > 0x7F800000u) /* NaN */
        return (uint16_t)(sign | 0x7E00u);
    if (t >= 0x38800000u) { /* |x| >= 2**-14: a normal float16, or Inf */
        /* add just under half of the dropped 13 bits' unit, plus the lowest kept bit
           (ties to even); a carry runs into the exponent, up to Inf */
        uint32_t r = (t + 0xFFFu + ((t >> 13) & 1u)) >> 13;
        r -= 112u << 10; /* rebias the exponent, 127 -> 15 */
        return (uint16_t)(sign | (r > 0x7C00u ? 0x7C00u : r));
    }
    uint32_t e = t >> 23;
    uint32_t s = 126u - e; /* the value in units of 2**-24 is m >> s */
    if (e == 0 || s > 24u) /* below 2**-25: rounds to zero */
        return (uint16_t)sign;
    uint32_t m = (t & 0x7FFFFFu) | 0x800000u;
    uint32_t q = m >> s, rem = m & ((1u << s) - 1u), half = 1u << (s - 1u);
    if (rem > half || (rem == half && (q & 1u)))
        q++; /* may carry into 0x400, the smallest normal: the right pattern */
    return (uint16_t)(sign | q);
}

static inline float
as_float(uint32_t bits)
{
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint32_t
as_bits(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return bits;
}

static inline uint16_t
scaled_add_round_one(uint16_t w, float product, float scaling)
{
    float scaled = product * scaling;
    float sum = scaled + as_float(widen_one(w));
    return round_one(as_bits(sum));
}

static void
widen_scalar(const uint16_t *src, uint32_t *dst, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        dst[i] = widen_one(src[i]);
}

static void
round_scalar(const float *src, uint16_t *dst, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        dst[i] = round_one(as_bits(src[i]));
}

static void
scaled_add_round_scalar(const uint16_t *w, const float *product, float scaling, uint16_t *out, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = scaled_add_round_one(w[i], product[i], scaling);
}

/* The largest magnitude (sign bit cleared) of n 16- or 32-bit patterns: all_finite's test. */
static uint32_t
max_magnitude16_scalar(const uint16_t *src, Py_ssize_t n)
{
    uint32_t most = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t m = src[i] & 0x7FFFu;
        most = m > most ? m : most;
    }
    return most;
}

static uint32_t
max_magnitude32_scalar(const uint32_t *src, Py_ssize_t n)
{
    uint32_t most = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t m = src[i] & 0x7FFFFFFFu;
        most = m > most ? m : most;
    }
    return most;
}

/* ---- x86: F16C + AVX2, chosen at run time ---- */

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HAVE_X86_KERNELS 1
#include <immintrin.h>

#define X86_TARGET __attribute__((target("avx2,f16c")))

/* Lanes holding a float16 NaN (all-ones exponent, non-zero mantissa), as a byte mask. */
X86_TARGET static inline int
nan_lanes(__m128i h)
{
    __m128i magnitude = _mm_and_si128(h, _mm_set1_epi16(0x7FFF));
    return _mm_movemask_epi8(_mm_cmpgt_epi16(magnitude, _mm_set1_epi16(0x7C00)));
}

/* vcvtps2ph keeps a NaN's top payload bits (and quiets it): clear them, leaving
   sign | 0x7E00. Only NaN inputs give NaN outputs. */
X86_TARGET static inline __m128i
canonical_nan(__m128i h)
{
    __m128i magnitude = _mm_and_si128(h, _mm_set1_epi16(0x7FFF));
    __m128i nan = _mm_cmpgt_epi16(magnitude, _mm_set1_epi16(0x7C00));
    return _mm_andnot_si128(_mm_and_si128(nan, _mm_set1_epi16(0x01FF)), h);
}

X86_TARGET static void
widen_x86(const uint16_t *src, uint32_t *dst, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + i));
        if (nan_lanes(h)) { /* vcvtph2ps would quiet a signalling NaN */
            widen_scalar(src + i, dst + i, 8);
            continue;
        }
        _mm256_storeu_ps((float *)(dst + i), _mm256_cvtph_ps(h));
    }
    widen_scalar(src + i, dst + i, n - i);
}

X86_TARGET static void
round_x86(const float *src, uint16_t *dst, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(dst + i), canonical_nan(h));
    }
    round_scalar(src + i, dst + i, n - i);
}

X86_TARGET static void
scaled_add_round_x86(const uint16_t *w, const float *product, float scaling, uint16_t *out, Py_ssize_t n)
{
    const __m256 s = _mm256_set1_ps(scaling);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(w + i));
        if (nan_lanes(h)) {
            scaled_add_round_scalar(w + i, product + i, scaling, out + i, 8);
            continue;
        }
        __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(product + i), s);
        __m256 sum = _mm256_add_ps(scaled, _mm256_cvtph_ps(h));
        __m128i r = _mm256_cvtps_ph(sum, _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(out + i), canonical_nan(r));
    }
    scaled_add_round_scalar(w + i, product + i, scaling, out + i, n - i);
}

X86_TARGET static uint32_t
max_magnitude16_x86(const uint16_t *src, Py_ssize_t n)
{
    __m256i most = _mm256_setzero_si256(), mask = _mm256_set1_epi16(0x7FFF);
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16)
        most = _mm256_max_epu16(most, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(src + i)), mask));
    uint16_t lanes[16];
    _mm256_storeu_si256((__m256i *)lanes, most);
    uint32_t result = max_magnitude16_scalar(src + i, n - i);
    for (int k = 0; k < 16; k++)
        result = lanes[k] > result ? lanes[k] : result;
    return result;
}

X86_TARGET static uint32_t
max_magnitude32_x86(const uint32_t *src, Py_ssize_t n)
{
    __m256i most = _mm256_setzero_si256(), mask = _mm256_set1_epi32(0x7FFFFFFF);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        most = _mm256_max_epu32(most, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(src + i)), mask));
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, most);
    uint32_t result = max_magnitude32_scalar(src + i, n - i);
    for (int k = 0; k < 8; k++)
        result = lanes[k] > result ? lanes[k] : result;
    return result;
}

static int
x86_supported(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}
#endif

static int use_x86 = 0; /* set once, at import */

/* ---- Python glue ---- */

/* A C-contiguous buffer of `itemsize`-byte items; 0 on success, -1 with an exception set. */
static int
get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, int writable, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (view->itemsize != itemsize || view->len % itemsize != 0) {
        PyErr_Format(PyExc_TypeError, "%s: expected items of %zd bytes, got %zd", what, itemsize, view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int
same_count(Py_buffer *a, Py_buffer *b)
{
    if (a->len / a->itemsize == b->len / b->itemsize)
        return 1;
    PyErr_Format(PyExc_ValueError, "input has %zd items, output %zd", a->len / a->itemsize, b->len / b->itemsize);
    return 0;
}

/* Buffers for `count` arguments: objs[i] as items of sizes[i] bytes, the last one
   writable, all of the same item count. 0 on success; -1 with an exception set and
   nothing held. */
static int
get_buffers(int count, PyObject **objs, Py_buffer *views, const Py_ssize_t *sizes, const char *const *what)
{
    for (int i = 0; i < count; i++) {
        int ok = get_buffer(objs[i], &views[i], sizes[i], i == count - 1, what[i]) == 0;
        if (ok && i > 0 && !same_count(&views[0], &views[i])) {
            PyBuffer_Release(&views[i]);
            ok = 0;
        }
        if (!ok) {
            while (i-- > 0)
                PyBuffer_Release(&views[i]);
            return -1;
        }
    }
    return 0;
}

static void
release_buffers(int count, Py_buffer *views)
{
    for (int i = 0; i < count; i++)
        PyBuffer_Release(&views[i]);
}

typedef void (*convert_fn)(const void *, void *, Py_ssize_t);

/* widen and round: one input array converted item by item into an output array. */
static PyObject *
convert(PyObject *args, const char *format, Py_ssize_t in_size, Py_ssize_t out_size, const char *const *what,
        convert_fn vector, convert_fn scalar)
{
    PyObject *objs[2];
    int simd = 1;
    Py_buffer views[2];
    const Py_ssize_t sizes[2] = {in_size, out_size};
    if (!PyArg_ParseTuple(args, format, &objs[0], &objs[1], &simd))
        return NULL;
    if (get_buffers(2, objs, views, sizes, what) < 0)
        return NULL;
    Py_ssize_t n = views[0].len / in_size;
    Py_BEGIN_ALLOW_THREADS
    if (simd && vector != NULL)
        vector(views[0].buf, views[1].buf, n);
    else
        scalar(views[0].buf, views[1].buf, n);
    Py_END_ALLOW_THREADS
    release_buffers(2, views);
    Py_RETURN_NONE;
}

#ifdef HAVE_X86_KERNELS
#define X86_OR_NULL(fn) (use_x86 ? (convert_fn)(fn) : NULL)
#else
#define X86_OR_NULL(fn) NULL
#endif

static PyObject *
f16_widen(PyObject *self, PyObject *args)
{
    static const char *const what[2] = {"widen input", "widen output"};
    return convert(args, "OO|p:widen", 2, 4, what, X86_OR_NULL(widen_x86), (convert_fn)widen_scalar);
}

static PyObject *
f16_round(PyObject *self, PyObject *args)
{
    static const char *const what[2] = {"round input", "round output"};
    return convert(args, "OO|p:round", 4, 2, what, X86_OR_NULL(round_x86), (convert_fn)round_scalar);
}

static PyObject *
f16_scaled_add_round(PyObject *self, PyObject *args)
{
    static const char *const what[3] = {"scaled_add_round weight", "scaled_add_round product",
                                        "scaled_add_round output"};
    static const Py_ssize_t sizes[3] = {2, 4, 2};
    PyObject *objs[3];
    float scaling;
    int simd = 1;
    Py_buffer views[3];
    if (!PyArg_ParseTuple(args, "OOfO|p:scaled_add_round", &objs[0], &objs[1], &scaling, &objs[2], &simd))
        return NULL;
    if (get_buffers(3, objs, views, sizes, what) < 0)
        return NULL;
    Py_ssize_t n = views[0].len / 2;
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_X86_KERNELS
    if (simd && use_x86)
        scaled_add_round_x86(views[0].buf, views[1].buf, scaling, views[2].buf, n);
    else
#endif
        scaled_add_round_scalar(views[0].buf, views[1].buf, scaling, views[2].buf, n);
    Py_END_ALLOW_THREADS
    release_buffers(3, views);
    Py_RETURN_NONE;
}

static PyObject *
f16_max_magnitude(PyObject *self, PyObject *args)
{
    PyObject *obj;
    int simd = 1;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "O|p:max_magnitude", &obj, &simd))
        return NULL;
    if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (view.itemsize != 2 && view.itemsize != 4) {
        PyErr_Format(PyExc_TypeError, "max_magnitude: expected items of 2 or 4 bytes, got %zd", view.itemsize);
        PyBuffer_Release(&view);
        return NULL;
    }
    uint32_t most;
    Py_ssize_t n = view.len / view.itemsize;
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_X86_KERNELS
    if (simd && use_x86)
        most = view.itemsize == 2 ? max_magnitude16_x86(view.buf, n) : max_magnitude32_x86(view.buf, n);
    else
#endif
        most = view.itemsize == 2 ? max_magnitude16_scalar(view.buf, n) : max_magnitude32_scalar(view.buf, n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(most);
}

static PyMethodDef f16_methods[] = {
    {"widen", f16_widen, METH_VARARGS, "widen(half, out[, simd]): float16 items -> exact float32 items in out."},
    {"round", f16_round, METH_VARARGS,
     "round(single, out[, simd]): float32 items -> float16 items in out, to nearest, ties to even."},
    {"scaled_add_round", f16_scaled_add_round, METH_VARARGS,
     "scaled_add_round(w, product, scaling, out[, simd]): out = round(widen(w) + product * scaling)."},
    {"max_magnitude", f16_max_magnitude, METH_VARARGS,
     "max_magnitude(bits[, simd]): the largest of 16- or 32-bit items with the top (sign) bit cleared."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef f16_module = {
    PyModuleDef_HEAD_INIT, "_f16", "float16 <-> float32 conversions for the merge (see f16.c).", -1, f16_methods,
};

PyMODINIT_FUNC
PyInit__f16(void)
{
    PyObject *m = PyModule_Create(&f16_module);
    if (m == NULL)
        return NULL;
#ifdef HAVE_X86_KERNELS
    use_x86 = x86_supported();
#endif
    /* What the vector argument selects on this machine: "avx2+f16c" or "scalar". */
    if (PyModule_AddStringConstant(m, "KERNEL", use_x86 ? "avx2+f16c" : "scalar") < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
