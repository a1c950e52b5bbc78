/* NF4/FP4 fake quantization, dequant(quant(w)) as bitsandbytes computes it, in one pass.

   lora_deploy/merge/bnb.py holds the numpy implementation and the description of the
   arithmetic; this kernel takes the same float32 steps in the same order, so its values
   are the numpy path's bit for bit (tests/merge/test_bnb_native.py):

   per block of `blocksize` consecutive values (the last may be partial):
     absmax = the largest magnitude (an integer maximum of the magnitude bits)
     m      = max(absmax, 1e-38f)                (NaN stays NaN)
     s      = x * (1.0f / m), the partial last block x / m
     index  = the number of code midpoints below s (a binary search of ordered compares:
              NaN -> 0, a value on a midpoint stays below it; with AVX-512 and NF4, one
              compare within s's bucket of width 1/16, `build_buckets`: the same index)
     value  = code[index] * scale                (scale: absmax, or the double-quantized one)
   written as float32, float16 (round to nearest even) or bfloat16 (round to nearest even,
   NaN -> quiet NaN of its sign), with sum((written - x)^2) and sum(x^2) on the way.
   `distance_sums` gives merge/quant.py's per-layer error figures in one pass;
   `merge_onto` its merge of a LoRA update onto dequantized weights, a block of rows in one
   pass (the float32 steps of its numpy code, bit for bit: tests/merge/test_merged_onto.py).

   Inputs cross as raw buffers (float32, or float16/bfloat16 as uint16) with a kind code;
   the loops run without the GIL. AVX2+F16C and AVX-512 versions are chosen at run time
   (__builtin_cpu_supports; no -march flag needed); the scalar one is the reference they
   agree with and the fallback elsewhere. A block's absmax of 16-bit values is an integer
   maximum of their own 16-bit magnitude patterns (no widening first); the AVX-512 loop finds
   the absmax of 64 blocks before quantizing them (no block waits on its own reduction). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define QUANT4_X86 1
#include <immintrin.h>
#endif

enum { KIND_F32 = 0, KIND_F16 = 1, KIND_BF16 = 2 };

static inline Py_ssize_t kind_size(int kind) { return kind == KIND_F32 ? 4 : 2; }

typedef struct {
    const void *src;
    int src_kind;
    void *out; /* NULL: absmax only */
    int out_kind;
    float *absmax;      /* per block of the whole tensor */
    int have_absmax;    /* 1: read absmax, 0: compute and store it */
    const float *scale; /* NULL: absmax */
    const float *code;  /* 16 values, sorted */
    const float *mids;  /* 15 midpoints */
    Py_ssize_t n;       /* values in the whole tensor */
    Py_ssize_t blocksize;
    Py_ssize_t start, stop; /* the value range: start a block boundary, stop one or n */
    int errors;
    double diff2, norm2;
    /* the AVX-512 lookup (build_buckets): the bucket of s is floor(16 s) + 16, s clamped to
       [-1, 31/32]; bucket k holds at most one midpoint, bucket_mid[k] (NaN: none), and
       s's index is that of the bucket's lower end, plus one above the midpoint: the code
       values bucket_lo[k] and bucket_hi[k] */
    int buckets; /* 0: no such buckets (FP4's midpoints near zero): the binary search */
    float bucket_mid[32], bucket_lo[32], bucket_hi[32];
} Job;

/* the bucket of a midpoint m (in (-1, 1)), as the vector code computes it for s */
static inline int bucket_of(float m) { return (int)floorf(m * 16.0f) + 16; }

/* job->buckets and its tables: possible when no two midpoints share a bucket. Exact for
   every s: the bucket is a non-decreasing function of s, so the midpoints of lower
   buckets are below s, those of higher ones above it, and only its own is compared. */
static void build_buckets(Job *job) {
    int owner[32];
    job->buckets = 0;
    for (int k = 0; k < 32; k++) owner[k] = -1;
    for (int j = 0; j < 15; j++) {
        float m = job->mids[j];
        if (!(m > -1.0f && m < 1.0f) || owner[bucket_of(m)] >= 0) return;
        owner[bucket_of(m)] = j;
    }
    for (int k = 0; k < 32; k++) {
        int below = 0;
        for (int j = 0; j < 15; j++) below += bucket_of(job->mids[j]) < k;
        job->bucket_mid[k] = owner[k] >= 0 ? job->mids[owner[k]] : NAN;
        job->bucket_lo[k] = job->code[below];
        job->bucket_hi[k] = job->code[below < 15 ? below + 1 : 15];
    }
    job->buckets = 1;
}

/* Scalar conversions (exact; the vector paths agree with them). */

static inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline uint32_t f16_to_f32_bits(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t man = h & 0x3FFu;
    if (exp == 0x1F) return sign | 0x7F800000u | (man << 13); /* Inf, NaN (payload kept) */
    if (exp == 0) {
        /* zero or subnormal: man * 2^-24, exact in float32 */
        float f = (float)man * 5.9604644775390625e-8f;
        return sign | f32_bits(f);
    }
    return sign | ((exp + 112u) << 23) | (man << 13);
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t t = x & 0x7FFFFFFFu;
    if (t > 0x7F800000u) return (uint16_t)(sign | 0x7E00u); /* NaN */
    if (t < 0x38800000u) {                                  /* below float16's smallest normal */
        /* |x| + 0.5 rounds |x| to a multiple of 2^-24 (ties to even): its low bits are the float16's */
        float r = bits_f32(t) + 0.5f;
        return (uint16_t)(sign | (f32_bits(r) - 0x3F000000u));
    }
    t += ((t >> 13) & 1u) + 0xFFFu;
    t = (t >> 13) - (112u << 10);
    if (t > 0x7C00u) t = 0x7C00u; /* overflow: Inf */
    return (uint16_t)(sign | t);
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)(((x >> 16) & 0x8000u) | 0x7FC0u);
    return (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

static inline float load_value(const void *src, int kind, Py_ssize_t i) {
    switch (kind) {
    case KIND_F16:
        return bits_f32(f16_to_f32_bits(((const uint16_t *)src)[i]));
    case KIND_BF16:
        return bits_f32((uint32_t)((const uint16_t *)src)[i] << 16);
    default:
        return ((const float *)src)[i];
    }
}

/* store `v` rounded to the output dtype; returns the value written, as float32 */
static inline float store_value(void *out, int kind, Py_ssize_t i, float v) {
    switch (kind) {
    case KIND_F16: {
        uint16_t h = f32_to_f16(v);
        ((uint16_t *)out)[i] = h;
        return bits_f32(f16_to_f32_bits(h));
    }
    case KIND_BF16: {
        uint16_t h = f32_to_bf16(v);
        ((uint16_t *)out)[i] = h;
        return bits_f32((uint32_t)h << 16);
    }
    default:
        ((float *)out)[i] = v;
        return v;
    }
}

/* v rounded once to `kind`, as float32 */
static inline float rounded(int kind, float v) {
    if (kind == KIND_F16) return bits_f32(f16_to_f32_bits(f32_to_f16(v)));
    if (kind == KIND_BF16) return bits_f32((uint32_t)f32_to_bf16(v) << 16);
    return v;
}

/* Distances for the per-layer error report: over the n values, sums[0] += (w - e)^2,
   sums[1] += e^2 and, with `onto`, p = e rounded to w's kind (what a plain merge writes):
   sums[2] += (w - p)^2, sums[3] += p^2. */
typedef struct {
    const void *written, *exact;
    int written_kind, exact_kind, onto;
    Py_ssize_t n;
    double sums[4];
} Distances;

static void distances_scalar(Distances *job) {
    for (Py_ssize_t i = 0; i < job->n; i++) {
        float w = load_value(job->written, job->written_kind, i), e = load_value(job->exact, job->exact_kind, i);
        float d = w - e;
        job->sums[0] += (double)d * d;
        job->sums[1] += (double)e * e;
        if (job->onto) {
            float p = rounded(job->written_kind, e), dp = w - p;
            job->sums[2] += (double)dp * dp;
            job->sums[3] += (double)p * p;
        }
    }
}

/* merge_onto: p = product * scaling; exact = p + w0; out = p + onto, rounded once to
   out's kind (float32 steps, in merge/quant.py's merged_onto order). */
typedef struct {
    const float *product, *onto;
    const void *w0;
    int w0_kind, out_kind;
    float scaling;
    void *out;
    float *exact; /* NULL: the distances instead (sums) */
    Py_ssize_t n;
    double sums[4];
} Onto;

static void onto_scalar(Onto *job, Py_ssize_t from) {
    double sums[4] = {0.0, 0.0, 0.0, 0.0};
    for (Py_ssize_t i = from; i < job->n; i++) {
        float p = job->product[i] * job->scaling;
        float e = p + load_value(job->w0, job->w0_kind, i);
        float w = store_value(job->out, job->out_kind, i, p + job->onto[i]);
        if (job->exact) {
            job->exact[i] = e;
            continue;
        }
        /* distances_scalar's steps, with e and w as it would read them back */
        float d = w - e, r = rounded(job->out_kind, e), dp = w - r;
        sums[0] += (double)d * d;
        sums[1] += (double)e * e;
        sums[2] += (double)dp * dp;
        sums[3] += (double)r * r;
    }
    for (int k = 0; k < 4; k++) job->sums[k] += sums[k];
}

static inline float floor_1e38(float a) { return (a > 1e-38f || a != a) ? a : 1e-38f; } /* np.maximum */

/* the largest 16-bit magnitude pattern of a float16/bfloat16 block (the patterns order
   like the values they widen to), widened to float32 */
static inline float widened_magnitude(int kind, uint32_t m) {
    return bits_f32(kind == KIND_F16 ? f16_to_f32_bits((uint16_t)m) : m << 16);
}

static inline uint32_t max_magnitude16(const uint16_t *src, Py_ssize_t lo, Py_ssize_t hi, uint32_t m) {
    for (Py_ssize_t i = lo; i < hi; i++)
        if ((uint32_t)(src[i] & 0x7FFFu) > m) m = src[i] & 0x7FFFu;
    return m;
}

static float block_absmax(const Job *job, Py_ssize_t lo, Py_ssize_t hi) {
    uint32_t best = 0;
    for (Py_ssize_t i = lo; i < hi; i++) {
        uint32_t m = f32_bits(load_value(job->src, job->src_kind, i)) & 0x7FFFFFFFu;
        if (m > best) best = m;
    }
    return bits_f32(best);
}

/* values lo..hi of one block, scalar */
static void block_scalar(Job *job, Py_ssize_t lo, Py_ssize_t hi, float m, float scale, int divide) {
    float inverse = 1.0f / m, mids[15];
    memcpy(mids, job->mids, sizeof mids);
    double d2 = 0.0, n2 = 0.0;
    for (Py_ssize_t i = lo; i < hi; i++) {
        float x = load_value(job->src, job->src_kind, i);
        float s = divide ? x / m : x * inverse;
        /* the number of midpoints below s (sorted), by binary search: 8, 4, 2, 1 (NaN: 0) */
        int index = (s > mids[7]) * 8;
        index += (s > mids[index + 3]) * 4;
        index += (s > mids[index + 1]) * 2;
        index += s > mids[index];
        float v = job->code[index] * scale;
        float written = store_value(job->out, job->out_kind, i, v);
        if (job->errors) {
            float d = written - x;
            d2 += (double)d * d;
            n2 += (double)x * x;
        }
    }
    job->diff2 += d2;
    job->norm2 += n2;
}

/* the absmax (computed or read) of block b spanning lo..hi */
static inline float absmax_of(Job *job, Py_ssize_t b, Py_ssize_t lo, Py_ssize_t hi, float (*find)(const Job *, Py_ssize_t, Py_ssize_t)) {
    if (job->have_absmax) return job->absmax[b];
    float a = find(job, lo, hi);
    job->absmax[b] = a;
    return a;
}

static void run_scalar(Job *job) {
    for (Py_ssize_t lo = job->start; lo < job->stop; lo += job->blocksize) {
        Py_ssize_t b = lo / job->blocksize;
        Py_ssize_t hi = lo + job->blocksize;
        int partial = hi > job->n;
        if (partial) hi = job->n;
        float a = absmax_of(job, b, lo, hi, block_absmax);
        if (job->out == NULL) continue;
        block_scalar(job, lo, hi, floor_1e38(a), job->scale ? job->scale[b] : a, partial);
    }
}

#ifdef QUANT4_X86

/* AVX2 + F16C: 8 values at a time. */

#define AVX2 __attribute__((target("avx2,f16c")))

AVX2 static inline __m256 load8(const void *src, int kind, Py_ssize_t i) {
    if (kind == KIND_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + i)));
    if (kind == KIND_BF16) {
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + i)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    }
    return _mm256_loadu_ps((const float *)src + i);
}

