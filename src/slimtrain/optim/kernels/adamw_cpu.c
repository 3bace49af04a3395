/* One fused AdamW step over a range of blocks of a float32 parameter whose moments are stored in
 * float32, in bit-packed codes with an absmax scale per block (a codebook), or in bit-packed codes
 * on logarithmic levels (SOLO), and over quantized weights (float8, int8 or int4 codes with row or
 * group scales) updated without a master copy (ECO or naive updates).
 * Groups of 8 blocks are decoded into buffers in L1, updated, and encoded again: one pass over the
 * parameter, the gradient and the state bytes, no full-size temporary. Work is done on 8-lane
 * vectors (GCC vector extensions; AVX2 where it helps), the per-block scalars of a group one
 * block per lane.
 *
 * Every operation mirrors, in order and in float32, the eager torch code of slimtrain.quant and
 * slimtrain.optim.functional, so that both give the same bits (build with -ffp-contract=off).
 * Compiled and loaded by slimtrain/optim/kernels/__init__.py.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

enum { KIND_FLOAT = 0, KIND_CODEBOOK = 1, KIND_LOG = 2 };

typedef struct {
    int32_t kind;        /* KIND_* */
    int32_t bits;        /* code width (2..8) for the quantized kinds */
    int32_t stochastic;  /* stochastic rounding when encoding */
    uint32_t key;        /* mix32(seed): noise of padded element i is hash(i + key) */
    float quantile;      /* p of the logarithmic map */
    float *values;       /* KIND_FLOAT: numel float32 */
    uint8_t *codes;      /* quantized: packed codes of all blocks */
    float *scales;       /* codebook: one absmax per block; log: (max, x_p) per block */
    const float *levels; /* codebook: 2^bits sorted levels */
    const float *mids;   /* codebook: 2^bits - 1 midpoints between neighbouring levels */
} state_t;

typedef struct {
    float decay, lerp_weight, beta2, one_minus_beta2, eps, inverse_bias_correction2_sqrt, neg_step_size;
    int32_t maximize;
} adamw_scalars_t;

typedef struct {
    float neg_lr, momentum, one_minus_dampening, weight_decay;
    int32_t nesterov, maximize, first; /* first: the buffer becomes the gradient */
} sgd_scalars_t;

/* ------------------------------------------------------------------ counter-based noise */
static inline uint32_t mix32(uint32_t x) {
    x = ((x >> 16) ^ x) * 0x45D9F3Bu;
    x = ((x >> 16) ^ x) * 0x45D9F3Bu;
    return (x >> 16) ^ x;
}

static inline float noise_at(uint32_t key, int64_t index) {
    return (float)(mix32((uint32_t)index + key) >> 8) * (1.0f / 16777216.0f);
}

/* ------------------------------------------------- log2 / exp2 of slimtrain.quant.elementary */
static inline float bits_float(uint32_t b) { float x; memcpy(&x, &b, sizeof x); return x; }

#define TINY 1.17549435082228750797e-38f /* smallest normal float32 */

/* 8-lane vectors (GCC/Clang vector extensions: AVX on x86-64 with -march=native). Block sizes
 * are multiples of 8, so every loop over a block runs on whole vectors. Maxima, minima and
 * integer counts do not depend on the order of evaluation, so lanes give the same bits. */
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef uint32_t u8v __attribute__((vector_size(32)));
static const u8v LANE = {0, 1, 2, 3, 4, 5, 6, 7};
static inline f8 load8(const float *p) { f8 v; memcpy(&v, p, sizeof v); return v; }
static inline i8 load8i(const int32_t *p) { i8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8i(int32_t *p, i8 v) { memcpy(p, &v, sizeof v); }
static inline f8 splat8(float x) { return (f8){x, x, x, x, x, x, x, x}; }
/* a where mask (all ones), else b */
static inline f8 select8(i8 mask, f8 a, f8 b) {
#if defined(__AVX__)
    return (f8)_mm256_blendv_ps((__m256)b, (__m256)a, (__m256)mask);
#else
    return (f8)((mask & (i8)a) | (~mask & (i8)b));
#endif
}
/* a > b ? a : b, lane by lane (NaN in either gives b): what x86's max instruction computes */
static inline f8 max8(f8 a, f8 b) {
#if defined(__AVX__)
    return (f8)_mm256_max_ps((__m256)a, (__m256)b);
#else
    return select8(a > b, a, b);
#endif
}
/* a < b ? a : b, lane by lane (NaN in either gives b) */
static inline f8 min8(f8 a, f8 b) {
#if defined(__AVX__)
    return (f8)_mm256_min_ps((__m256)a, (__m256)b);
#else
    return select8(a < b, a, b);
#endif
}
/* whether any lane of the mask is set */
static inline int any8(i8 mask) {
#if defined(__AVX__)
    return _mm256_movemask_ps((__m256)mask) != 0;
#else
    int any = 0;
    for (int j = 0; j < 8; ++j) any |= mask[j];
    return any != 0;
#endif
}

/* int32 minimum and maximum, lane by lane */
static inline i8 min8i(i8 a, i8 b) {
#if defined(__AVX2__)
    return (i8)_mm256_min_epi32((__m256i)a, (__m256i)b);
#else
    return (i8)select8(a < b, (f8)a, (f8)b);
#endif
}
static inline i8 max8i(i8 a, i8 b) {
#if defined(__AVX2__)
    return (i8)_mm256_max_epi32((__m256i)a, (__m256i)b);
#else
    return (i8)select8(a > b, (f8)a, (f8)b);
#endif
}

/* the hash inputs of noise_at for the 8 indices index .. index + 7; a loop adds 8 for the next 8 */
static inline u8v noise_counter8(uint32_t key, int64_t index) {
    return ((u8v){0} + ((uint32_t)index + key)) + LANE;
}
/* noise_at of the 8 indices whose hash inputs are x, times 2^24: integers in [0, 2^24) */
static inline i8 noise_bits_at8(u8v x) {
    for (int round = 0; round < 2; ++round) x = ((x >> 16) ^ x) * 0x45D9F3Bu;
    x = (x >> 16) ^ x;
    return (i8)(x >> 8);
}
static inline f8 noise_of_bits8(i8 bits) { return __builtin_convertvector(bits, f8) * (1.0f / 16777216.0f); }
/* noise_at of the 8 indices index .. index + 7 */
static inline f8 noise8(uint32_t key, int64_t index) {
    return noise_of_bits8(noise_bits_at8(noise_counter8(key, index)));
}

static inline float lanes_max(f8 v, float start) {
    for (int j = 0; j < 8; ++j) start = v[j] > start ? v[j] : start;
    return start;
}

/* Per-block reductions of a group: lane b of the result reduces the lanes of v[b] (b < 8), by a
 * tree of pairwise steps. Exact for sums of integers and for maxima and minima of values free of
 * NaN and of -0 (so in any order). */
enum { SUM_INTS = 0, MAXIMUM = 1, MINIMUM = 2 };

static inline __attribute__((always_inline)) f8 combine8(f8 a, f8 b, int how) {
    return how == MAXIMUM ? max8(a, b) : how == MINIMUM ? min8(a, b) : (f8)((i8)a + (i8)b);
}

/* [a0 a2 b0 b2 a4 a6 b4 b6] combined with [a1 a3 b1 b3 a5 a7 b5 b7] */
static inline __attribute__((always_inline)) f8 pairs8(f8 a, f8 b, int how) {
    return combine8(__builtin_shuffle(a, b, (i8){0, 2, 8, 10, 4, 6, 12, 14}),
                    __builtin_shuffle(a, b, (i8){1, 3, 9, 11, 5, 7, 13, 15}), how);
}

static inline __attribute__((always_inline)) f8 reduce_each8(const f8 v[8], int how) {
    /* q0: lanes 0-3 reduce the lower halves of v[0..3], lanes 4-7 their upper halves; q1: v[4..7] */
    const f8 q0 = pairs8(pairs8(v[0], v[1], how), pairs8(v[2], v[3], how), how);
    const f8 q1 = pairs8(pairs8(v[4], v[5], how), pairs8(v[6], v[7], how), how);
    return combine8(__builtin_shuffle(q0, q1, (i8){0, 1, 2, 3, 8, 9, 10, 11}),
                    __builtin_shuffle(q0, q1, (i8){4, 5, 6, 7, 12, 13, 14, 15}), how);
}

static inline f8 floor8(f8 v) {
    for (int j = 0; j < 8; ++j) v[j] = floorf(v[j]);
    return v;
}

/* log2 of each lane: frexp by bit manipulation (subnormals scaled by 2^24 first), then the atanh
 * series of slimtrain.quant.elementary.log2, branch-free. log2_series8 is the series part: e +
 * log2(m) for m in [sqrt(1/2), sqrt(2)). */
static inline f8 log2_series8(f8 m, i8 e) {
    const f8 s = (m - 1.0f) / (m + 1.0f);
    const f8 s2 = s * s;
    f8 series = splat8(0.1111111119389534f);
    series = series * s2 + 0.1428571492433548f;
    series = series * s2 + 0.20000000298023224f;
    series = series * s2 + 0.3333333432674408f;
    series = series * s2 + 1.0f;
    return __builtin_convertvector(e, f8) + (s * series) * 2.885390043258667f;
}

static inline f8 log2_general8(f8 x) {
    const i8 subnormal = x < TINY;
    const i8 b = (i8)select8(subnormal, x * 16777216.0f, x);
    i8 e = ((b >> 23) & 0xFF) - 126 - (subnormal & 24);
    f8 m = (f8)((b & 0x007FFFFF) | 0x3F000000); /* in [0.5, 1) */
    const i8 small = m < 0.7071067690849304f;
    m = select8(small, m * 2.0f, m);
    e = e + small; /* small is -1 where true */
    f8 r = log2_series8(m, e);
    r = select8(x == INFINITY, x, r);
    return select8(x > 0.0f, r, select8(x == 0.0f, splat8(-INFINITY), splat8(NAN)));
}

/* log2_general8 of lanes that are all positive normal floats (bits b in [0x00800000, 0x7F7FFFFF]):
 * the same m and e straight from the bits, as subtracting sqrt(1/2)'s bits moves the exponent down
 * by one exactly where the mantissa is below sqrt(1/2)'s */
static inline f8 log2_normal8(i8 b) {
    const i8 e = (b - 0x3F3504F3) >> 23;
    return log2_series8((f8)(b - (e << 23)), e);
}

static inline int all_normal8(i8 b) { return !any8((b < 0x00800000) | (b > 0x7F7FFFFF)); } /* sign: b < 0 */

static inline f8 log2_8(f8 x) { return all_normal8((i8)x) ? log2_normal8((i8)x) : log2_general8(x); }

/* 2^n for int32 lanes n in [-126, 127], from the exponent bits */
static inline f8 power_of_two8(i8 n) { return (f8)((n + 127) << 23); }

/* exp2 of each lane, as slimtrain.quant.elementary.exp2: 0 below -252, +inf above 254. Where every
 * lane is in [-125, 126], 2^n is one normal float and p * 2^n is exact, so one scaling gives the
 * bits of the two below. */
static const float EXP2_COEFF[9] = {1.3215486660556053e-06f, 1.5252733646775596e-05f,
                                    0.0001540352968731895f, 0.0013333557872101665f,
                                    0.009618128649890423f, 0.05550410971045494f,
                                    0.24022650718688965f, 0.6931471824645996f, 1.0f};

static inline f8 exp2_poly8(f8 r) {
    f8 p = splat8(EXP2_COEFF[0]);
    for (int k = 1; k < 9; ++k) p = p * r + EXP2_COEFF[k];
    return p;
}

/* exp2_8 of lanes all in [-125, 126] (its one-scaling path) */
static inline f8 exp2_near8(f8 y) {
    const f8 n = floor8(y + 0.5f);
    return exp2_poly8(y - n) * power_of_two8(__builtin_convertvector(n, i8));
}

static inline f8 exp2_8(f8 y) {
    if (!any8(~((y >= -125.0f) & (y <= 126.0f)))) return exp2_near8(y); /* NaN fails both */
    const i8 below = y < -252.0f, above = y > 254.0f;
    const f8 clamped = select8(below, splat8(-252.0f), select8(above, splat8(254.0f), y));
    const f8 n = floor8(clamped + 0.5f);
    const f8 p = exp2_poly8(clamped - n);
    const i8 whole = __builtin_convertvector(select8(n == n, n, splat8(0.0f)), i8);
    const i8 half = whole >> 1; /* floor(whole / 2) */
    f8 result = p * power_of_two8(half) * power_of_two8(whole - half);
    result = select8(below, splat8(0.0f), select8(above, splat8(INFINITY), result));
    return select8(y == y, result, y); /* NaN stays NaN */
}

static inline float power_of_two(int32_t n) { return bits_float((uint32_t)(n + 127) << 23); }

/* ------------------------------------------------------ parts of vectors, bytes of codes */
typedef uint8_t u8x8 __attribute__((vector_size(8)));

/* BODY for i = 0, 8, 16, ... < COUNT with n = min(8, COUNT - i) elements: a constant 8 but in the tail */
#define FOR_PARTS(COUNT, BODY) { \
    int64_t i = 0; \
    for (; i + 8 <= (COUNT); i += 8) { const int64_t n = 8; BODY } \
    if (i < (COUNT)) { const int64_t n = (COUNT) - i; BODY } }

