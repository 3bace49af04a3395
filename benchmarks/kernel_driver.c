/* The CPU kernel's AdamW step on its own, for profiling without Python (`perf record`,
 * `valgrind --tool=callgrind`): one float32 parameter of 2^LOGN elements (default 2^20, resident
 * in L3) with m in M_BITS-bit dynamic-exponent codes (2 to 8, default 4; or float32) and v on
 * V_BITS-bit logarithmic levels (2 to 8, default 2; or float32), THREADS threads (default 1);
 * prints the best and mean ns per parameter over REPS steps and a hash of the result (the same
 * hash: the same bits). The kernel is called as Python calls it, through a pointer, so that the
 * compiler specializes it on nothing this driver knows.
 *
 *   gcc -O3 -ffp-contract=off -fno-math-errno -fno-trapping-math -std=c11 -march=native -fopenmp \
 *       benchmarks/kernel_driver.c -o /tmp/kernel_driver -lm
 *   [LOGN=20] [FP8=0|1] [M_STOCHASTIC=0|1] [THREADS=1] taskset -c 1 /tmp/kernel_driver [REPS=300] [M_BITS=2..8|32] [V_BITS=2..8|32] [V_STOCHASTIC=1|0]
 *
 * FP8=1 steps a float8 E4M3 weight (row scales, ECO, stochastic rounding) instead; M_STOCHASTIC=1
 * rounds m stochastically.
 */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <time.h>

#include "../src/slimtrain/optim/kernels/adamw_cpu.c"

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static uint32_t random_state = 12345;
static float uniform(void) { /* in [-1, 1) */
    random_state = random_state * 1664525u + 1013904223u;
    return (float)(random_state >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

/* the kernel's entry points through pointers the compiler cannot see through, as Python calls the
 * shared library: none of this driver's constants (the block size, the states' fields) are
 * propagated into the kernel */
static int (*volatile step_blocks_entry)(int, int64_t, int64_t, int64_t, int64_t, float *, const float *,
                                         const state_t *, const state_t *, const adamw_scalars_t *) =
    adamw_step_blocks;
static int (*volatile step_weight_rows_entry)(int, int64_t, int64_t, int64_t, int64_t, const weight_t *,
                                              const float *, const state_t *, const state_t *,
                                              const adamw_scalars_t *) = adamw_step_weight_rows;

int main(int argc, char **argv) {
    const int64_t n = (int64_t)1 << (getenv("LOGN") ? atoi(getenv("LOGN")) : 20), block = 128;
    const int64_t blocks = n / block;
    const int reps = argc > 1 ? atoi(argv[1]) : 300;
    const int m_bits = argc > 2 ? atoi(argv[2]) : 4, v_bits = argc > 3 ? atoi(argv[3]) : 2;
    const int v_stochastic = argc > 4 ? atoi(argv[4]) : 1;
    /* slimtrain.quant.codebook("dynamic", M_BITS, True) (same double arithmetic, then float32,
     * sorted) and its midpoints */
    const int codebook_bits = m_bits == 32 ? 4 : m_bits, levels_n = 1 << codebook_bits;
    float *levels = malloc((size_t)levels_n * 4), *mids = malloc((size_t)levels_n * 4);
    int filled = 0;
    for (int i = 0; i < codebook_bits - 1; ++i) {
        const int decades = codebook_bits - 1, count = 1 << i;
        const double width = 0.9 / count;
        for (int j = 0; j < count; ++j) {
            const float magnitude = (float)((0.1 + (j + 0.5) * width) * pow(10.0, i - decades + 1));
            levels[filled++] = magnitude;
            levels[filled++] = -magnitude;
        }
    }
    levels[filled++] = 0.0f;
    levels[filled++] = 1.0f;
    for (int a = 1; a < filled; ++a) /* insertion sort */
        for (int b = a; b > 0 && levels[b - 1] > levels[b]; --b) {
            const float t = levels[b];
            levels[b] = levels[b - 1];
            levels[b - 1] = t;
        }
    for (int k = 0; k + 1 < levels_n; ++k) mids[k] = (levels[k] + levels[k + 1]) / 2;
    float *param = malloc((size_t)n * 4), *grad = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; ++i) {
        param[i] = uniform();
        grad[i] = uniform() * 1e-2f;
    }
    state_t m = {0}, v = {0};
    if (m_bits == 32) {
        m = (state_t){.kind = KIND_FLOAT, .values = calloc((size_t)n, 4)};
    } else {
        m = (state_t){.kind = KIND_CODEBOOK, .bits = m_bits, .codes = calloc((size_t)n, 1), .key = 5,
                      .stochastic = getenv("M_STOCHASTIC") && atoi(getenv("M_STOCHASTIC")),
                      .scales = calloc((size_t)blocks, 4), .levels = levels, .mids = mids};
    }
    if (v_bits == 32) {
        v = (state_t){.kind = KIND_FLOAT, .values = calloc((size_t)n, 4)};
    } else {
        v = (state_t){.kind = KIND_LOG, .bits = v_bits, .stochastic = v_stochastic, .key = 99,
                      .quantile = 0.1f, .codes = calloc((size_t)n, 1), .scales = calloc((size_t)(2 * blocks), 4)};
    }
    const adamw_scalars_t scalars = {0.9999f, 0.1f, 0.999f, 0.001f, 1e-8f, 1.0f, -1e-3f, 0};
    /* FP8=1: the parameter is a (n / 1024, 1024) float8 E4M3 weight with row scales, updated
     * with ECO and stochastic rounding (random codes, NaN codes excluded, scales 1/448) */
    const int fp8 = getenv("FP8") && atoi(getenv("FP8"));
    const int threads = getenv("THREADS") ? atoi(getenv("THREADS")) : 1;
    const int64_t cols = 1024, rows = n / cols;
    weight_t weight = {.rows = rows, .cols = cols, .group = cols, .format = WEIGHT_FLOAT8,
                       .mantissa_bits = 3, .exponent_bias = 7, .max = 448.0f, .stochastic = 1,
                       .key = 7, .eco = 1, .eco_scale = -900.0f, .codes = malloc((size_t)n),
                       .scales = malloc((size_t)rows * 4)};
    for (int64_t i = 0; i < n; ++i) weight.codes[i] = (uint8_t)((int)((uniform() + 1.0f) * 127.0f) % 127);
    for (int64_t r = 0; r < rows; ++r) weight.scales[r] = 1.0f / 448.0f;
    double best = 1e9, total = 0;
    for (int r = 0; r < reps; ++r) {
        const double start = seconds();
        if (fp8) step_weight_rows_entry(threads, 1, block, 0, rows, &weight, grad, &m, &v, &scalars); /* a row per unit */
        else step_blocks_entry(threads, n, block, 0, blocks, param, grad, &m, &v, &scalars);
        const double took = seconds() - start;
        total += took;
        best = took < best ? took : best;
        for (int64_t i = 0; i < n; i += 97) grad[i] = -grad[i]; /* gradients that change */
    }
    uint32_t hash = 0;
    for (int64_t i = 0; i < n; ++i) {
        uint32_t b;
        memcpy(&b, param + i, 4);
        hash = hash * 31 + (fp8 ? weight.codes[i] : b);
    }
    printf("%sm %d bits, v %d bits (%s): best %.3f ns/param, mean %.3f; parameter hash %08x\n",
           fp8 ? "FP8 + ECO (SR), " : "", m_bits,
           v_bits, v_stochastic ? "SR" : "RTN", best * 1e9 / (double)n, total / reps * 1e9 / (double)n, hash);
    return 0;
}