/* v rounded to `kind` (nearest, ties to even; bfloat16 NaN -> quiet NaN of its sign),
   stored at out[i] unless out is NULL; returns the rounded values as float32 */
AVX2 static inline __m256 store8(__m256 v, int kind, void *out, Py_ssize_t i) {
    if (kind == KIND_F16) {
        __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        if (out) _mm_storeu_si128((__m128i *)((uint16_t *)out + i), h);
        return _mm256_cvtph_ps(h);
    }
    if (kind == KIND_BF16) {
        __m256i u = _mm256_castps_si256(v);
        __m256i high = _mm256_srli_epi32(u, 16);
        __m256i odd = _mm256_and_si256(high, _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
        __m256i quiet = _mm256_or_si256(_mm256_and_si256(high, _mm256_set1_epi32(0x8000)), _mm256_set1_epi32(0x7FC0));
        __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
        r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(quiet), nan));
        if (out) {
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08); /* lanes 0, 2 */
            _mm_storeu_si128((__m128i *)((uint16_t *)out + i), _mm256_castsi256_si128(packed));
        }
        return _mm256_castsi256_ps(_mm256_slli_epi32(r, 16));
    }
    if (out) _mm256_storeu_ps((float *)out + i, v);
    return v;
}

/* the largest of 8 uint16 lanes */
AVX2 static inline uint32_t hmax_epu16(__m128i v) {
    /* phminposuw finds the smallest: of the complements */
    return 0xFFFFu - (uint32_t)_mm_extract_epi16(_mm_minpos_epu16(_mm_xor_si128(v, _mm_set1_epi16(-1))), 0);
}

/* The vector loops take the blocks GROUP at a time: every absmax of the group and its
   reciprocal first, then the values, so no block waits on its own reduction and division. */
enum { GROUP = 64 };

#define INLINE256 AVX2 __attribute__((always_inline)) static inline

/* What the AVX2 loop reads, copied out of the Job once (as Lookup512). */
typedef struct {
    __m256 code_lo, code_hi, mids_lo, mids_hi, middle;
    const void *src;
    void *out;
    int src_kind, out_kind, errors;
} Lookup256;

INLINE256 float block_absmax_avx2(const Lookup256 *job, Py_ssize_t lo, Py_ssize_t hi) {
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i best = _mm256_setzero_si256();
    Py_ssize_t i = lo;
    if (job->src_kind != KIND_F32) { /* 16-bit patterns, 16 at a time, not widened first */
        const uint16_t *src = job->src;
        __m256i top = _mm256_setzero_si256();
        for (; i + 16 <= hi; i += 16)
            top = _mm256_max_epu16(top, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(src + i)), _mm256_set1_epi16(0x7FFF)));
        uint32_t m = hmax_epu16(_mm_max_epu16(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1)));
        return widened_magnitude(job->src_kind, max_magnitude16(src, i, hi, m));
    }
    for (; i + 8 <= hi; i += 8)
        best = _mm256_max_epi32(best, _mm256_and_si256(_mm256_castps_si256(load8(job->src, job->src_kind, i)), magnitude));
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, best);
    uint32_t m = 0;
    for (int k = 0; k < 8; k++)
        if (lanes[k] > m) m = lanes[k];
    for (; i < hi; i++) {
        uint32_t v = f32_bits(load_value(job->src, job->src_kind, i)) & 0x7FFFFFFFu;
        if (v > m) m = v;
    }
    return bits_f32(m);
}

/* one whole block (a multiple of 8 values: blocksize >= 32) */
INLINE256 void block_avx2(const Lookup256 *job, Py_ssize_t lo, Py_ssize_t hi, float inverse_value, float scale_value, __m256d sums[2]) {
    const __m256 inverse = _mm256_set1_ps(inverse_value);
    const __m256 scale = _mm256_set1_ps(scale_value);
    const __m256 code_lo = job->code_lo, code_hi = job->code_hi, mids_lo = job->mids_lo, mids_hi = job->mids_hi;
    const __m256 middle = job->middle;
    const __m256i one = _mm256_set1_epi32(1), two = _mm256_set1_epi32(2), three = _mm256_set1_epi32(3);
    const __m256i four = _mm256_set1_epi32(4), eight = _mm256_set1_epi32(8);
    __m256 d2 = _mm256_setzero_ps(), n2 = _mm256_setzero_ps();
    for (Py_ssize_t i = lo; i < hi; i += 8) {
        __m256 x = load8(job->src, job->src_kind, i);
        __m256 s = _mm256_mul_ps(x, inverse);
        /* the number of midpoints below s (sorted), by binary search: 8, 4, 2, 1. After the
           first step a lane stays in its half, so `upper` picks the table for the rest. */
        __m256 upper = _mm256_cmp_ps(s, middle, _CMP_GT_OQ);
        __m256i index = _mm256_and_si256(_mm256_castps_si256(upper), eight), probe;
        probe = _mm256_add_epi32(index, three);
        __m256 m = _mm256_blendv_ps(_mm256_permutevar8x32_ps(mids_lo, probe), _mm256_permutevar8x32_ps(mids_hi, probe), upper);
        index = _mm256_add_epi32(index, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(s, m, _CMP_GT_OQ)), four));
        probe = _mm256_add_epi32(index, one);
        m = _mm256_blendv_ps(_mm256_permutevar8x32_ps(mids_lo, probe), _mm256_permutevar8x32_ps(mids_hi, probe), upper);
        index = _mm256_add_epi32(index, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(s, m, _CMP_GT_OQ)), two));
        m = _mm256_blendv_ps(_mm256_permutevar8x32_ps(mids_lo, index), _mm256_permutevar8x32_ps(mids_hi, index), upper);
        index = _mm256_add_epi32(index, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(s, m, _CMP_GT_OQ)), one));
        __m256 low = _mm256_permutevar8x32_ps(code_lo, index), high = _mm256_permutevar8x32_ps(code_hi, index);
        __m256 c = _mm256_blendv_ps(low, high, upper);
        __m256 v = _mm256_mul_ps(c, scale);
        __m256 written = store8(v, job->out_kind, job->out, i);
        if (job->errors) {
            __m256 d = _mm256_sub_ps(written, x);
            d2 = _mm256_add_ps(d2, _mm256_mul_ps(d, d));
            n2 = _mm256_add_ps(n2, _mm256_mul_ps(x, x));
        }
    }
    if (job->errors) { /* the block's float32 sums into float64 lanes: no serial chain of scalar adds */
        sums[0] = _mm256_add_pd(sums[0], _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(d2)), _mm256_cvtps_pd(_mm256_extractf128_ps(d2, 1))));
        sums[1] = _mm256_add_pd(sums[1], _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(n2)), _mm256_cvtps_pd(_mm256_extractf128_ps(n2, 1))));
    }
}