/* n <= 8 floats (codes) from p, zeros after; and back */
static inline f8 load_part(const float *p, int64_t n) { f8 v = {0}; memcpy(&v, p, (size_t)n * 4); return v; }
static inline void store_part(float *p, f8 v, int64_t n) { memcpy(p, &v, (size_t)n * 4); }
static inline i8 load_codes(const uint8_t *p, int64_t n) {
#if defined(__AVX2__) /* one zero-extending move; the generic conversion goes byte by byte */
    long long word = 0;
    memcpy(&word, p, (size_t)n);
    return (i8)_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(word));
#else
    u8x8 c = {0};
    memcpy(&c, p, (size_t)n);
    return __builtin_convertvector(c, i8);
#endif
}
static inline void store_codes(uint8_t *p, i8 codes, int64_t n) { /* codes in 0 .. 255 */
#if defined(__AVX2__)
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128((__m256i)codes),
                                           _mm256_extracti128_si256((__m256i)codes, 1));
    const __m128i bytes = _mm_packus_epi16(words, words);
    memcpy(p, &bytes, (size_t)n);
#else
    u8x8 c = __builtin_convertvector(codes, u8x8);
    memcpy(p, &c, (size_t)n);
#endif
}

/* log2_8 and exp2_8 of `count` floats, 8 lanes at a time (zeros after the last), into log2_out and
 * exp2_out: lets tests compare both paths of each with slimtrain.quant.elementary */
void elementary_lanes(int64_t count, const float *x, float *log2_out, float *exp2_out) {
    FOR_PARTS(count, {
        const f8 v = load_part(x + i, n);
        store_part(log2_out + i, log2_8(v), n);
        store_part(exp2_out + i, exp2_8(v), n);
    })
}

/* ------------------------------------------------------------------------- bit packing */
/* 8 codes of `bits` bits fill exactly `bits` bytes, little-endian: code j at bit j * bits. One
 * group of 8 codes is one vector; `bits` is a constant wherever these are inlined. */

/* n <= 8 bytes as a little-endian word, composed in registers: a memcpy of 3, 5, 6 or 7 bytes into
 * a zeroed word goes through the stack, and reading the word back then stalls store forwarding */
static inline __attribute__((always_inline)) uint64_t load_word(const uint8_t *src, int n) {
    if (n == 2) { uint16_t w; memcpy(&w, src, 2); return w; }
    if (n == 4) { uint32_t w; memcpy(&w, src, 4); return w; }
    uint64_t word = 0;
    for (int j = 0; j < n; ++j) word |= (uint64_t)src[j] << (8 * j);
    return word;
}

static inline __attribute__((always_inline)) i8 unpack8(const uint8_t *src, int bits) {
    if (bits == 8) return load_codes(src, 8); /* one byte per code */
    const uint64_t word = load_word(src, bits);
    if (bits <= 4) /* every code in a 32-bit word: one shift per lane */
        return (i8)((((u8v){0} + (uint32_t)word) >> (LANE * (uint32_t)bits)) & ((1u << bits) - 1));
    i8 codes;
    for (int j = 0; j < 8; ++j) codes[j] = (int32_t)((word >> (j * bits)) & ((1u << bits) - 1));
    return codes;
}

static inline __attribute__((always_inline)) void pack8(i8 codes, int bits, uint8_t *dst) {
    if (bits == 8) { store_codes(dst, codes, 8); return; }
    uint64_t word = 0;
    if (bits <= 4) { /* shift each lane into place, then OR the lanes together */
        u8v w = (u8v)codes << (LANE * (uint32_t)bits);
        w |= __builtin_shuffle(w, (u8v){4, 5, 6, 7, 0, 1, 2, 3});
        w |= __builtin_shuffle(w, (u8v){2, 3, 0, 1, 6, 7, 4, 5});
        w |= __builtin_shuffle(w, (u8v){1, 0, 3, 2, 5, 4, 7, 6});
        word = w[0];
    } else {
        for (int j = 0; j < 8; ++j) word |= (uint64_t)(uint32_t)codes[j] << (j * bits);
    }
    memcpy(dst, &word, (size_t)bits);
}

/* pack8 of four groups at once (32 codes of bits <= 4, or 8, into 4 * bits bytes). Below 8 bits,
 * the lanes of each group, shifted into place, hold disjoint bits, so their sum is their OR, and
 * three horizontal adds sum the four groups side by side. */
static inline __attribute__((always_inline)) void pack8x4(const i8 groups[4], int bits, uint8_t *dst) {
#if defined(__AVX2__)
    if (bits == 8) { /* bytes [a0..3 b0..3 c0..3 d0..3 | a4..7 b4..7 ...] put in order */
        const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32((__m256i)groups[0], (__m256i)groups[1]),
                                                  _mm256_packus_epi32((__m256i)groups[2], (__m256i)groups[3]));
        _mm256_storeu_si256((__m256i *)dst,
                            _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        return;
    }
    const __m256i shift = (__m256i)(LANE * (uint32_t)bits);
    __m256i s[4];
    for (int q = 0; q < 4; ++q) s[q] = _mm256_sllv_epi32((__m256i)groups[q], shift);
    /* [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, ...], then [a0..3, b0..3, c0..3, d0..3 | a4..7, ...] */
    const __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
    const __m128i words = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
    if (bits == 4) {
        _mm_storeu_si128((__m128i *)dst, words);
    } else if (bits == 2) {
        _mm_storel_epi64((__m128i *)dst, _mm_packus_epi32(words, words)); /* words below 2^16 */
    } else { /* 3 bytes of each word */
        const __m128i bytes = _mm_shuffle_epi8(words, _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14,
                                                                    -1, -1, -1, -1));
        memcpy(dst, &bytes, 12);
    }
#else
    for (int q = 0; q < 4; ++q) pack8(groups[q], bits, dst + bits * q);
#endif
}

#define EACH_CODE_WIDTH(CASE) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)

/* count (a multiple of 8) codes, one int32 each, packed into count * bits / 8 bytes at dst */
static void pack_block(const int32_t *codes, int bits, int64_t count, uint8_t *dst) {
#define PACK_CASE(BITS) \
    case BITS: { \
        int64_t g = 0; \
        if (BITS <= 4 || BITS == 8) \
            for (; g + 4 <= count / 8; g += 4) { \
                const i8 groups[4] = {load8i(codes + 8 * g), load8i(codes + 8 * g + 8), \
                                      load8i(codes + 8 * g + 16), load8i(codes + 8 * g + 24)}; \
                pack8x4(groups, BITS, dst + BITS * g); \
            } \
        for (; g < count / 8; ++g) pack8(load8i(codes + 8 * g), BITS, dst + BITS * g); \
        break; \
    }
    switch (bits) { EACH_CODE_WIDTH(PACK_CASE) }
#undef PACK_CASE
}

/* lanes where entry < y (entry <= y if inclusive) */
static inline i8 entries_below(f8 entry, f8 y, int inclusive) { return inclusive ? entry <= y : entry < y; }

/* table[index] lane by lane, index in 0 .. 7 */
static inline f8 permute8(f8 table, i8 index) {
#if defined(__AVX2__)
    return (f8)_mm256_permutevar8x32_ps((__m256)table, (__m256i)index);
#else
    f8 out;
    for (int j = 0; j < 8; ++j) out[j] = table[index[j]];
    return out;
#endif
}

/* A sorted table is searched for the number of its entries below each value (at or below, if
 * inclusive). One of up to 15 entries (2- to 4-bit codebooks), padded to 16 with NaN (below no
 * value, +inf included), is held in registers: the count is in [4q, 4q + 3], q = entries 3, 7, 11
 * below y; then it is at least 4q + 2 exactly where entry 4q + 1 is below y (j = 2q + that), and
 * 2j + 1 exactly where entry 2j is: a binary search whose lookups are one permute each. Larger
 * tables (5- to 8-bit codebooks, entries in [-1, 1]) are searched through buckets of floats, one
 * table lookup per value: in the order-preserving integer key of floats, bucket b holds the keys
 * BASE_KEY + [b, b + 1) << shift, the shift chosen per table so that no bucket holds two entries
 * (1 / 256 of an entry's magnitude apart is enough); bucket b's word holds the number of entries in
 * lower buckets (top 8 bits) and the offset of its entry in it (low 24 bits; EMPTY if none), so
 * that the count for y at offset r of bucket b is that number + (offset < r), or + (offset < r + 1)
 * at or below. The last bucket takes every key above +1's bucket. */
#define SMALL_TABLE 15
#define BASE_KEY 0x407FFFFEu /* the key of -1, less 1: -1 is at offset 1 of bucket 0 */
#define TOP_KEY 0xBF800000u  /* the key of +1 */
#define SHIFT_MOST 18        /* the coarsest buckets tried */
#define SHIFT_LEAST 15       /* the finest: 2^-8 of a power of two wide */
#define BUCKETS_MOST (((TOP_KEY - BASE_KEY) >> SHIFT_LEAST) + 2)
#define EMPTY 0xFFFFFFu

typedef struct {
    int n, shift;                      /* entries (<= 255); the buckets' shift (n > SMALL_TABLE) */
    float table[SMALL_TABLE + 1];      /* n <= SMALL_TABLE: the n sorted entries, then NaN */
    float quarter[8], even[8];         /* n <= SMALL_TABLE: entries 4k + 1 (k < 4), entries 2k */
    uint32_t buckets[BUCKETS_MOST];    /* n > SMALL_TABLE: count below << 24 | offset of the entry */
} search_t;

/* the order-preserving keys of 8 floats, -0 as +0 (they compare equal): negative floats' bits
 * flipped, positive ones' sign bit set */
static inline u8v keys_of8(f8 y) {
    const i8 bits = (i8)(y + 0.0f); /* -0 + 0 = +0 */
    return (u8v)(bits ^ ((bits >> 31) | (int32_t)0x80000000));
}

/* lanes of a, at most cap; at least floor */
static inline u8v at_most8(u8v a, uint32_t cap) {
#if defined(__AVX2__)
    return (u8v)_mm256_min_epu32((__m256i)a, _mm256_set1_epi32((int)cap));
#else
    const u8v less = (u8v)(a < cap);
    return (less & a) | (~less & cap);
#endif
}
static inline u8v at_least8(u8v a, uint32_t floor) {
#if defined(__AVX2__)
    return (u8v)_mm256_max_epu32((__m256i)a, _mm256_set1_epi32((int)floor));
#else
    const u8v more = (u8v)(a > floor);
    return (more & a) | (~more & floor);
#endif
}

/* keys above BASE_KEY, counted from it (0 at or below it) */
static inline u8v from_base8(u8v key) { return at_least8(key, BASE_KEY) - BASE_KEY; }

/* prepare the search of table[0 .. n) (sorted): 0, or 1 if two entries are closer than the finest
 * buckets tell apart or one is outside [-1, 1] */
static int prepare_search(const float *table, int n, search_t *out) {
    out->n = n;
    for (int j = 0; j <= SMALL_TABLE; ++j) out->table[j] = j < n ? table[j] : NAN;
    for (int k = 0; k < 8; ++k) {
        out->quarter[k] = k < 4 ? out->table[4 * k + 1] : 0.0f;
        out->even[k] = out->table[2 * k];
    }
    if (n <= SMALL_TABLE) return 0;
    uint32_t at[256]; /* each entry's key from BASE_KEY */
    for (int j = 0; j < n; ++j) at[j] = from_base8(keys_of8(splat8(table[j])))[0];
    int shift = SHIFT_MOST;
    for (int j = 1; j < n; ++j)
        while (shift >= SHIFT_LEAST && at[j] >> shift == at[j - 1] >> shift) --shift;
    const uint32_t buckets = ((TOP_KEY - BASE_KEY) >> shift) + 2;
    if (shift < SHIFT_LEAST || at[0] == 0 || at[n - 1] >> shift >= buckets - 1) return 1;
    out->shift = shift;
    uint32_t b = 0;
    for (uint32_t j = 0; j <= (uint32_t)n; ++j) { /* the empty buckets before entry j, then its own */
        const uint32_t end = j < (uint32_t)n ? at[j] >> shift : buckets;
        for (; b < end; ++b) out->buckets[b] = j << 24 | EMPTY;
        if (j < (uint32_t)n) out->buckets[b++] = j << 24 | (at[j] & ((1u << shift) - 1));
    }
    return 0;
}

/* a prepared table of at most SMALL_TABLE entries, in registers */
typedef struct { f8 quarters, evens, t3, t7, t11; } small_search_t;

static inline small_search_t small_search_of(const search_t *s) {
    const small_search_t small = {load8(s->quarter), load8(s->even), splat8(s->table[3]),
                                  splat8(s->table[7]), splat8(s->table[11])};
    return small;
}

/* the number of entries below each of y (at or below, if inclusive) */
static inline __attribute__((always_inline)) i8 count_small8(const small_search_t *t, f8 y, int inclusive) {
    /* masks are -1 */
    const i8 q = -entries_below(t->t3, y, inclusive) - entries_below(t->t7, y, inclusive) -
                 entries_below(t->t11, y, inclusive);
    const i8 j = q + q - entries_below(permute8(t->quarters, q), y, inclusive);
    return j + j - entries_below(permute8(t->evens, j), y, inclusive);
}

/* out[i] = the number of entries of the prepared table below x[i] (<= x[i] if inclusive), for
 * x[0 .. count) (a multiple of 8) */
static void count_below(const search_t *s, const float *x, int64_t count, int inclusive, int32_t *out) {
    if (s->n <= SMALL_TABLE) {
        const small_search_t small = small_search_of(s);
        for (int64_t i = 0; i < count; i += 8) store8i(out + i, count_small8(&small, load8(x + i), inclusive));
        return;
    }
    const int shift = s->shift;
    const uint32_t last = (TOP_KEY - BASE_KEY) >> shift; /* the last bucket: + 1 */
    for (int64_t i = 0; i < count; i += 8) {
        const f8 y = load8(x + i);
        const u8v key = from_base8(keys_of8(y)), bucket = at_most8(key >> shift, last + 1);
        const u8v offset = at_most8(key - (bucket << shift), 1u << shift); /* past the last bucket: its end */
        i8 word;
#if defined(__AVX2__)
        word = (i8)_mm256_i32gather_epi32((const int *)s->buckets, (__m256i)bucket, 4);
#else
        for (int j = 0; j < 8; ++j) word[j] = (int32_t)s->buckets[bucket[j]];
#endif
        const i8 entry_offset = word & (int32_t)EMPTY, limit = (i8)offset + inclusive;
        const i8 c = (i8)((u8v)word >> 24) - (entry_offset < limit);
        store8i(out + i, c & (y == y)); /* NaN is above no entry */
    }
}

/* out[i] = count_below of table[0 .. n) (sorted) at x[i], for i < count (a multiple of 8): lets
 * tests compare both searches with torch.searchsorted; 0, 1 (see prepare_search) or 2 (memory) */
int search_lanes(const float *table, int n, int64_t count, const float *x, int inclusive, int32_t *out) {
    search_t *search = malloc(sizeof *search);
    const int status = !search ? 2 : prepare_search(table, n, search);
    if (!status) count_below(search, x, count, inclusive, out);
    free(search);
    return status;
}

/* ---------------------------------------------------------------------- decode / encode */
/* Decoding looks levels up in per-block tables of at most TABLE_LEVELS entries, held in two
 * registers; states with more levels are decoded element by element (decode_group_elements). */