AVX2 static inline __m256d widen_sum(__m256 v) {
    return _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

AVX2 static void distances_avx2(Distances *job) {
    __m256d total[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
    Py_ssize_t whole = job->n - job->n % 8;
    for (Py_ssize_t lo = 0; lo < whole; lo += 1024) { /* float32 sums over 1024 values, then float64 */
        Py_ssize_t hi = lo + 1024 < whole ? lo + 1024 : whole;
        __m256 sums[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (Py_ssize_t i = lo; i < hi; i += 8) {
            __m256 w = load8(job->written, job->written_kind, i), e = load8(job->exact, job->exact_kind, i);
            __m256 d = _mm256_sub_ps(w, e);
            sums[0] = _mm256_add_ps(sums[0], _mm256_mul_ps(d, d));
            sums[1] = _mm256_add_ps(sums[1], _mm256_mul_ps(e, e));
            if (job->onto) {
                __m256 p = store8(e, job->written_kind, NULL, 0), dp = _mm256_sub_ps(w, p);
                sums[2] = _mm256_add_ps(sums[2], _mm256_mul_ps(dp, dp));
                sums[3] = _mm256_add_ps(sums[3], _mm256_mul_ps(p, p));
            }
        }
        for (int k = 0; k < 4; k++) total[k] = _mm256_add_pd(total[k], widen_sum(sums[k]));
    }
    for (int k = 0; k < 4; k++) {
        double t[4];
        _mm256_storeu_pd(t, total[k]);
        job->sums[k] += (t[0] + t[1]) + (t[2] + t[3]);
    }
    Distances rest = *job; /* the last n % 8 values */
    rest.written = (const char *)job->written + whole * kind_size(job->written_kind);
    rest.exact = (const char *)job->exact + whole * kind_size(job->exact_kind);
    rest.n = job->n - whole;
    memset(rest.sums, 0, sizeof rest.sums);
    distances_scalar(&rest);
    for (int k = 0; k < 4; k++) job->sums[k] += rest.sums[k];
}

AVX2 static void onto_avx2(Onto *job) {
    const __m256 scaling = _mm256_set1_ps(job->scaling);
    Py_ssize_t i = 0;
    if (job->exact == NULL) { /* the distances, as distances_avx2 sums them over these values */
        __m256d total[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
        Py_ssize_t whole = job->n - job->n % 8;
        for (Py_ssize_t lo = 0; lo < whole; lo += 1024) {
            Py_ssize_t hi = lo + 1024 < whole ? lo + 1024 : whole;
            __m256 sums[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (i = lo; i < hi; i += 8) {
                __m256 p = _mm256_mul_ps(_mm256_loadu_ps(job->product + i), scaling);
                __m256 e = _mm256_add_ps(p, load8(job->w0, job->w0_kind, i));
                __m256 w = store8(_mm256_add_ps(p, _mm256_loadu_ps(job->onto + i)), job->out_kind, job->out, i);
                __m256 d = _mm256_sub_ps(w, e);
                sums[0] = _mm256_add_ps(sums[0], _mm256_mul_ps(d, d));
                sums[1] = _mm256_add_ps(sums[1], _mm256_mul_ps(e, e));
                __m256 r = store8(e, job->out_kind, NULL, 0), dp = _mm256_sub_ps(w, r);
                sums[2] = _mm256_add_ps(sums[2], _mm256_mul_ps(dp, dp));
                sums[3] = _mm256_add_ps(sums[3], _mm256_mul_ps(r, r));
            }
            for (int k = 0; k < 4; k++) total[k] = _mm256_add_pd(total[k], widen_sum(sums[k]));
        }
        for (int k = 0; k < 4; k++) {
            double t[4];
            _mm256_storeu_pd(t, total[k]);
            job->sums[k] += (t[0] + t[1]) + (t[2] + t[3]);
        }
        onto_scalar(job, whole); /* the last n % 8 values: distances_scalar's sums, added last */
        return;
    }
    for (; i + 8 <= job->n; i += 8) {
        __m256 p = _mm256_mul_ps(_mm256_loadu_ps(job->product + i), scaling);
        _mm256_storeu_ps(job->exact + i, _mm256_add_ps(p, load8(job->w0, job->w0_kind, i)));
        store8(_mm256_add_ps(p, _mm256_loadu_ps(job->onto + i)), job->out_kind, job->out, i);
    }
    onto_scalar(job, i);
}

AVX2 static void run_avx2(Job *job) {
    __m256d sums[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
    /* midpoints 0..7 and 8..14 (entry 15, zero, is never looked up) */
    const Lookup256 t = {_mm256_loadu_ps(job->code), _mm256_loadu_ps(job->code + 8), _mm256_loadu_ps(job->mids),
                         _mm256_maskload_ps(job->mids + 8, _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, -1, 0)),
                         _mm256_set1_ps(job->mids[7]), job->src, job->out, job->src_kind, job->out_kind, job->errors};
    const Py_ssize_t size = job->blocksize, n = job->n;
    float found[GROUP], inverse[GROUP];
    for (Py_ssize_t first = job->start; first < job->stop; first += GROUP * size) {
        Py_ssize_t last = first + GROUP * size < job->stop ? first + GROUP * size : job->stop;
        Py_ssize_t count = (last - first + size - 1) / size, b0 = first / size;
        for (Py_ssize_t k = 0; k < count; k++) {
            Py_ssize_t lo = first + k * size, hi = lo + size < n ? lo + size : n;
            float a = job->have_absmax ? job->absmax[b0 + k] : block_absmax_avx2(&t, lo, hi);
            if (!job->have_absmax) job->absmax[b0 + k] = a;
            found[k] = a;
            inverse[k] = 1.0f / floor_1e38(a);
        }
        if (t.out == NULL) continue;
        for (Py_ssize_t k = 0; k < count; k++) {
            Py_ssize_t lo = first + k * size, hi = lo + size;
            float scale = job->scale ? job->scale[b0 + k] : found[k];
            if (hi > n) /* the last, partial block: divided, as bitsandbytes does */
                block_scalar(job, lo, n, floor_1e38(found[k]), scale, 1);
            else
                block_avx2(&t, lo, hi, inverse[k], scale, sums);
        }
    }
    double d[4], x[4];
    _mm256_storeu_pd(d, sums[0]);
    _mm256_storeu_pd(x, sums[1]);
    job->diff2 += (d[0] + d[1]) + (d[2] + d[3]);
    job->norm2 += (x[0] + x[1]) + (x[2] + x[3]);
}

/* AVX-512F: 16 values at a time (chosen where BW and VL are there too: Skylake-SP on). */

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,f16c")))

AVX512 static inline __m512 load16(const void *src, int kind, Py_ssize_t i) {
    if (kind == KIND_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)src + i)));
    if (kind == KIND_BF16) {
        __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)src + i)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    }
    return _mm512_loadu_ps((const float *)src + i);
}