#define TABLE_LEVELS 16

/* table[index] lane by lane, from memory */
static inline f8 gather8(const float *table, i8 index) {
#if defined(__AVX2__)
    return (f8)_mm256_i32gather_ps(table, (__m256i)index, 4);
#else
    f8 out;
    for (int j = 0; j < 8; ++j) out[j] = table[index[j]];
    return out;
#endif
}

/* a table of at most TABLE_LEVELS entries in two vectors: entries 0-7 in low, 8-15 in high */
typedef struct { f8 low, high; } table_t;

/* levels[0 .. size) * scale (the codebook map's values), each product as the scalar one */
static table_t codebook_table(const float *levels, int size, float scale) {
    const table_t t = {load_part(levels, size < 8 ? size : 8) * scale,
                       size > 8 ? load_part(levels + 8, size - 8) * scale : splat8(0.0f)};
    return t;
}

/* the entries of t (of `size` entries, a constant where inlined) at 8 codes */
static inline __attribute__((always_inline)) f8 lookup8(table_t t, i8 codes, int size) {
#if defined(__AVX2__)
    if (size <= 8) return permute8(t.low, codes);
    return (f8)_mm256_blendv_ps((__m256)permute8(t.low, codes), (__m256)permute8(t.high, codes),
                                (__m256)(codes << 28)); /* bit 3 -> sign */
#else
    f8 out;
    for (int j = 0; j < 8; ++j) out[j] = codes[j] < 8 ? t.low[codes[j]] : t.high[codes[j] - 8];
    return out;
#endif
}

/* out[i] = table[code i] for the count (a multiple of 8) codes packed at src */
static void decode_codes(const uint8_t *src, int bits, int64_t count, table_t t, float *out) {
#define DECODE_CASE(BITS) \
    case BITS: \
        for (int64_t g = 0; g < count / 8; ++g) { \
            const f8 values = lookup8(t, unpack8(src + BITS * g, BITS), 1 << BITS); \
            memcpy(out + 8 * g, &values, sizeof values); \
        } \
        break;
    switch (bits) { DECODE_CASE(2) DECODE_CASE(3) DECODE_CASE(4) } /* up to TABLE_LEVELS levels */
#undef DECODE_CASE
}

/* Blocks are decoded and encoded in groups of GROUP consecutive blocks, so that the per-block
 * scalar work of the logarithmic map (log2 and exp2 of its scales, the quantile bisection) runs
 * with one block per vector lane. */
#define GROUP 8

/* log_x: GROUP blocks; codes, counts: one; search: a codebook state's prepared table, else NULL */
typedef struct { float *log_x; int32_t *codes, *counts; const search_t *search; } scratch_t;

static inline int64_t valid_in(int64_t numel, int64_t block, int64_t block_size) {
    int64_t rest = numel - block * block_size;
    return rest < block_size ? rest : block_size;
}

/* the logarithmic map of 8 blocks (one per lane) from their max and x_p: log2(max) into *log_top,
 * and the step between levels in octaves (level k = 2^(log_top - step * k), k = 0 .. last); a block
 * whose max is 0 (all zeros) gets log_top = step = 0 */
static inline f8 log_map8(f8 top, f8 bottom, int last, f8 *log_top) {
    const i8 positive = top > 0.0f;
    *log_top = log2_8(select8(positive, top, splat8(1.0f)));
    return (*log_top - log2_8(select8(positive, bottom, splat8(1.0f)))) / (float)last;
}

/* log_map8 of blocks first .. first + count - 1 (count <= GROUP) of a logarithmic state */
static inline f8 load_log_map8(const state_t *s, int64_t first, int count, f8 *log_top, i8 *positive) {
    f8 top = splat8(0.0f), bottom = splat8(0.0f);
    for (int b = 0; b < count; ++b) {
        top[b] = s->scales[2 * (first + b)];
        bottom[b] = s->scales[2 * (first + b) + 1];
    }
    *positive = top > 0.0f;
    return log_map8(top, bottom, (1 << s->bits) - 1, log_top);
}

/* the levels of one block of the logarithmic map (zeros for an all-zero block) */
static table_t log_table(float log_top, float step, int positive, int size) {
    static const f8 low_k = {0, 1, 2, 3, 4, 5, 6, 7}, high_k = {8, 9, 10, 11, 12, 13, 14, 15};
    table_t t = {splat8(0.0f), splat8(0.0f)};
    if (!positive) return t;
    t.low = exp2_8(splat8(log_top) - splat8(step) * low_k);
    if (size > 8) t.high = exp2_8(splat8(log_top) - splat8(step) * high_k);
    return t;
}

/* how decode_block_elements finds a value: levels[code] * scale, exp2(log2(max) - step * code)
 * (EXP2_ANY), or the same where every such exponent is in exp2_8's one-scaling range (EXP2_NEAR) */
enum { FROM_LEVELS = 0, EXP2_ANY = 1, EXP2_NEAR = 2 };

/* one block of `bits`-bit codes into values, element by element, with the operations of
 * codebook_table and log_table (`bits` and `how` constants where inlined) */
static inline __attribute__((always_inline)) void decode_block_elements(
    const uint8_t *codes, int bits, int how, int64_t block_size, f8 log_top, f8 step,
    const float *levels, f8 scale, float *values) {
    for (int64_t g = 0; g < block_size / 8; ++g) {
        const i8 k = unpack8(codes + bits * g, bits);
        f8 v;
        if (how == FROM_LEVELS) {
            v = gather8(levels, k) * scale;
        } else {
            const f8 y = log_top - step * __builtin_convertvector(k, f8);
            v = how == EXP2_NEAR ? exp2_near8(y) : exp2_8(y);
        }
        memcpy(values + 8 * g, &v, sizeof v);
    }
}

/* decode_group for quantized states of more than TABLE_LEVELS levels */
static void decode_group_elements(const state_t *s, int64_t first, int count, int64_t block_size,
                                  float *out) {
    const int bits = s->bits, log_map = s->kind == KIND_LOG, last = (1 << bits) - 1;
    f8 log_top = splat8(0.0f), step = splat8(0.0f);
    i8 positive = {0};
    if (log_map) step = load_log_map8(s, first, count, &log_top, &positive);
    /* exponents fall from log_top (code 0) to log_top - step * last: both in exp2_8's near range? */
    const i8 near = (log_top <= 126.0f) & (log_top - step * (float)last >= -125.0f);
    for (int b = 0; b < count; ++b) {
        const uint8_t *codes = s->codes + (first + b) * block_size * bits / 8;
        float *values = out + b * block_size;
        if (log_map && !positive[b]) { /* an all-zero block */
            memset(values, 0, (size_t)block_size * sizeof(float));
            continue;
        }
        const f8 top_b = splat8(log_top[b]), step_b = splat8(step[b]);
        const f8 scale = splat8(log_map ? 0.0f : s->scales[first + b]);
        const int how = !log_map ? FROM_LEVELS : near[b] ? EXP2_NEAR : EXP2_ANY;
#define DECODE_AS(BITS, HOW) \
        decode_block_elements(codes, BITS, HOW, block_size, top_b, step_b, s->levels, scale, values)
#define ELEMENTS_CASE(BITS) \
        case BITS: \
            if (how == FROM_LEVELS) DECODE_AS(BITS, FROM_LEVELS); \
            else if (how == EXP2_NEAR) DECODE_AS(BITS, EXP2_NEAR); \
            else DECODE_AS(BITS, EXP2_ANY); \
            break;
        switch (bits) { EACH_CODE_WIDTH(ELEMENTS_CASE) }
#undef ELEMENTS_CASE
#undef DECODE_AS
    }
}

/* blocks first .. first + count - 1 (count <= GROUP) of quantized state s into out (count *
 * block_size floats, padding past the tensor's end included) */
static void decode_group(const state_t *s, int64_t first, int count, int64_t block_size, float *out) {
    const int64_t start = first * block_size;
    const int last = (1 << s->bits) - 1;
    if (last >= TABLE_LEVELS) { /* more levels than fit in registers: decode each element */
        decode_group_elements(s, first, count, block_size, out);
        return;
    }
    f8 log_top = splat8(0.0f), step = splat8(0.0f);
    i8 positive = {0};
    if (s->kind == KIND_LOG) step = load_log_map8(s, first, count, &log_top, &positive);
    for (int b = 0; b < count; ++b) {
        const table_t table = s->kind == KIND_LOG
                                  ? log_table(log_top[b], step[b], positive[b], last + 1)
                                  : codebook_table(s->levels, last + 1, s->scales[first + b]);
        const int64_t at = start + b * block_size;
        decode_codes(s->codes + at * s->bits / 8, s->bits, block_size, table, out + b * block_size);
    }
}

/* s's codebook levels at 8 codes: from `levels` (the codebook_table of s's levels, unscaled)
 * where they fit in it, else from memory */
static inline f8 levels_at8(const state_t *s, const table_t *levels, i8 codes) {
    if (s->bits == 2) return lookup8(*levels, codes, 4);
    if (s->bits == 3) return lookup8(*levels, codes, 8);
    if (s->bits == 4) return lookup8(*levels, codes, 16);
    return gather8(s->levels, codes);
}

/* one block's codes from its values x * boost * inverse, rounded to the nearest of at most
 * SMALL_TABLE + 1 levels: searched and packed vector by vector (`bits` a constant where inlined) */
static inline __attribute__((always_inline)) void encode_nearest_small(
    const small_search_t *small, const float *x, f8 boost, f8 inverse, int bits, int64_t block_size,
    uint8_t *dst) {
    const int64_t whole = block_size / 32 * 32; /* four groups at a time, then one */
    for (int64_t i = 0; i < whole; i += 32) {
        i8 groups[4];
        for (int q = 0; q < 4; ++q) groups[q] = count_small8(small, (load8(x + i + 8 * q) * boost) * inverse, 0);
        pack8x4(groups, bits, dst + i / 8 * bits);
    }
    for (int64_t i = whole; i < block_size; i += 8)
        pack8(count_small8(small, (load8(x + i) * boost) * inverse, 0), bits, dst + i / 8 * bits);
}

/* slimtrain.quant.blockwise.quantize_absmax of blocks first .. first + count - 1 (count <= GROUP)
 * of a codebook state from x (count * block_size floats) */
static void encode_codebook_group(const state_t *s, int64_t first, int count, int64_t block_size,
                                  const float *x, const scratch_t *w) {
    f8 maxes[GROUP]; /* each block's lanes of |x| (NaN dropped); past count, zeros */
    for (int b = count; b < GROUP; ++b) maxes[b] = splat8(0.0f);
    for (int b = 0; b < count; ++b) {
        f8 lane_max = splat8(0.0f);
        for (int64_t i = 0; i < block_size; i += 8)
            lane_max = max8((f8)((i8)load8(x + b * block_size + i) & 0x7FFFFFFF), lane_max);
        maxes[b] = lane_max;
    }
    const f8 absmax = reduce_each8(maxes, MAXIMUM);
    /* quantize_absmax: a subnormal absmax is scaled by 2^24 first, so that 1 / absmax is finite */
    const f8 boost = select8(absmax < TINY, splat8(16777216.0f), splat8(1.0f));
    const f8 inverse = 1.0f / select8(absmax > 0.0f, absmax * boost, splat8(1.0f));
    const int small = !s->stochastic && w->search->n <= SMALL_TABLE;
    const small_search_t small_search = small ? small_search_of(w->search) : (small_search_t){0};
    const int size = 1 << s->bits;
    const table_t levels = /* what stochastic rounding interpolates between, up to 16 levels */
        s->stochastic && size <= TABLE_LEVELS ? codebook_table(s->levels, size, 1.0f) : (table_t){0};
    for (int b = 0; b < count; ++b) {
        const int64_t block = first + b, start = block * block_size;
        const float *xb = x + b * block_size;
        uint8_t *codes = s->codes + start * s->bits / 8;
        const f8 boost_b = splat8(boost[b]), inverse_b = splat8(inverse[b]);
        s->scales[block] = absmax[b];
        if (small) {
            switch (s->bits) {
            case 2: encode_nearest_small(&small_search, xb, boost_b, inverse_b, 2, block_size, codes); break;
            case 3: encode_nearest_small(&small_search, xb, boost_b, inverse_b, 3, block_size, codes); break;
            case 4: encode_nearest_small(&small_search, xb, boost_b, inverse_b, 4, block_size, codes); break;
            }
            continue;
        }
        float *y = w->log_x;
        for (int64_t i = 0; i < block_size; i += 8) {
            const f8 yi = (load8(xb + i) * boost_b) * inverse_b;
            memcpy(y + i, &yi, sizeof yi);
        }
        if (!s->stochastic) {
            count_below(w->search, y, block_size, 0, w->codes);
        } else {
            count_below(w->search, y, block_size, 1, w->counts);
            for (int64_t i = 0; i < block_size; i += 8) { /* up from level low with p = frac */
                const i8 low = load8i(w->counts + i);
                const f8 low_level = levels_at8(s, &levels, low);
                const f8 gap = levels_at8(s, &levels, low + 1) - low_level;
                f8 frac = (load8(y + i) - low_level) / select8(gap > 0.0f, gap, splat8(1.0f));
                frac = select8(frac < 0.0f, splat8(0.0f), select8(frac > 1.0f, splat8(1.0f), frac));
                store8i(w->codes + i, low - (noise8(s->key, start + i) < frac));
            }
        }
        pack_block(w->codes, s->bits, block_size, codes);
    }
}

#define QUANTILE_BISECTION_STEPS 8

/* +inf (an overflowed square) as the largest float32, as quantize_log clamps; NaN stays NaN */
static inline f8 saturate8(f8 v) { return min8(splat8(FLT_MAX), v); }

/* slimtrain.quant.blockwise.quantize_log of blocks first .. first + count - 1, x holding their
 * count * block_size values (zeros past numel); one block per lane for the per-block scalars */

static void encode_log_group(const state_t *s, int64_t first, int count, int64_t block_size,
                             int64_t numel, const float *x, const scratch_t *w) {
    float *log_x = w->log_x;
    f8 rank = splat8(1.0f);
    /* each block's lanes of its max, max log2, smallest positive value and count of zeros; past
     * count, lanes that reduce to 0, 0, +inf and 0 */
    f8 tops[GROUP], highs[GROUP], smalls[GROUP], zero_counts[GROUP];
    for (int b = 0; b < GROUP; ++b) zero_counts[b] = splat8(0.0f);
    for (int b = count; b < GROUP; ++b) {
        tops[b] = highs[b] = splat8(0.0f);
        smalls[b] = splat8(INFINITY);
    }
    int normal[GROUP]; /* whether every value of the block is a positive normal float */
    for (int b = 0; b < count; ++b) {
        const float *xb = x + b * block_size;
        float *lb = log_x + b * block_size;
        /* the block's smallest and largest bits: for positive floats, its smallest and largest values */
        i8 lane_low = (i8)load8(xb), lane_top_bits = lane_low;
        for (int64_t i = 8; i < block_size; i += 8) {
            const i8 bits = (i8)load8(xb + i);
            lane_low = min8i(bits, lane_low);
            lane_top_bits = max8i(bits, lane_top_bits);
        }
        normal[b] = all_normal8(lane_low) && all_normal8(lane_top_bits);
        f8 lane_high = splat8(-INFINITY);
        if (normal[b]) { /* the common case: no zero, subnormal, infinity or NaN to handle */
            for (int64_t i = 0; i < block_size; i += 8) {
                const f8 l = log2_normal8((i8)load8(xb + i));
                memcpy(lb + i, &l, sizeof l);
                lane_high = max8(l, lane_high);
            }
            tops[b] = (f8)lane_top_bits;
            smalls[b] = (f8)lane_low;
        } else {
            f8 lane_top = splat8(0.0f), lane_small = splat8(INFINITY);
            i8 lane_zeros = {0};
            for (int64_t i = 0; i < block_size; i += 8) {
                const f8 v = saturate8(load8(xb + i)), l = log2_8(v);
                memcpy(lb + i, &l, sizeof l);
                lane_top = max8(v, lane_top); /* NaN lanes of v (and l) drop out */
                lane_high = max8(l, lane_high);
                lane_small = select8(v > 0.0f, min8(v, lane_small), lane_small);
                lane_zeros -= v == 0.0f;
            }
            tops[b] = lane_top;
            smalls[b] = lane_small;
            zero_counts[b] = (f8)lane_zeros;
        }
        highs[b] = lane_high;
        const int64_t valid = valid_in(numel, first + b, block_size);
        const float r = ceilf(s->quantile * (float)valid);
        rank[b] = (r < 1.0f ? 1.0f : r) + (float)(block_size - valid);
    }
    const f8 top = reduce_each8(tops, MAXIMUM), smallest = reduce_each8(smalls, MINIMUM);
    const f8 zeros = __builtin_convertvector((i8)reduce_each8(zero_counts, SUM_INTS), f8);
    f8 high = reduce_each8(highs, MAXIMUM);
    const i8 has_positive = smallest != INFINITY;
    f8 low = select8(has_positive, log2_8(smallest), high);
    for (int k = 0; k < QUANTILE_BISECTION_STEPS; ++k) {
        const f8 middle = (low + high) / 2.0f;
        f8 lane_counts[GROUP] = {{0}}; /* int32 lanes of each block; 0 past count */
        for (int b = 0; b < count; ++b) {
            const float *lb = log_x + b * block_size;
            const f8 threshold = splat8(middle[b]);
            i8 lane_count = {0};
            for (int64_t i = 0; i < block_size; i += 8) lane_count -= load8(lb + i) <= threshold;
            lane_counts[b] = (f8)lane_count;
        }
        const f8 below = __builtin_convertvector((i8)reduce_each8(lane_counts, SUM_INTS), f8);
        const i8 enough = below >= rank;
        high = select8(enough, middle, high);
        low = select8(enough, low, middle);
    }
    f8 snaps[GROUP]; /* each block's lanes of its largest element not above 2^high */
    for (int b = 0; b < GROUP; ++b) snaps[b] = splat8(0.0f);
    for (int b = 0; b < count; ++b) {
        const float *xb = x + b * block_size, *lb = log_x + b * block_size;
        const f8 threshold = splat8(high[b]);
        for (int64_t i = 0; i < block_size; i += 8)
            snaps[b] = max8(select8(load8(lb + i) <= threshold, saturate8(load8(xb + i)), splat8(0.0f)),
                            snaps[b]);
    }
    const f8 snapped = reduce_each8(snaps, MAXIMUM);
    const f8 bottom = select8(zeros >= rank, select8(has_positive, smallest, splat8(0.0f)), snapped);
    const int last = (1 << s->bits) - 1;
    f8 log_top;
    const f8 step = log_map8(top, bottom, last, &log_top);
    const f8 levels_per_octave = select8(step > 0.0f, 1.0f / step, splat8(0.0f));
    for (int b = 0; b < count; ++b) {
        const int64_t start = (first + b) * block_size;
        const float *xb = x + b * block_size, *lb = log_x + b * block_size;
        const f8 lt = splat8(log_top[b]), lpo = splat8(levels_per_octave[b]);
        u8v counter = noise_counter8(s->key, start);
        for (int64_t i = 0; i < block_size; i += 8, counter += 8) {
            const f8 l = load8(lb + i);
            const f8 exponent = (lt - (normal[b] ? l : select8(load8(xb + i) < TINY, splat8(-126.0f), l))) * lpo;
            const f8 offset = s->stochastic ? noise_of_bits8(noise_bits_at8(counter)) : splat8(0.5f);
            /* clamped to [0, last]; a NaN (from a NaN moment) becomes 0, as in a uint8 conversion */
            const f8 code = min8(max8(floor8(exponent + offset), splat8(0.0f)), splat8((float)last));
            store8i(w->codes + i, __builtin_convertvector(code, i8));
        }
        pack_block(w->codes, s->bits, block_size, s->codes + start * s->bits / 8);
        s->scales[2 * (first + b)] = top[b];
        s->scales[2 * (first + b) + 1] = bottom[b];
    }
}