#define INLINE512 AVX512 __attribute__((always_inline)) static inline

/* What the AVX-512 loop reads, copied out of the Job once: kept in registers, not re-read
   after every store (the stores' vector types may alias anything). */
typedef struct {
    __m512 code, mids, middle, mid_a, mid_b, lo_a, lo_b, hi_a, hi_b;
    const void *src;
    void *out;
    int src_kind, out_kind, errors, buckets;
} Lookup512;

INLINE512 float block_absmax_avx512(const Lookup512 *job, Py_ssize_t lo, Py_ssize_t hi) {
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    __m512i best = _mm512_setzero_si512();
    Py_ssize_t i = lo;
    if (job->src_kind != KIND_F32) { /* 16-bit patterns, 32 at a time, not widened first */
        const uint16_t *src = job->src;
        __m512i top = _mm512_setzero_si512();
        for (; i + 32 <= hi; i += 32)
            top = _mm512_max_epu16(top, _mm512_and_si512(_mm512_loadu_si512(src + i), _mm512_set1_epi16(0x7FFF)));
        __m256i half = _mm256_max_epu16(_mm512_castsi512_si256(top), _mm512_extracti64x4_epi64(top, 1));
        uint32_t m = hmax_epu16(_mm_max_epu16(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1)));
        return widened_magnitude(job->src_kind, max_magnitude16(src, i, hi, m));
    }
    for (; i + 16 <= hi; i += 16)
        best = _mm512_max_epu32(best, _mm512_and_si512(_mm512_castps_si512(load16(job->src, job->src_kind, i)), magnitude));
    uint32_t m = _mm512_reduce_max_epu32(best);
    for (; i < hi; i++) {
        uint32_t v = f32_bits(load_value(job->src, job->src_kind, i)) & 0x7FFFFFFFu;
        if (v > m) m = v;
    }
    return bits_f32(m);
}