/* encode blocks first .. first + count - 1 (count <= GROUP) of state s from x (count * block_size
 * floats, zeros past numel) */
static void encode_group(const state_t *s, int64_t first, int count, int64_t block_size,
                         int64_t numel, const float *x, const scratch_t *w) {
    if (s->kind == KIND_CODEBOOK) {
        encode_codebook_group(s, first, count, block_size, x, w);
    } else {
        encode_log_group(s, first, count, block_size, numel, x, w);
    }
}

/* decode (encode) blocks first .. first + count - 1 of a quantized state, any count, group by
 * group; a float32 state is updated in place (see state_floats), so there is nothing to do */
static void decode_blocks(const state_t *s, int64_t first, int64_t count, int64_t block_size,
                          float *out) {
    if (s->kind == KIND_FLOAT) return;
    for (int64_t b = 0; b < count; b += GROUP)
        decode_group(s, first + b, count - b < GROUP ? (int)(count - b) : GROUP, block_size,
                     out + b * block_size);
}

static void encode_blocks(const state_t *s, int64_t first, int64_t count, int64_t block_size,
                          int64_t numel, float *x, const scratch_t *w) {
    if (s->kind == KIND_FLOAT) return;
    for (int64_t i = numel - first * block_size; i < count * block_size; ++i) x[i] = 0.0f; /* padding */
    for (int64_t b = 0; b < count; b += GROUP)
        encode_group(s, first + b, count - b < GROUP ? (int)(count - b) : GROUP, block_size, numel,
                     x + b * block_size, w);
}

/* ---------------------------------------------------------------- quantized weights */
enum { WEIGHT_FLOAT8 = 0, WEIGHT_INT8 = 1, WEIGHT_INT4 = 2 };

typedef struct {
    int64_t rows, cols;     /* the weight's shape */
    int64_t group;          /* elements per scale: cols (row scales), or a group dividing cols */
    int32_t format;         /* WEIGHT_*; int4 codes are value + 8, two per byte, cols % 8 == 0 */
    int32_t mantissa_bits;  /* float8: 3 (E4M3) or 2 (E5M2) */
    int32_t exponent_bias;  /* float8: 7 or 15 */
    float max;              /* largest code magnitude: 448, 57344, 127 or 7 */
    int32_t stochastic;     /* stochastic rounding (else nearest) */
    uint32_t key;           /* mix32(seed) of the rounding noise, indexed by flat element */
    int32_t eco;            /* feed the rounding error back into m (ECO), else drop it */
    float eco_scale;        /* ECO's factor: (1 - beta1^t) / lr * (1 - 1/beta1) [* decay] */
    uint8_t *codes;         /* the codes, row-major */
    float *scales;          /* (rows * cols / group,) absmax / max */
} weight_t;

/* The layout as loop-invariant locals (the struct's fields would be reloaded after every store
 * of a code byte, which may alias them, and block vectorizing). */
typedef struct {
    int32_t format, mantissa_bits, exponent_bias;
    float max, smallest_normal, subnormal_units, unbias;
} weight_layout_t;

static inline __attribute__((always_inline)) weight_layout_t layout_of(const weight_t *f) {
    weight_layout_t l = {f->format, f->mantissa_bits, f->exponent_bias, f->max,
                         power_of_two(1 - f->exponent_bias),
                         power_of_two(f->exponent_bias - 1 + f->mantissa_bits),
                         power_of_two(127 - f->exponent_bias)};
    return l;
}

/* float8 E4M3 (the default weight format): the steps get a copy with its layout's constants */
static const weight_t E4M3 = {.format = WEIGHT_FLOAT8, .mantissa_bits = 3, .exponent_bias = 7, .max = 448.0f};
static inline int is_e4m3(const weight_t *f) {
    return f->format == E4M3.format && f->mantissa_bits == E4M3.mantissa_bits &&
           f->exponent_bias == E4M3.exponent_bias && f->max == E4M3.max;
}

/* the values of 8 float8 codes, exactly as torch decodes every finite code: the code's exponent
 * and mantissa bits placed in a float32 (a float32 subnormal where the float8 is subnormal) and
 * rescaled by 2^(127 - bias). Codes above the largest finite value decode beyond max. */
static inline f8 float8_decode8(i8 codes, weight_layout_t l) {
    const i8 bits = ((codes & 0x7F) << (23 - l.mantissa_bits)) | ((codes & 0x80) << 24);
    return (f8)bits * l.unbias;
}

/* nearest float8 codes of |y| <= max, ties to even (as torch converts) */
static inline i8 float8_nearest8(f8 y, weight_layout_t l) {
    const i8 sign = ((i8)y >> 24) & 0x80;
    const f8 a = (f8)((i8)y & 0x7FFFFFFF);
    f8 units = a * l.subnormal_units; /* multiples of the smallest subnormal, to nearest even */
#if defined(__AVX__)
    units = (f8)_mm256_round_ps((__m256)units, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    for (int j = 0; j < 8; ++j) units[j] = nearbyintf(units[j]);
#endif
    const int shift = 23 - l.mantissa_bits;
    u8v b = (u8v)a;
    b += ((1u << shift) >> 1) - 1 + ((b >> shift) & 1); /* round to nearest, ties to even */
    const i8 normal = (i8)(b >> shift) - ((127 - l.exponent_bias) << l.mantissa_bits);
    const i8 subnormal = __builtin_convertvector(units, i8);
    return sign | (i8)select8(a < l.smallest_normal, (f8)subnormal, (f8)normal);
}

/* slimtrain.quant.formats._float8_stochastic for 8 values |y| <= max and their noise in [0, 1),
 * in float arithmetic as the eager code (float8 subnormals included) */
static inline i8 float8_stochastic_general8(f8 y, f8 noise, weight_layout_t l) {
    const i8 nearest = float8_nearest8(y, l);
    const f8 near = float8_decode8(nearest, l);
    const i8 magnitude = nearest & 0x7F, sign = nearest & 0x80;
    const f8 abs_near = (f8)((i8)near & 0x7FFFFFFF), abs_y = (f8)((i8)y & 0x7FFFFFFF);
    const i8 away = (abs_near < abs_y) | (near == 0.0f); /* the other neighbour is farther from 0 */
    i8 other_magnitude = magnitude + (away & 2) - 1;
    other_magnitude = (i8)select8(other_magnitude < 0, (f8)(i8){0}, (f8)other_magnitude);
    other_magnitude = (i8)select8(other_magnitude > 0x7F, (f8)((i8){0} + 0x7F), (f8)other_magnitude);
    i8 other_code = other_magnitude | sign;
    f8 other = float8_decode8(other_code, l);
    const i8 usable = (f8)((i8)other & 0x7FFFFFFF) <= l.max; /* finite and in range */
    other_code = (i8)select8(usable, (f8)other_code, (f8)nearest);
    other = select8(usable, other, near);
    /* neighbouring float8 values are a power of two apart, so distance / gap is distance times
     * 1 / gap, whose exponent bits are 254 minus gap's: the same bits as the division */
    const f8 gap = (f8)((i8)(other - near) & 0x7FFFFFFF);
    const f8 distance = (f8)((i8)(y - near) & 0x7FFFFFFF);
    const f8 p_other = select8(gap > 0.0f, distance * (f8)(0x7F000000 - (i8)gap), splat8(0.0f));
    return (i8)select8(noise < p_other, (f8)other_code, (f8)nearest);
}

/* float8_stochastic_general8 in integers, the same bits, where every |y| is a normal float8 (else
 * the general path). Between the codes below and above |y| (`lower`, a truncation of its bits,
 * and lower + 1) y sits at d / 2^shift of the gap, exactly; the nearest is lower + 1 where
 * d + (lower & 1) > 2^(shift - 1) (ties to even). The noise is k / 2^24 (k: noise_bits), and
 * j = k >> (24 - shift) in [0, 2^shift). The general path rounds from the nearest code to the
 * other one when noise < the distance to the nearest over the gap: with nearest = lower that is
 * k < d * 2^(24 - shift), i.e. j < d, so it takes lower + 1 where j < d; with nearest = lower + 1
 * it keeps it where k >= (2^shift - d) * 2^(24 - shift), i.e. (2^shift - 1 - j) < d, and
 * 2^shift - 1 - j = j ^ (2^shift - 1). */
static inline i8 float8_stochastic8(f8 y, i8 noise_bits, weight_layout_t l) {
    const f8 a = (f8)((i8)y & 0x7FFFFFFF);
    if (any8(a < l.smallest_normal)) return float8_stochastic_general8(y, noise_of_bits8(noise_bits), l);
    const int shift = 23 - l.mantissa_bits;
    const i8 bits = (i8)a, sign = ((i8)y >> 24) & 0x80;
    const i8 d = bits & ((1 << shift) - 1);
    const i8 lower = (bits >> shift) - ((127 - l.exponent_bias) << l.mantissa_bits);
    const i8 nearest_up = (d + (lower & 1)) > (1 << (shift - 1));
    const i8 j = noise_bits >> (24 - shift);
    const i8 up = (j ^ (nearest_up & ((1 << shift) - 1))) < d; /* -1 where lower + 1 is taken */
    return sign | (lower - up);
}

/* codes of `count` float32 values |y| <= max rounded stochastically to float8 as the weight step
 * rounds them, with noise in [0, 1) (multiples of 2^-24): lets tests reach exact ties */
void float8_stochastic_codes(int64_t count, const float *y, const float *noise, int32_t mantissa_bits,
                             int32_t exponent_bias, float max, uint8_t *codes) {
    const weight_t f = {.mantissa_bits = mantissa_bits, .exponent_bias = exponent_bias, .max = max};
    const weight_layout_t l = layout_of(&f);
    FOR_PARTS(count, {
        const i8 noise_bits = __builtin_convertvector(load_part(noise + i, n) * 16777216.0f, i8);
        store_codes(codes + i, float8_stochastic8(load_part(y + i, n), noise_bits, l), n);
    })
}

/* n <= 8 codes of a weight from element `at` of `codes`, as their unscaled values (int4: n == 8,
 * `at` a multiple of 8) */
static inline f8 weight_decode8(const uint8_t *codes, int64_t at, int64_t n, weight_layout_t l) {
    if (l.format == WEIGHT_FLOAT8) return float8_decode8(load_codes(codes + at, n), l);
    if (l.format == WEIGHT_INT8) return __builtin_convertvector((load_codes(codes + at, n) ^ 0x80) - 0x80, f8);
    return __builtin_convertvector(unpack8(codes + at / 2, 4) - 8, f8);
}

/* y in [-top, top] (top > 0), NaN kept: the second operand of min/max wins on NaN and ties */
static inline f8 clamp8(f8 y, f8 top) { return max8(-top, min8(top, y)); }

/* Round n <= 8 scaled values y (|y| <= max up to the division's rounding) to codes stored from
 * element `at`, as slimtrain.quant.formats.quantize_weight does; returns the codes' unscaled
 * values. `noise_bits`: the stochastic-rounding noise of these elements (noise_bits_at8), or NULL for
 * nearest. */
static inline f8 weight_encode8(f8 y, const i8 *noise_bits, uint8_t *codes, int64_t at, int64_t n,
                                weight_layout_t l) {
    const f8 top = splat8(l.max);
    if (l.format == WEIGHT_FLOAT8) {
        y = clamp8(y, top);
        const i8 code = noise_bits ? float8_stochastic8(y, *noise_bits, l) : float8_nearest8(y, l);
        store_codes(codes + at, code, n);
        return float8_decode8(code, l);
    }
    /* rounding.round_stochastic, then clamp */
    f8 r = floor8(y + (noise_bits ? noise_of_bits8(*noise_bits) : splat8(0.5f)));
    r = clamp8(r, top);
    const i8 value = __builtin_convertvector(r, i8);
    if (l.format == WEIGHT_INT8) store_codes(codes + at, value & 0xFF, n);
    else pack8(value + 8, 4, codes + at / 2);
    return r;
}

/* ------------------------------------------------------------------------- workspaces */
/* What one kernel call allocates: `floats` floats for the caller, then the scratch of m and v
 * (shared buffers; each codebook state's search prepared). */
typedef struct { float *floats; int32_t *ints; search_t *searches; scratch_t m, v; } workspace_t;

/* scratch: shared, with s's search prepared in *search if s is a codebook state; 0, or 1 (see
 * prepare_search) */
static int scratch_for(const state_t *s, scratch_t shared, search_t *search, scratch_t *scratch) {
    *scratch = shared;
    if (s->kind != KIND_CODEBOOK) return 0;
    scratch->search = search;
    return s->stochastic ? prepare_search(s->levels + 1, (1 << s->bits) - 2, search)
                         : prepare_search(s->mids, (1 << s->bits) - 1, search);
}

static void close_workspace(workspace_t *w) {
    free(w->floats);
    free(w->ints);
    free(w->searches);
}

/* 0; 2 when memory runs out; 3 when a codebook's levels cannot be searched (see prepare_search) */
static int open_workspace(workspace_t *w, int64_t floats, int64_t block_size, const state_t *m,
                          const state_t *v /* NULL: one state */) {
    w->floats = malloc((size_t)(floats + GROUP * block_size) * sizeof(float));
    w->ints = malloc((size_t)(2 * block_size) * sizeof(int32_t));
    w->searches = malloc(2 * sizeof(search_t));
    if (!w->floats || !w->ints || !w->searches) {
        close_workspace(w);
        return 2;
    }
    const scratch_t shared = {w->floats + floats, w->ints, w->ints + block_size, NULL};
    int failed = scratch_for(m, shared, w->searches, &w->m);
    if (v) failed |= scratch_for(v, shared, w->searches + 1, &w->v);
    else w->v = shared;
    if (failed) close_workspace(w);
    return failed ? 3 : 0;
}

/* Where a state's values for the elements from `start` are updated: a float32 state's own values
 * (in place), else the buffer its blocks are decoded into and encoded from */
static float *state_floats(const state_t *s, int64_t start, float *buffer) {
    return s->kind == KIND_FLOAT ? s->values + start : buffer;
}

/* ------------------------------------------------------------------------------ the step */
typedef struct {
    float w, beta2, one_minus_beta2, inverse_correction, eps, decay, neg_step_size;
    int maximize;
} update_constants_t;

static update_constants_t constants_of(const adamw_scalars_t *c) {
    update_constants_t k = {c->lerp_weight, c->beta2, c->one_minus_beta2,
                            c->inverse_bias_correction2_sqrt, c->eps, c->decay, c->neg_step_size,
                            c->maximize};
    return k;
}

/* the AdamW rule of slimtrain.optim.functional.adamw_update_(reproducible=True) on n <= 8
 * elements: the parameter's values p in, its new values out; m and v (and the denominators, unless
 * NULL) read and written at their pointers */
static inline __attribute__((always_inline)) f8 adamw_update8(f8 p, const float *grad, float *m,
                                                              float *v, int64_t n, update_constants_t k,
                                                              float *denominators) {
    f8 g = load_part(grad, n);
    g = k.maximize ? -g : g;
    f8 mi = load_part(m, n);
    mi = mi + (g - mi) * k.w;
    f8 vi = load_part(v, n) * k.beta2;
    vi = vi + k.one_minus_beta2 * g * g;
#if defined(__AVX__)
    const f8 root = (f8)_mm256_sqrt_ps((__m256)vi);
#else
    f8 root;
    for (int j = 0; j < 8; ++j) root[j] = sqrtf(vi[j]);
#endif
    const f8 denom = root * k.inverse_correction + k.eps;
    store_part(m, mi, n);
    store_part(v, vi, n);
    if (denominators) store_part(denominators, denom, n);
    return p * k.decay + k.neg_step_size * mi / denom;
}

/* the SGD rule of slimtrain.optim.functional.sgd_update_(reproducible=True) with a momentum buffer
 * on n <= 8 elements: the parameter's values p in, its new values out; the buffer read (unless
 * first) and written at its pointer */
static inline __attribute__((always_inline)) f8 sgd_update8(f8 p, const float *grad, float *buffer,
                                                            int64_t n, sgd_scalars_t k) {
    f8 g = load_part(grad, n);
    g = k.maximize ? -g : g;
    if (k.weight_decay != 0.0f) g = g + p * k.weight_decay;
    const f8 b = k.first ? g : load_part(buffer, n) * k.momentum + g * k.one_minus_dampening;
    store_part(buffer, b, n);
    return p + (k.nesterov ? g + b * k.momentum : b) * k.neg_lr;
}

enum { RULE_ADAMW = 0, RULE_SGD = 1 };

/* whether the first state's blocks are read: all but SGD's buffer on its first step (it becomes the
 * gradient) */
static inline int reads_m(int rule, const sgd_scalars_t *sgd) { return rule != RULE_SGD || !sgd->first; }

/* The step of blocks first_block .. last_block - 1 of a float32 parameter (numel elements) under
 * `rule`, group by group: decode the states, update, encode. m is AdamW's first moment or SGD's
 * momentum buffer; v AdamW's second moment, NULL for SGD. */
static inline __attribute__((always_inline)) int step_blocks(
    int rule, int64_t numel, int64_t block_size, int64_t first_block, int64_t last_block, float *param,
    const float *grad, const state_t *m, const state_t *v, const adamw_scalars_t *adamw,
    const sgd_scalars_t *sgd) {
    if (block_size <= 0 || block_size % 8 || block_size > 65536) return 1;
    const int64_t span = GROUP * block_size;
    workspace_t w;
    const int opened = open_workspace(&w, 2 * span, block_size, m, v);
    if (opened) return opened;
    float *m_buf = w.floats, *v_buf = w.floats + span;
    const update_constants_t k = rule == RULE_ADAMW ? constants_of(adamw) : (update_constants_t){0};
    const sgd_scalars_t ks = rule == RULE_SGD ? *sgd : (sgd_scalars_t){0};
    for (int64_t first = first_block; first < last_block; first += GROUP) {
        const int count = last_block - first < GROUP ? (int)(last_block - first) : GROUP;
        const int64_t start = first * block_size;
        const int64_t valid = numel - start < count * block_size ? numel - start : count * block_size;
        float *m_values = state_floats(m, start, m_buf), *v_values = v ? state_floats(v, start, v_buf) : NULL;
        if (reads_m(rule, sgd)) decode_blocks(m, first, count, block_size, m_values);
        if (v) decode_blocks(v, first, count, block_size, v_values);
        float *p = param + start;
        FOR_PARTS(valid, {
            const f8 updated = rule == RULE_ADAMW
                ? adamw_update8(load_part(p + i, n), grad + start + i, m_values + i, v_values + i, n, k, NULL)
                : sgd_update8(load_part(p + i, n), grad + start + i, m_values + i, n, ks);
            store_part(p + i, updated, n);
        })
        encode_blocks(m, first, count, block_size, numel, m_values, &w.m);
        if (v) encode_blocks(v, first, count, block_size, numel, v_values, &w.v);
    }
    close_workspace(&w);
    return 0;
}

/* The exported steps split units first .. last - 1 evenly among their argument `threads` (at
 * least 1) of OpenMP threads (torch's own pool where torch's libgomp is loaded, whose workers still
 * spin after torch's last parallel op; one after another where the library was built without
 * OpenMP) and return the largest status of the parts. STEP(from, to, block_size) steps one part;
 * the default block size of 128 gets its own copy of the step, with constant trip counts. */
#define SPLIT_ACROSS_THREADS(first, last, block_size, STEP) do { \
    int status = 0; \
    const int parts = threads > 1 ? threads : 1; \
    _Pragma("omp parallel for num_threads(parts) schedule(static, 1) reduction(max: status)") \
    for (int t = 0; t < parts; ++t) { \
        const int64_t from = first + (last - first) * t / parts; \
        const int64_t to = first + (last - first) * (t + 1) / parts; \
        const int part = block_size == 128 ? STEP(from, to, 128) : STEP(from, to, block_size); \
        status = part > status ? part : status; \
    } \
    return status; \
} while (0)