/* one whole block (a multiple of 16 values: blocksize >= 32), 1 / max(absmax, 1e-38) given */
INLINE512 void block_avx512(const Lookup512 *job, Py_ssize_t lo, Py_ssize_t hi, float inverse_value, float scale_value, __m512d sums[2]) {
    const __m512 inverse = _mm512_set1_ps(inverse_value);
    const __m512 scale = _mm512_set1_ps(scale_value);
    const __m512 code = job->code, mids = job->mids, middle = job->middle;
    const __m512 mid_a = job->mid_a, mid_b = job->mid_b, lo_a = job->lo_a, lo_b = job->lo_b, hi_a = job->hi_a, hi_b = job->hi_b;
    const __m512i one = _mm512_set1_epi32(1), two = _mm512_set1_epi32(2), three = _mm512_set1_epi32(3);
    const __m512i four = _mm512_set1_epi32(4), eight = _mm512_set1_epi32(8);
    const __m512 sixteen = _mm512_set1_ps(16.0f), lowest = _mm512_set1_ps(-16.0f), highest = _mm512_set1_ps(15.5f);
    const __m512i offset = _mm512_set1_epi32(16);
    __m512 d2 = _mm512_setzero_ps(), n2 = _mm512_setzero_ps();
    for (Py_ssize_t i = lo; i < hi; i += 16) {
        __m512 x = load16(job->src, job->src_kind, i);
        __m512 s = _mm512_mul_ps(x, inverse);
        __m512 c;
        if (job->buckets) { /* s's bucket (NaN: -16 by max's rule, so bucket 0, index 0), one compare */
            __m512 t = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(s, sixteen), lowest), highest);
            __m512i k = _mm512_add_epi32(_mm512_cvt_roundps_epi32(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), offset);
            __mmask16 above = _mm512_cmp_ps_mask(s, _mm512_permutex2var_ps(mid_a, k, mid_b), _CMP_GT_OQ);
            c = _mm512_mask_blend_ps(above, _mm512_permutex2var_ps(lo_a, k, lo_b), _mm512_permutex2var_ps(hi_a, k, hi_b));
        } else { /* the number of midpoints below s (sorted), by binary search: 8, 4, 2, 1 */
            __m512i index = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(s, middle, _CMP_GT_OQ), eight);
            __m512 m4 = _mm512_permutexvar_ps(_mm512_add_epi32(index, three), mids);
            index = _mm512_mask_add_epi32(index, _mm512_cmp_ps_mask(s, m4, _CMP_GT_OQ), index, four);
            __m512 m2 = _mm512_permutexvar_ps(_mm512_add_epi32(index, one), mids);
            index = _mm512_mask_add_epi32(index, _mm512_cmp_ps_mask(s, m2, _CMP_GT_OQ), index, two);
            __m512 m1 = _mm512_permutexvar_ps(index, mids);
            index = _mm512_mask_add_epi32(index, _mm512_cmp_ps_mask(s, m1, _CMP_GT_OQ), index, one);
            c = _mm512_permutexvar_ps(index, code);
        }
        __m512 v = _mm512_mul_ps(c, scale), written;
        if (job->out_kind == KIND_F16) {
            __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm256_storeu_si256((__m256i *)((uint16_t *)job->out + i), h);
            written = _mm512_cvtph_ps(h);
        } else if (job->out_kind == KIND_BF16) {
            __m512i u = _mm512_castps_si512(v);
            __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
            __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
            __m512i quiet = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x8000)), _mm512_set1_epi32(0x7FC0));
            r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), quiet);
            _mm256_storeu_si256((__m256i *)((uint16_t *)job->out + i), _mm512_cvtepi32_epi16(r));
            written = _mm512_castsi512_ps(_mm512_slli_epi32(r, 16));
        } else {
            _mm512_storeu_ps((float *)job->out + i, v);
            written = v;
        }
        if (job->errors) {
            __m512 d = _mm512_sub_ps(written, x);
            d2 = _mm512_add_ps(d2, _mm512_mul_ps(d, d));
            n2 = _mm512_add_ps(n2, _mm512_mul_ps(x, x));
        }
    }
    if (job->errors) { /* the block's float32 sums into float64 lanes: no serial chain of scalar adds */
        sums[0] = _mm512_add_pd(sums[0], _mm512_cvtps_pd(_mm512_castps512_ps256(d2)));
        sums[0] = _mm512_add_pd(sums[0], _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d2), 1))));
        sums[1] = _mm512_add_pd(sums[1], _mm512_cvtps_pd(_mm512_castps512_ps256(n2)));
        sums[1] = _mm512_add_pd(sums[1], _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(n2), 1))));
    }
}

AVX512 static void onto_avx512(Onto *job) {
    const __m512 scaling = _mm512_set1_ps(job->scaling);
    Py_ssize_t i = 0;
    for (; i + 16 <= job->n; i += 16) {
        __m512 p = _mm512_mul_ps(_mm512_loadu_ps(job->product + i), scaling);
        _mm512_storeu_ps(job->exact + i, _mm512_add_ps(p, load16(job->w0, job->w0_kind, i)));
        __m512 v = _mm512_add_ps(p, _mm512_loadu_ps(job->onto + i));
        /* two 8-value halves: store8's rounding, the AVX2 path's bits */
        store8(_mm512_castps512_ps256(v), job->out_kind, job->out, i);
        store8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)), job->out_kind, job->out, i + 8);
    }
    onto_scalar(job, i);
}