int adamw_step_blocks(int threads, int64_t numel, int64_t block_size, int64_t first_block,
                      int64_t last_block, float *param, const float *grad, const state_t *m,
                      const state_t *v, const adamw_scalars_t *c) {
#define ADAMW_BLOCKS(FROM, TO, SIZE) step_blocks(RULE_ADAMW, numel, SIZE, FROM, TO, param, grad, m, v, c, NULL)
    SPLIT_ACROSS_THREADS(first_block, last_block, block_size, ADAMW_BLOCKS);
}

/* the same step under SGD with a momentum buffer */
int sgd_step_blocks(int threads, int64_t numel, int64_t block_size, int64_t first_block,
                    int64_t last_block, float *param, const float *grad, const state_t *buffer,
                    const sgd_scalars_t *c) {
#define SGD_BLOCKS(FROM, TO, SIZE) step_blocks(RULE_SGD, numel, SIZE, FROM, TO, param, grad, buffer, NULL, NULL, c)
    SPLIT_ACROSS_THREADS(first_block, last_block, block_size, SGD_BLOCKS);
}

/* The step of a (rows, cols) quantized weight (float8, int8 or int4 codes; a scale per row or per
 * group of a row), in units of rows_per_unit rows (a whole number of rows and of state blocks:
 * lcm(cols, block_size) elements, the last unit possibly shorter). Each row is decoded, updated,
 * re-quantized with the new absmax of each scale's elements (the rounding error fed back into m
 * under ECO) and the unit's state blocks encoded, as slimtrain.optim.base.step_chunk_ does for
 * the whole weight, under `rule` (m and v as for step_blocks); e4m3: f is float8 E4M3 (is_e4m3),
 * whose layout is then a constant. */
static inline __attribute__((always_inline)) int step_weight_rows(
    int rule, int e4m3, int64_t rows_per_unit, int64_t block_size, int64_t first_unit, int64_t last_unit,
    const weight_t *f, const float *grad, const state_t *m, const state_t *v,
    const adamw_scalars_t *adamw, const sgd_scalars_t *sgd) {
    const weight_layout_t l = layout_of(e4m3 ? &E4M3 : f);
    const int64_t cols = f->cols, unit = rows_per_unit * cols, group = f->group;
    if (block_size <= 0 || block_size % 8 || block_size > 65536 || unit % block_size) return 1;
    if (group <= 0 || cols % group || (f->format == WEIGHT_INT4 && group % 8)) return 1;
    workspace_t w;
    const int opened = open_workspace(&w, 3 * unit + cols, block_size, m, v);
    if (opened) return opened;
    float *w_all = w.floats, *m_all = w.floats + unit, *v_all = w.floats + 2 * unit;
    float *denominators = w.floats + 3 * unit;
    const int64_t numel = f->rows * cols, groups_per_row = cols / group;
    const update_constants_t k = rule == RULE_ADAMW ? constants_of(adamw) : (update_constants_t){0};
    const sgd_scalars_t ks = rule == RULE_SGD ? *sgd : (sgd_scalars_t){0};
    const int eco = f->eco, stochastic = f->stochastic;
    const float eco_scale = f->eco_scale;
    const uint32_t key = f->key;
    uint8_t *const codes = f->codes;
    for (int64_t u = first_unit; u < last_unit; ++u) {
        const int64_t first_row = u * rows_per_unit, start = first_row * cols;
        const int64_t row_count = f->rows - first_row < rows_per_unit ? f->rows - first_row : rows_per_unit;
        const int64_t count = row_count * cols, first_block = start / block_size;
        const int64_t blocks = (count + block_size - 1) / block_size;
        float *m_values = state_floats(m, start, m_all), *v_values = v ? state_floats(v, start, v_all) : NULL;
        if (reads_m(rule, sgd)) decode_blocks(m, first_block, blocks, block_size, m_values);
        if (v) decode_blocks(v, first_block, blocks, block_size, v_values);
        for (int64_t r = 0; r < row_count; ++r) {
            const int64_t row = first_row + r;
            float *w_row = w_all + r * cols, *m_row = m_values + r * cols, *v_row = v ? v_values + r * cols : NULL;
            float *scales = f->scales + row * groups_per_row;
            for (int64_t g = 0; g < groups_per_row; ++g) { /* decode, update, quantize_weight */
                const int64_t at = row * cols + g * group, off = g * group;
                const f8 scale = splat8(scales[g]);
                float *values = w_row + off, *m_part = m_row + off, *d_part = denominators + off;
                f8 lane_max = splat8(0.0f); /* of |new values|; lanes past n hold 0 */
                FOR_PARTS(group, {
                    const f8 decoded = weight_decode8(codes, at + i, n, l) * scale;
                    const f8 updated = rule == RULE_ADAMW
                        ? adamw_update8(decoded, grad + at + i, m_part + i, v_row + off + i, n, k,
                                        eco ? d_part + i : NULL)
                        : sgd_update8(decoded, grad + at + i, m_part + i, n, ks);
                    store_part(values + i, updated, n);
                    lane_max = max8((f8)((i8)updated & (i8)(LANE < (uint32_t)n) & 0x7FFFFFFF), lane_max);
                })
                const float absmax = lanes_max(lane_max, 0.0f), new_scale = absmax / l.max;
                const f8 divisor = splat8(new_scale > 0.0f ? new_scale : 1.0f);
                u8v counter = noise_counter8(key, at);
                FOR_PARTS(group, {
                    const f8 x = load_part(values + i, n);
                    const i8 noise = stochastic ? noise_bits_at8(counter) : (i8){0};
                    counter += 8;
                    const f8 stored = weight_encode8(x / divisor, stochastic ? &noise : NULL, codes, at + i, n, l);
                    if (eco) { /* AdamW: m += (eco_scale * denominator) * e, SGD: m += e * eco_scale */
                        const f8 error = x - stored * new_scale;
                        const f8 m_old = load_part(m_part + i, n);
                        store_part(m_part + i, rule == RULE_ADAMW ? m_old + eco_scale * load_part(d_part + i, n) * error
                                                                  : m_old + error * eco_scale, n);
                    }
                })
                scales[g] = new_scale;
            }
        }
        encode_blocks(m, first_block, blocks, block_size, numel, m_values, &w.m);
        if (v) encode_blocks(v, first_block, blocks, block_size, numel, v_values, &w.v);
    }
    close_workspace(&w);
    return 0;
}

int adamw_step_weight_rows(int threads, int64_t rows_per_unit, int64_t block_size, int64_t first_unit,
                           int64_t last_unit, const weight_t *f, const float *grad,
                           const state_t *m, const state_t *v, const adamw_scalars_t *c) {
#define ADAMW_ROWS(FROM, TO, SIZE) (is_e4m3(f) \
    ? step_weight_rows(RULE_ADAMW, 1, rows_per_unit, SIZE, FROM, TO, f, grad, m, v, c, NULL) \
    : step_weight_rows(RULE_ADAMW, 0, rows_per_unit, SIZE, FROM, TO, f, grad, m, v, c, NULL))
    SPLIT_ACROSS_THREADS(first_unit, last_unit, block_size, ADAMW_ROWS);
}

/* the same step under SGD with a momentum buffer (ECO: buffer += error * eco_scale) */
int sgd_step_weight_rows(int threads, int64_t rows_per_unit, int64_t block_size, int64_t first_unit,
                         int64_t last_unit, const weight_t *f, const float *grad,
                         const state_t *buffer, const sgd_scalars_t *c) {
#define SGD_ROWS(FROM, TO, SIZE) (is_e4m3(f) \
    ? step_weight_rows(RULE_SGD, 1, rows_per_unit, SIZE, FROM, TO, f, grad, buffer, NULL, NULL, c) \
    : step_weight_rows(RULE_SGD, 0, rows_per_unit, SIZE, FROM, TO, f, grad, buffer, NULL, NULL, c))
    SPLIT_ACROSS_THREADS(first_unit, last_unit, block_size, SGD_ROWS);
}