AVX512 static void run_avx512(Job *job) {
    __m512d sums[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
    /* entry 15 of mids (zero) is never looked up: the search reads entries 0..14 */
    const Lookup512 t = {_mm512_loadu_ps(job->code), _mm512_maskz_loadu_ps(0x7FFF, job->mids), _mm512_set1_ps(job->mids[7]),
                         _mm512_loadu_ps(job->bucket_mid), _mm512_loadu_ps(job->bucket_mid + 16),
                         _mm512_loadu_ps(job->bucket_lo), _mm512_loadu_ps(job->bucket_lo + 16),
                         _mm512_loadu_ps(job->bucket_hi), _mm512_loadu_ps(job->bucket_hi + 16),
                         job->src, job->out, job->src_kind, job->out_kind, job->errors, job->buckets};
    const Py_ssize_t size = job->blocksize, n = job->n;
    float found[GROUP], inverse[GROUP];
    for (Py_ssize_t first = job->start; first < job->stop; first += GROUP * size) {
        Py_ssize_t last = first + GROUP * size < job->stop ? first + GROUP * size : job->stop;
        Py_ssize_t count = (last - first + size - 1) / size, b0 = first / size;
        for (Py_ssize_t k = 0; k < count; k++) {
            Py_ssize_t lo = first + k * size, hi = lo + size < n ? lo + size : n;
            float a = job->have_absmax ? job->absmax[b0 + k] : block_absmax_avx512(&t, lo, hi);
            if (!job->have_absmax) job->absmax[b0 + k] = a;
            found[k] = a;
            inverse[k] = 1.0f / floor_1e38(a);
        }
        if (t.out == NULL) continue;
        for (Py_ssize_t k = 0; k < count; k++) {
            Py_ssize_t lo = first + k * size, hi = lo + size;
            float scale = job->scale ? job->scale[b0 + k] : found[k];
            if (hi > n) /* the last, partial block: divided, as bitsandbytes does */
                block_scalar(job, lo, n, floor_1e38(found[k]), scale, 1);
            else
                block_avx512(&t, lo, hi, inverse[k], scale, sums);
        }
    }
    job->diff2 += _mm512_reduce_add_pd(sums[0]);
    job->norm2 += _mm512_reduce_add_pd(sums[1]);
}

#endif /* QUANT4_X86 */

/* Dispatch. */

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static int best_isa = ISA_SCALAR;
static const char *ISA_NAMES[] = {"scalar", "avx2", "avx512"};

static void detect_isa(void) {
#ifdef QUANT4_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) best_isa = ISA_AVX2;
    if (best_isa == ISA_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        best_isa = ISA_AVX512;
#endif
}

static void run(Job *job, int isa) {
#ifdef QUANT4_X86
    if (isa == ISA_AVX512) {
        run_avx512(job);
        return;
    }
    if (isa == ISA_AVX2) {
        run_avx2(job);
        return;
    }
#endif
    run_scalar(job);
}

/* Python binding. */

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *what) {
    if (PyObject_GetBuffer(obj, view, writable ? (PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) : PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Format(PyExc_TypeError, "%s: a C-contiguous%s buffer is needed", what, writable ? " writable" : "");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(fake_quant4_doc,
             "fake_quant4(src, src_kind, out, out_kind, absmax, have_absmax, scale, code, mids, blocksize, start, stop, "
             "errors, isa=-1) -> (diff2, norm2)\n\n"
             "dequant(quant(src)) for values start..stop (block boundaries, or stop = the tensor's size), "
             "NF4/FP4 by `code` (16 float32) and `mids` (15 float32). Kinds: 0 float32, 1 float16, 2 bfloat16 "
             "(16-bit kinds as raw 16-bit buffers). out None: only absmax is computed. absmax: float32, one per "
             "block of the whole tensor, read when have_absmax else written. scale: float32 per block or None "
             "(absmax). errors: return sum((written - x)^2) and sum(x^2), else zeros. isa: -1 the best this CPU "
             "runs, 0 scalar, 1 AVX2, 2 AVX-512.");

static PyObject *fake_quant4(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *keywords[] = {"src", "src_kind", "out", "out_kind", "absmax", "have_absmax", "scale", "code",
                               "mids", "blocksize", "start", "stop", "errors", "isa", NULL};
    PyObject *src_obj, *out_obj, *absmax_obj, *scale_obj, *code_obj, *mids_obj;
    int src_kind, out_kind, have_absmax, errors, isa = -1;
    Py_ssize_t blocksize, start, stop;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiOiOpOOOnnnp|i", keywords, &src_obj, &src_kind, &out_obj,
                                     &out_kind, &absmax_obj, &have_absmax, &scale_obj, &code_obj, &mids_obj,
                                     &blocksize, &start, &stop, &errors, &isa))
        return NULL;
    if (src_kind < 0 || src_kind > 2 || out_kind < 0 || out_kind > 2) {
        PyErr_SetString(PyExc_ValueError, "kind: 0 float32, 1 float16, 2 bfloat16");
        return NULL;
    }
    if (isa < 0) isa = best_isa;
    if (isa > best_isa) {
        PyErr_Format(PyExc_ValueError, "isa %d: this CPU runs at most %s", isa, ISA_NAMES[best_isa]);
        return NULL;
    }
    if (blocksize < 32 || blocksize % 16) {
        PyErr_SetString(PyExc_ValueError, "blocksize: a multiple of 16, at least 32");
        return NULL;
    }
    Py_buffer src = {0}, out = {0}, absmax = {0}, scale = {0}, code = {0}, mids = {0};
    PyObject *result = NULL;
    if (get_buffer(src_obj, &src, 0, "src") < 0) goto done;
    if (out_obj != Py_None && get_buffer(out_obj, &out, 1, "out") < 0) goto done;
    if (get_buffer(absmax_obj, &absmax, !have_absmax, "absmax") < 0) goto done;
    if (scale_obj != Py_None && get_buffer(scale_obj, &scale, 0, "scale") < 0) goto done;
    if (get_buffer(code_obj, &code, 0, "code") < 0 || get_buffer(mids_obj, &mids, 0, "mids") < 0) goto done;
    Py_ssize_t n = src.len / kind_size(src_kind);
    Py_ssize_t blocks = (n + blocksize - 1) / blocksize;
    if (src.len % kind_size(src_kind) || (out.buf && out.len != n * kind_size(out_kind)) ||
        absmax.len < blocks * 4 || (scale.buf && scale.len < blocks * 4) || code.len != 16 * 4 ||
        mids.len != 15 * 4) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match");
        goto done;
    }
    if (start < 0 || start % blocksize || stop < start || stop > n || (stop % blocksize && stop != n)) {
        PyErr_SetString(PyExc_ValueError, "start, stop: block boundaries within the tensor");
        goto done;
    }
    Job job = {src.buf, src_kind, out.buf, out_kind, absmax.buf, have_absmax, scale.buf, code.buf, mids.buf,
               n,       blocksize, start, stop, errors, 0.0, 0.0, 0, {0}, {0}, {0}};
    build_buckets(&job);
    Py_BEGIN_ALLOW_THREADS run(&job, isa);
    Py_END_ALLOW_THREADS result = Py_BuildValue("(dd)", job.diff2, job.norm2);
done:
    PyBuffer_Release(&src);
    if (out.obj) PyBuffer_Release(&out);
    if (absmax.obj) PyBuffer_Release(&absmax);
    if (scale.obj) PyBuffer_Release(&scale);
    if (code.obj) PyBuffer_Release(&code);
    if (mids.obj) PyBuffer_Release(&mids);
    return result;
}

PyDoc_STRVAR(distance_sums_doc,
             "distance_sums(written, written_kind, exact, exact_kind, onto, isa=-1) -> (d2, e2, dp2, p2)\n\n"
             "sum((w - e)^2), sum(e^2) and, with onto, sum((w - p)^2), sum(p^2) where p is e rounded once to "
             "written's kind (else zeros): float32 differences, float64 totals. Kinds as fake_quant4's; "
             "isa: -1 the best, 0 scalar, 1 or more AVX2.");

static PyObject *distance_sums(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *keywords[] = {"written", "written_kind", "exact", "exact_kind", "onto", "isa", NULL};
    PyObject *written_obj, *exact_obj;
    int written_kind, exact_kind, onto, isa = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiOip|i", keywords, &written_obj, &written_kind, &exact_obj,
                                     &exact_kind, &onto, &isa))
        return NULL;
    if (written_kind < 0 || written_kind > 2 || exact_kind < 0 || exact_kind > 2) {
        PyErr_SetString(PyExc_ValueError, "kind: 0 float32, 1 float16, 2 bfloat16");
        return NULL;
    }
    if (isa < 0) isa = best_isa;
    Py_buffer written = {0}, exact = {0};
    PyObject *result = NULL;
    if (get_buffer(written_obj, &written, 0, "written") < 0) return NULL;
    if (get_buffer(exact_obj, &exact, 0, "exact") < 0) goto done;
    Py_ssize_t n = written.len / kind_size(written_kind);
    if (written.len % kind_size(written_kind) || exact.len != n * kind_size(exact_kind)) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match");
        goto done;
    }
    Distances job = {written.buf, exact.buf, written_kind, exact_kind, onto, n, {0.0, 0.0, 0.0, 0.0}};
    Py_BEGIN_ALLOW_THREADS
#ifdef QUANT4_X86
    if (isa >= ISA_AVX2 && best_isa >= ISA_AVX2)
        distances_avx2(&job);
    else
#endif
        distances_scalar(&job);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(dddd)", job.sums[0], job.sums[1], job.sums[2], job.sums[3]);
done:
    PyBuffer_Release(&written);
    if (exact.obj) PyBuffer_Release(&exact);
    return result;
}

PyDoc_STRVAR(merge_onto_doc,
             "merge_onto(product, w0, w0_kind, onto, scaling, out, out_kind, exact, isa=-1) -> None or sums\n\n"
             "p = product * scaling; exact = p + w0; out = p + onto rounded once to out_kind: float32 "
             "steps, as merge/quant.py's merged_onto takes them. product, onto, exact: float32; w0 and out "
             "raw buffers of their kinds (as fake_quant4's), all of one size. exact None: instead of "
             "writing it, return distance_sums(out, exact, onto=True) over these values, the same float32 "
             "and float64 steps. isa: -1 the best, 0 scalar, 1 AVX2, 2 AVX-512.");

static PyObject *merge_onto(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *keywords[] = {"product", "w0", "w0_kind", "onto", "scaling", "out", "out_kind", "exact", "isa", NULL};
    PyObject *product_obj, *w0_obj, *onto_obj, *out_obj, *exact_obj;
    int w0_kind, out_kind, isa = -1;
    float scaling;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOiOfOiO|i", keywords, &product_obj, &w0_obj, &w0_kind,
                                     &onto_obj, &scaling, &out_obj, &out_kind, &exact_obj, &isa))
        return NULL;
    if (w0_kind < 0 || w0_kind > 2 || out_kind < 0 || out_kind > 2) {
        PyErr_SetString(PyExc_ValueError, "kind: 0 float32, 1 float16, 2 bfloat16");
        return NULL;
    }
    if (isa < 0) isa = best_isa;
    if (isa > best_isa) {
        PyErr_Format(PyExc_ValueError, "isa %d: this CPU runs at most %s", isa, ISA_NAMES[best_isa]);
        return NULL;
    }
    Py_buffer product = {0}, w0 = {0}, onto = {0}, out = {0}, exact = {0};
    PyObject *result = NULL;
    if (get_buffer(product_obj, &product, 0, "product") < 0 || get_buffer(w0_obj, &w0, 0, "w0") < 0 ||
        get_buffer(onto_obj, &onto, 0, "onto") < 0 || get_buffer(out_obj, &out, 1, "out") < 0 ||
        (exact_obj != Py_None && get_buffer(exact_obj, &exact, 1, "exact") < 0))
        goto done;
    Py_ssize_t n = product.len / 4;
    if (product.len % 4 || w0.len != n * kind_size(w0_kind) || onto.len != n * 4 || out.len != n * kind_size(out_kind) ||
        (exact.buf && exact.len != n * 4)) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match");
        goto done;
    }
    Onto job = {product.buf, onto.buf, w0.buf, w0_kind, out_kind, scaling, out.buf, exact.buf, n, {0.0, 0.0, 0.0, 0.0}};
    Py_BEGIN_ALLOW_THREADS
#ifdef QUANT4_X86
    if (isa == ISA_AVX512 && exact.buf)
        onto_avx512(&job);
    else if (isa >= ISA_AVX2) /* the distances: distance_sums' AVX2 order on AVX-512 too */
        onto_avx2(&job);
    else
#endif
        onto_scalar(&job, 0);
    Py_END_ALLOW_THREADS
    if (exact.buf) {
        result = Py_None;
        Py_INCREF(result);
    } else {
        result = Py_BuildValue("(dddd)", job.sums[0], job.sums[1], job.sums[2], job.sums[3]);
    }
done:
    if (product.obj) PyBuffer_Release(&product);
    if (w0.obj) PyBuffer_Release(&w0);
    if (onto.obj) PyBuffer_Release(&onto);
    if (out.obj) PyBuffer_Release(&out);
    if (exact.obj) PyBuffer_Release(&exact);
    return result;
}

static PyMethodDef methods[] = {
    {"distance_sums", (PyCFunction)(void (*)(void))distance_sums, METH_VARARGS | METH_KEYWORDS, distance_sums_doc},
    {"fake_quant4", (PyCFunction)(void (*)(void))fake_quant4, METH_VARARGS | METH_KEYWORDS, fake_quant4_doc},
    {"merge_onto", (PyCFunction)(void (*)(void))merge_onto, METH_VARARGS | METH_KEYWORDS, merge_onto_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_quant4", "NF4/FP4 fake quantization in one pass (see lora_deploy/merge/bnb.py).", -1,
    methods,               NULL,      NULL,                                                                     NULL,
    NULL};

PyMODINIT_FUNC PyInit__quant4(void) {
    detect_isa();
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddStringConstant(m, "ISA", ISA_NAMES[best_isa]) < 0 || PyModule_AddIntConstant(m, "BEST_ISA", best_isa) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
