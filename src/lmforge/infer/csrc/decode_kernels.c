/* lmforge: batch-1 int8 GEMV for CPU decode (lmforge.infer.cpu_kernels builds and loads this file).

   y[n] = sx * ws[n] * sum_k q(x)[k] * w[n, k]

   x (K fp32) is quantized to 8 bits on the fly, symmetric with one scale sx = max|x| / 127 for the
   row; w (N x K int8, row-major) carries one fp32 scale per output row, ws[n]. Products of 8-bit
   values are summed exactly in int32, so the result differs from the dequantized weights' matmul
   only by the rounding of x to 8 bits (llama.cpp's q8_0 matmuls round their activations the same
   way, per block of 32 instead of per row).

   Kernels, chosen when the file is compiled (-march=native on the machine that runs it):
   - AVX512-VNNI: x + 128 as unsigned bytes times w with vpdpbusd (64 products per instruction);
     sum (x + 128) w = sum x w + 128 sum w, so the row sums wsum[n] (precomputed) are subtracted.
   - AVX2: llama.cpp's sign trick: |w| as unsigned bytes times x with w's sign, vpmaddubsw then
     vpmaddwd (pairs of 127 x 127 products cannot saturate int16).
   - anything else: no kernel (lmf_isa() returns 0 and the caller keeps its other path).

   Threads: the rows are split between the calling thread and a small pool of worker threads
   started on first use (pthreads; the pool spins ~0.2 ms for the next call, then sleeps on a
   condition variable). One call runs at a time: a call that finds the pool busy (another Python
   thread) runs on its own thread. A forked child starts without a pool. */

#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LMF_ISA 2
#elif defined(__AVX2__)
#define LMF_ISA 1
#else
#define LMF_ISA 0
#endif

int lmf_isa(void) { return LMF_ISA; }

/* x -> xq (int8 in [-127, 127]) or xq + 128 (uint8) for the VNNI kernel; returns sx */
static float quantize_row(const float *x, int K, int8_t *xq) {
    float amax = 0.f;
    for (int k = 0; k < K; k++) {
        float a = fabsf(x[k]);
        amax = a > amax ? a : amax;
    }
    float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int k = 0; k < K; k++) {
        int v = (int)lrintf(x[k] * inv);
#if LMF_ISA == 2
        ((uint8_t *)xq)[k] = (uint8_t)(v + 128);
#else
        xq[k] = (int8_t)v;
#endif
    }
    return amax / 127.f;
}

/* rows [n0, n1) */
static void gemv_rows(const int8_t *xq, float sx, int K, const int8_t *w, const float *ws, const int32_t *wsum,
                      int n0, int n1, float *y) {
    int n = n0;
#if LMF_ISA == 2
    const uint8_t *xu = (const uint8_t *)xq;
    for (; n + 4 <= n1; n += 4) {
        const int8_t *w0 = w + (int64_t)n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        int k = 0;
        for (; k + 64 <= K; k += 64) {
            __m512i xv = _mm512_loadu_si512((const void *)(xu + k));
            a0 = _mm512_dpbusd_epi32(a0, xv, _mm512_loadu_si512((const void *)(w0 + k)));
            a1 = _mm512_dpbusd_epi32(a1, xv, _mm512_loadu_si512((const void *)(w1 + k)));
            a2 = _mm512_dpbusd_epi32(a2, xv, _mm512_loadu_si512((const void *)(w2 + k)));
            a3 = _mm512_dpbusd_epi32(a3, xv, _mm512_loadu_si512((const void *)(w3 + k)));
        }
        int32_t s0 = _mm512_reduce_add_epi32(a0), s1 = _mm512_reduce_add_epi32(a1);
        int32_t s2 = _mm512_reduce_add_epi32(a2), s3 = _mm512_reduce_add_epi32(a3);
        for (; k < K; k++) {
            s0 += xu[k] * w0[k]; s1 += xu[k] * w1[k]; s2 += xu[k] * w2[k]; s3 += xu[k] * w3[k];
        }
        y[n] = sx * ws[n] * (float)(s0 - 128 * wsum[n]);
        y[n + 1] = sx * ws[n + 1] * (float)(s1 - 128 * wsum[n + 1]);
        y[n + 2] = sx * ws[n + 2] * (float)(s2 - 128 * wsum[n + 2]);
        y[n + 3] = sx * ws[n + 3] * (float)(s3 - 128 * wsum[n + 3]);
    }
    for (; n < n1; n++) {
        const int8_t *wr = w + (int64_t)n * K;
        int32_t s = 0;
        for (int k = 0; k < K; k++) s += xu[k] * wr[k];
        y[n] = sx * ws[n] * (float)(s - 128 * wsum[n]);
    }
#else
    (void)wsum;
#if LMF_ISA == 1
    const __m256i ones = _mm256_set1_epi16(1);
    for (; n + 4 <= n1; n += 4) {
        const int8_t *wr[4] = {w + (int64_t)n * K, w + (int64_t)(n + 1) * K, w + (int64_t)(n + 2) * K,
                               w + (int64_t)(n + 3) * K};
        __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                          _mm256_setzero_si256()};
        int k = 0;
        for (; k + 32 <= K; k += 32) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + k));
            for (int r = 0; r < 4; r++) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(wr[r] + k));
                __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
                acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p16, ones));
            }
        }
        for (int r = 0; r < 4; r++) {
            __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc[r]), _mm256_extracti128_si256(acc[r], 1));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
            int32_t s = _mm_cvtsi128_si32(h);
            for (int kk = k; kk < K; kk++) s += xq[kk] * wr[r][kk];
            y[n + r] = sx * ws[n + r] * (float)s;
        }
    }
#endif
    for (; n < n1; n++) {
        const int8_t *wr = w + (int64_t)n * K;
        int32_t s = 0;
        for (int k = 0; k < K; k++) s += xq[k] * wr[k];
        y[n] = sx * ws[n] * (float)s;
    }
#endif
}

/* ---- fp32 GEMV over row-major weights ---------------------------------------------------------- */

/* rows [n0, n1) of y = W x, W (N x K fp32, row-major); eight rows per load of x (eight weight
   streams in flight: ~9% more bandwidth than four on this project's machine), then four */
static void f32_rows(const float *x, int K, const float *w, int n0, int n1, float *y) {
    int n = n0;
#if defined(__AVX512F__)
    for (; n + 8 <= n1; n += 8) {
        const float *w0 = w + (int64_t)n * K;
        __m512 a[8];
        for (int r = 0; r < 8; r++) a[r] = _mm512_setzero_ps();
        int k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 xv = _mm512_loadu_ps(x + k);
            for (int r = 0; r < 8; r++) a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + (int64_t)r * K + k), xv, a[r]);
        }
        if (k < K) {
            __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
            __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
            for (int r = 0; r < 8; r++)
                a[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w0 + (int64_t)r * K + k), xv, a[r]);
        }
        for (int r = 0; r < 8; r++) y[n + r] = _mm512_reduce_add_ps(a[r]);
    }
    for (; n + 4 <= n1; n += 4) {
        const float *w0 = w + (int64_t)n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 xv = _mm512_loadu_ps(x + k);
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + k), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + k), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + k), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + k), xv, a3);
        }
        if (k < K) {
            __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
            __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
            a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w0 + k), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w1 + k), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w2 + k), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w3 + k), xv, a3);
        }
        y[n] = _mm512_reduce_add_ps(a0);
        y[n + 1] = _mm512_reduce_add_ps(a1);
        y[n + 2] = _mm512_reduce_add_ps(a2);
        y[n + 3] = _mm512_reduce_add_ps(a3);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    for (; n + 4 <= n1; n += 4) {
        const float *wr[4] = {w + (int64_t)n * K, w + (int64_t)(n + 1) * K, w + (int64_t)(n + 2) * K,
                              w + (int64_t)(n + 3) * K};
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        int k = 0;
        for (; k + 8 <= K; k += 8) {
            __m256 xv = _mm256_loadu_ps(x + k);
            for (int r = 0; r < 4; r++) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(wr[r] + k), xv, acc[r]);
        }
        for (int r = 0; r < 4; r++) {
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            float s = _mm_cvtss_f32(h);
            for (int kk = k; kk < K; kk++) s += wr[r][kk] * x[kk];
            y[n + r] = s;
        }
    }
#endif
    for (; n < n1; n++) {
        const float *wr = w + (int64_t)n * K;
        float s = 0.f;
        for (int k = 0; k < K; k++) s += wr[k] * x[k];
        y[n] = s;
    }
}

/* a dot product of two fp32 vectors (attention scores) and y += a x (attention values) */
static float dotf(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    s = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    s = _mm_cvtss_f32(h);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static void axpyf(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

/* ---- the worker pool ------------------------------------------------------------------------- */

#define MAX_THREADS 64
#define SPIN_NS 200000L
#define MIN_PART_BYTES (128 * 1024)

typedef void (*part_fn)(const void *arg, int part, int parts);

static part_fn job_fn;
static const void *job_arg;
static int job_parts;
static atomic_int generation;
static atomic_int pending;
static atomic_int sleepers;
static int workers;  /* started worker threads */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t busy = PTHREAD_MUTEX_INITIALIZER;  /* one call at a time uses the pool */
static pthread_mutex_t grow = PTHREAD_MUTEX_INITIALIZER;
static int atfork_set;
static int start_generation[MAX_THREADS];  /* the generation a worker was created at (it waits for the next) */

static void part_range(int part, int parts, int N, int *n0, int *n1) {
    /* row blocks of 4, split evenly */
    int blocks = (N + 3) / 4;
    *n0 = (int)((int64_t)blocks * part / parts) * 4;
    *n1 = (int)((int64_t)blocks * (part + 1) / parts) * 4;
    if (*n1 > N) *n1 = N;
    if (*n0 > N) *n0 = N;
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void *worker_main(void *arg) {
    int id = (int)(intptr_t)arg; /* 1 .. workers */
    int seen = start_generation[id];
    for (;;) {
        int g = atomic_load(&generation);
        if (g == seen) {
            long until = now_ns() + SPIN_NS;
            int i = 0;
            while ((g = atomic_load(&generation)) == seen) {
                CPU_RELAX();
                if ((++i & 63) == 0 && now_ns() > until) {
                    pthread_mutex_lock(&mu);
                    atomic_fetch_add(&sleepers, 1);
                    while ((g = atomic_load(&generation)) == seen) pthread_cond_wait(&cv, &mu);
                    atomic_fetch_sub(&sleepers, 1);
                    pthread_mutex_unlock(&mu);
                    break;
                }
            }
        }
        seen = g;
        if (id < job_parts) job_fn(job_arg, id, job_parts);
        atomic_fetch_sub(&pending, 1);
    }
    return NULL;
}

static void reset_after_fork(void) {
    /* the child has none of the parent's threads: start over (mutexes re-initialised) */
    workers = 0;
    atomic_store(&pending, 0);
    atomic_store(&sleepers, 0);
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&cv, NULL);
    pthread_mutex_init(&busy, NULL);
    pthread_mutex_init(&grow, NULL);
}

static int ensure_workers(int want) {
    if (want > MAX_THREADS - 1) want = MAX_THREADS - 1;
    if (workers >= want) return workers;
    pthread_mutex_lock(&grow);
    if (!atfork_set) {
        pthread_atfork(NULL, NULL, reset_after_fork);
        atfork_set = 1;
    }
    while (workers < want) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        /* created before the next generation is published (the caller holds `busy`), the worker
           waits for the one after `start_generation`, however late the thread itself starts */
        start_generation[workers + 1] = atomic_load(&generation);
        if (pthread_create(&t, &attr, worker_main, (void *)(intptr_t)(workers + 1)) != 0) {
            pthread_attr_destroy(&attr);
            break;
        }
        pthread_attr_destroy(&attr);
        workers++;
    }
    pthread_mutex_unlock(&grow);
    return workers;
}

int lmf_workers(void) { return workers; }

/* fn(arg, p, parts) for p in [0, parts): part 0 on the calling thread, the others on the pool's
   workers; returns when all are done. The caller holds `busy`. */
static void parallel(part_fn fn, const void *arg, int parts) {
    if (parts > 1) {
        int have = ensure_workers(parts - 1);
        if (have + 1 < parts) parts = have + 1;
    }
    if (parts <= 1) {
        fn(arg, 0, 1);
        return;
    }
    job_fn = fn; job_arg = arg; job_parts = parts;
    atomic_store(&pending, workers);
    atomic_fetch_add(&generation, 1);
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&mu);
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
    }
    fn(arg, 0, parts);
    while (atomic_load(&pending) > 0) CPU_RELAX();
}

/* threads worth using for `bytes` of weights: each extra thread must have at least MIN_PART_BYTES
   to read (below that, waking it and waiting for it costs more than the rows it would take) */
static int parts_for(int64_t bytes, int threads) {
    int parts = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    int64_t most = bytes / MIN_PART_BYTES;
    if (most < parts) parts = most > 1 ? (int)most : 1;
    return parts;
}

/* ---- linear layers: GEMVs of one to a few tokens, one or more layers sharing the input, in one
   parallel call ---------------------------------------------------------------------------------- */

typedef struct {
    int32_t kind;  /* LMF_F32: fp32 (N x K) row-major; LMF_INT8: int8 (N x K) with ws, wsum; LMF_INT4 below */
    int32_t N, K;
    const void *w;
    const float *ws;     /* int8: per-row scales; int4: per-group scales (N x K / group) */
    const int32_t *wsum; /* int8: per-row sums of the weights */
    const float *wz;     /* int4: per-group zeros (N x K / group) */
    int32_t group;       /* int4: columns per group */
} lmf_linear;

#define LMF_F32 0
#define LMF_INT8 1
#define LMF_INT4 2 /* codes 0..15, two per byte (N x K / 2; column 2j in the high nibble of byte j),
                      w = (code - 8) * scale + zero per group: lmforge's Int4Linear */

/* ---- int4 x int8: the activation row quantized to 8 bits as for int8, split into even and odd
   columns (the two nibbles of a byte), with per-group sums of x and of its 8-bit codes:
   y[n] = sx * sum_g scale_g * (sum_{k in g} code_k xq_k - 8 sum_{k in g} xq_k) + sum_g zero_g sum_{k in g} x_k
   (the zero term is exact in fp32; the rest is llama.cpp's q4 x q8 arithmetic with lmforge's
   group scales and zeros). */
static float prepare_int4(const float *x, int K, int g, int8_t *xe, int8_t *xo, float *xsum, float *xqsum) {
    float amax = 0.f;
    for (int k = 0; k < K; k++) {
        float a = fabsf(x[k]);
        amax = a > amax ? a : amax;
    }
    float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int gi = 0; gi < K / g; gi++) {
        float fs = 0.f;
        int32_t qs = 0;
        for (int k = gi * g; k < (gi + 1) * g; k++) {
            int v = (int)lrintf(x[k] * inv);
            if (k & 1) xo[k >> 1] = (int8_t)v; else xe[k >> 1] = (int8_t)v;
            fs += x[k];
            qs += v;
        }
        xsum[gi] = fs;
        xqsum[gi] = (float)qs; /* exact: |qs| <= 127 * 256 */
    }
    return amax / 127.f;
}

/* sum_g zero_g xsum_g - 8 sx sum_g scale_g xqsum_g: the zero term and the codes' -8 offset of one row */
static float group_fix(const float *sr, const float *zr, const float *xsum, const float *xqsum, int G, float sx) {
#if defined(__AVX512F__)
    if (G <= 16) {
        __mmask16 m = (__mmask16)(G == 16 ? 0xFFFF : (1u << G) - 1u);
        __m512 z = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, zr), _mm512_maskz_loadu_ps(m, xsum));
        __m512 q = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sr), _mm512_maskz_loadu_ps(m, xqsum));
        return _mm512_reduce_add_ps(z) - 8.f * sx * _mm512_reduce_add_ps(q);
    }
#endif
    return dotf(zr, xsum, G) - 8.f * sx * dotf(sr, xqsum, G);
}

static void i4_rows(const int8_t *xe, const int8_t *xo, float sx, const float *xsum, const float *xqsum, int K,
                    int g, const uint8_t *w, const float *scales, const float *zeros, int n0, int n1, float *y) {
    int G = K / g, half = K / 2;
#if LMF_ISA == 2
    if (K % 128 == 0) {
        /* 64 bytes = 128 columns per step; lane i of a dpbusd sums columns 8i .. 8i + 7, in group
           (128 c + 8 i) / g: the scale vector is gathered from the row's scales with that index */
        int32_t idx[16];
        for (int i = 0; i < 16; i++) idx[i] = g <= 128 ? (8 * i) / g : 0;
        __m512i vidx = _mm512_loadu_si512((const void *)idx), low = _mm512_set1_epi8(0x0F);
        int n = n0;
        for (; n + 4 <= n1; n += 4) { /* four rows per load of x: four independent chains */
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int c = 0; c < half / 64; c++) {
                __m512i xev = _mm512_loadu_si512((const void *)(xe + 64 * c));
                __m512i xov = _mm512_loadu_si512((const void *)(xo + 64 * c));
                int base = (128 * c) / g, left = G - base;
                __mmask16 sm = (__mmask16)(left >= 16 ? 0xFFFF : (1u << left) - 1u);
                for (int r = 0; r < 4; r++) {
                    __m512i b = _mm512_loadu_si512((const void *)(w + (int64_t)(n + r) * half + 64 * c));
                    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low), lo = _mm512_and_si512(b, low);
                    __m512i ai = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, xev);
                    ai = _mm512_dpbusd_epi32(ai, lo, xov);
                    __m512 sv = _mm512_maskz_loadu_ps(sm, scales + (int64_t)(n + r) * G + base);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai), _mm512_permutexvar_ps(vidx, sv), acc[r]);
                }
            }
            for (int r = 0; r < 4; r++) {
                const float *sr = scales + (int64_t)(n + r) * G, *zr = zeros + (int64_t)(n + r) * G;
                y[n + r] = sx * _mm512_reduce_add_ps(acc[r]) + group_fix(sr, zr, xsum, xqsum, G, sx);
            }
        }
        for (; n < n1; n++) {
            const uint8_t *wr = w + (int64_t)n * half;
            const float *sr = scales + (int64_t)n * G, *zr = zeros + (int64_t)n * G;
            __m512 acc = _mm512_setzero_ps();
            for (int c = 0; c < half / 64; c++) {
                __m512i b = _mm512_loadu_si512((const void *)(wr + 64 * c));
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low), lo = _mm512_and_si512(b, low);
                __m512i ai = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, _mm512_loadu_si512((const void *)(xe + 64 * c)));
                ai = _mm512_dpbusd_epi32(ai, lo, _mm512_loadu_si512((const void *)(xo + 64 * c)));
                int base = (128 * c) / g, left = G - base;
                __m512 sv = _mm512_maskz_loadu_ps((__mmask16)(left >= 16 ? 0xFFFF : (1u << left) - 1u), sr + base);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai), _mm512_permutexvar_ps(vidx, sv), acc);
            }
            y[n] = sx * _mm512_reduce_add_ps(acc) + group_fix(sr, zr, xsum, xqsum, G, sx);
        }
        return;
    }
#endif
    for (int n = n0; n < n1; n++) {
        const uint8_t *wr = w + (int64_t)n * half;
        const float *sr = scales + (int64_t)n * G, *zr = zeros + (int64_t)n * G;
        float acc = 0.f;
        for (int gi = 0; gi < G; gi++) {
            int32_t sum = 0;
            for (int j = gi * g / 2; j < (gi + 1) * g / 2; j++) sum += (wr[j] >> 4) * xe[j] + (wr[j] & 15) * xo[j];
            acc += sr[gi] * (float)sum;
        }
        y[n] = sx * acc + group_fix(sr, zr, xsum, xqsum, G, sx);
    }
}
#define ROW_TILE 8 /* rows of a weight read once for all the tokens of a call (they stay in cache) */

typedef struct {
    int count, T;
    const lmf_linear *lin[3];
    float *y[3];
    int64_t ldy[3];
    const float *x;
    int64_t ldx;
    const int8_t *xq; /* each token's x quantized to 8 bits (when any of the layers is int8), ldx apart */
    const float *sx;  /* their scales */
    /* int4 layers: each token's 8-bit x as even / odd columns (ldx bytes apart), its scale, and the
       per-group sums of x and of the codes (ldg apart) */
    const int8_t *x4;
    const float *sx4, *xsum, *xqsum;
    int64_t ldg;
} gemv_job;

#if defined(__AVX512F__)
/* rows [n0, n1) for tokens [0, T), each block of four rows read from memory once (then from cache
   for every group of four tokens): every
   (row, token) dot product is accumulated exactly as f32_rows accumulates it (16 lanes over k, the
   masked tail, one reduction), so the results are bitwise those of one-token calls */
static void f32_rows_tokens(const float *x0, int64_t ldx, int T, int K, const float *w, int n0, int n1, float *y0,
                            int64_t ldy) {
    int n = n0;
    __mmask16 tail = (__mmask16)((1u << (K % 16)) - 1u);
    for (; n + 4 <= n1; n += 4)
    for (int t0 = 0; t0 < T; t0 += 4) {
        const float *x = x0 + t0 * ldx;
        float *y = y0 + t0 * ldy;
        int nt = T - t0 < 4 ? T - t0 : 4;
        const float *wr = w + (int64_t)n * K;
        __m512 a[4][4];
        for (int r = 0; r < 4; r++)
            for (int t = 0; t < 4; t++) a[r][t] = _mm512_setzero_ps();
        int k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 w0 = _mm512_loadu_ps(wr + k), w1 = _mm512_loadu_ps(wr + K + k);
            __m512 w2 = _mm512_loadu_ps(wr + 2 * K + k), w3 = _mm512_loadu_ps(wr + 3 * K + k);
            for (int t = 0; t < nt; t++) {
                __m512 xv = _mm512_loadu_ps(x + t * ldx + k);
                a[0][t] = _mm512_fmadd_ps(w0, xv, a[0][t]);
                a[1][t] = _mm512_fmadd_ps(w1, xv, a[1][t]);
                a[2][t] = _mm512_fmadd_ps(w2, xv, a[2][t]);
                a[3][t] = _mm512_fmadd_ps(w3, xv, a[3][t]);
            }
        }
        if (k < K) {
            for (int t = 0; t < nt; t++) {
                __m512 xv = _mm512_maskz_loadu_ps(tail, x + t * ldx + k);
                for (int r = 0; r < 4; r++)
                    a[r][t] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, wr + r * K + k), xv, a[r][t]);
            }
        }
        for (int t = 0; t < nt; t++)
            for (int r = 0; r < 4; r++) y[t * ldy + n + r] = _mm512_reduce_add_ps(a[r][t]);
    }
    for (int t = 0; t < T; t++) f32_rows(x0 + t * ldx, K, w, n, n1, y0 + t * ldy);
}
#endif

#if LMF_ISA == 2
/* the int8 rows [n0, n1) for tokens [0, T), each block of four rows read from memory once (exact
   int32 sums: the same values as one-token calls) */
static void i8_rows_tokens(const int8_t *xq0, int64_t ldx, const float *sx0, int T, int K, const int8_t *w,
                           const float *ws, const int32_t *wsum, int n0, int n1, float *y0, int64_t ldy) {
    int n = n0;
    for (; n + 4 <= n1; n += 4)
    for (int t0 = 0; t0 < T; t0 += 4) {
        const int8_t *xq = xq0 + t0 * ldx;
        const float *sx = sx0 + t0;
        float *y = y0 + t0 * ldy;
        int nt = T - t0 < 4 ? T - t0 : 4;
        const int8_t *wr = w + (int64_t)n * K;
        __m512i a[4][4];
        for (int r = 0; r < 4; r++)
            for (int t = 0; t < 4; t++) a[r][t] = _mm512_setzero_si512();
        int k = 0;
        for (; k + 64 <= K; k += 64) {
            __m512i w0 = _mm512_loadu_si512((const void *)(wr + k)), w1 = _mm512_loadu_si512((const void *)(wr + K + k));
            __m512i w2 = _mm512_loadu_si512((const void *)(wr + 2 * K + k));
            __m512i w3 = _mm512_loadu_si512((const void *)(wr + 3 * K + k));
            for (int t = 0; t < nt; t++) {
                __m512i xv = _mm512_loadu_si512((const void *)(xq + t * ldx + k));
                a[0][t] = _mm512_dpbusd_epi32(a[0][t], xv, w0);
                a[1][t] = _mm512_dpbusd_epi32(a[1][t], xv, w1);
                a[2][t] = _mm512_dpbusd_epi32(a[2][t], xv, w2);
                a[3][t] = _mm512_dpbusd_epi32(a[3][t], xv, w3);
            }
        }
        for (int t = 0; t < nt; t++) {
            const uint8_t *xu = (const uint8_t *)(xq + t * ldx);
            for (int r = 0; r < 4; r++) {
                int32_t sum = _mm512_reduce_add_epi32(a[r][t]);
                for (int kk = k; kk < K; kk++) sum += xu[kk] * wr[r * K + kk];
                y[t * ldy + n + r] = sx[t] * ws[n + r] * (float)(sum - 128 * wsum[n + r]);
            }
        }
    }
    for (int t = 0; t < T; t++) gemv_rows(xq0 + t * ldx, sx0[t], K, w, ws, wsum, n, n1, y0 + t * ldy);
}
#endif

static void rows_of(const gemv_job *j, const lmf_linear *l, int t, int n0, int n1, float *y) {
    if (l->kind == LMF_INT4) {
        const int8_t *xe = j->x4 + t * j->ldx;
        i4_rows(xe, xe + l->K / 2, j->sx4[t], j->xsum + t * j->ldg, j->xqsum + t * j->ldg, l->K, l->group,
                (const uint8_t *)l->w, l->ws, l->wz, n0, n1, y);
    } else if (l->kind == LMF_INT8)
        gemv_rows(j->xq + t * j->ldx, j->sx[t], l->K, (const int8_t *)l->w, l->ws, l->wsum, n0, n1, y);
    else
        f32_rows(j->x + t * j->ldx, l->K, (const float *)l->w, n0, n1, y);
}

/* Every token's row of y gets exactly the arithmetic of a one-token call (the same kernel over the
   same rows), so a chunk of tokens computes what decoding them one by one computes. */
static void gemv_part(const void *arg, int part, int parts) {
    const gemv_job *j = (const gemv_job *)arg;
    for (int i = 0; i < j->count; i++) {
        const lmf_linear *l = j->lin[i];
        int n0, n1;
        part_range(part, parts, l->N, &n0, &n1);
        if (n0 >= n1) continue;
        if (j->T == 1) {
            rows_of(j, l, 0, n0, n1, j->y[i]);
            continue;
        }
#if defined(__AVX512F__)
        if (l->kind == LMF_F32) {
            f32_rows_tokens(j->x, j->ldx, j->T, l->K, (const float *)l->w, n0, n1, j->y[i], j->ldy[i]);
            continue;
        }
#endif
#if LMF_ISA == 2
        if (l->kind == LMF_INT8) {
            i8_rows_tokens(j->xq, j->ldx, j->sx, j->T, l->K, (const int8_t *)l->w, l->ws, l->wsum, n0, n1, j->y[i],
                           j->ldy[i]);
            continue;
        }
#endif
        for (int n = n0; n < n1; n += ROW_TILE) {
            int e = n + ROW_TILE < n1 ? n + ROW_TILE : n1;
            for (int t = 0; t < j->T; t++) rows_of(j, l, t, n, e, j->y[i] + t * j->ldy[i]);
        }
    }
}

static int64_t linear_bytes(const lmf_linear *l) {
    return l->kind == LMF_INT4 ? (int64_t)l->N * l->K / 2 : (int64_t)l->N * l->K * (l->kind == LMF_INT8 ? 1 : 4);
}

/* scratch of the activation codes: 8-bit rows for int8 layers, their even/odd split and group sums
   for int4 layers (T tokens each) */
typedef struct {
    int8_t *xq, *x4;
    float *sx, *sx4, *xsum, *xqsum;
    int64_t ldg;
} act_scratch;

/* y_i[t] = lin_i(x[t]) for `count` layers sharing the input: T tokens of K values, ldx apart;
   y_i rows ldy_i apart. `a`: the scratch (T * ldx bytes per code buffer, T floats per scale). Layers
   sharing an input share its group size when int4. */
static void linears(int count, const lmf_linear *const *lin, float *const *y, const int64_t *ldy, int T,
                    const float *x, int64_t ldx, const act_scratch *a, int threads) {
    gemv_job j = {.count = count, .T = T, .x = x, .ldx = ldx, .xq = a->xq, .sx = a->sx, .x4 = a->x4,
                  .sx4 = a->sx4, .xsum = a->xsum, .xqsum = a->xqsum, .ldg = a->ldg};
    int64_t bytes = 0;
    int quant = 0, group = 0;
    for (int i = 0; i < count; i++) {
        j.lin[i] = lin[i];
        j.y[i] = y[i];
        j.ldy[i] = ldy ? ldy[i] : 0;
        bytes += linear_bytes(lin[i]);
        quant |= lin[i]->kind == LMF_INT8;
        if (lin[i]->kind == LMF_INT4) group = lin[i]->group;
    }
    int K = lin[0]->K;
    if (quant)
        for (int t = 0; t < T; t++) a->sx[t] = quantize_row(x + t * ldx, K, a->xq + t * ldx);
    if (group)
        for (int t = 0; t < T; t++)
            a->sx4[t] = prepare_int4(x + t * ldx, K, group, a->x4 + t * ldx, a->x4 + t * ldx + K / 2,
                                     a->xsum + t * a->ldg, a->xqsum + t * a->ldg);
    parallel(gemv_part, &j, parts_for(bytes, threads));
}

/* y (N fp32) = int8 GEMV of x (K fp32) on `threads` threads (the caller's included). `scratch`:
   K bytes. A call that finds the pool busy (another Python thread) runs on its own thread.
   Returns 0. */
int lmf_int8_gemv(const float *x, int K, const int8_t *w, const float *ws, const int32_t *wsum, int N, float *y,
                  int8_t *scratch, int threads) {
    float sx;
    lmf_linear l = {LMF_INT8, N, K, w, ws, wsum, NULL, 0};
    const lmf_linear *lp = &l;
    if (parts_for((int64_t)N * K, threads) == 1 || pthread_mutex_trylock(&busy) != 0) {
        sx = quantize_row(x, K, scratch);
        gemv_rows(scratch, sx, K, w, ws, wsum, 0, N, y);
        return 0;
    }
    act_scratch a = {.xq = scratch, .sx = &sx};
    linears(1, &lp, &y, NULL, 1, x, K, &a, threads);
    pthread_mutex_unlock(&busy);
    return 0;
}

/* ---- the whole model for one sequence: a decode step, or a few tokens at once ----------------- */

/* The layout lmforge.infer.native_decode fills in (ctypes structures of the same fields):
   a Llama-style decoder (RMSNorm, attention with grouped KV heads and optional per-head QK-norm,
   rotate-half RoPE, SwiGLU MLP) whose linear layers are each fp32 or int8, and an fp32 KV cache per
   layer. The keys of kv head g at position t are hd floats at kcache + g * head_stride + slot(t) *
   slot_stride: slot(t) = t for the engine's contiguous cache ((n_kv, slots, hd) for this sequence:
   head_stride = slots * hd, slot_stride = hd), or table[t / block_size] * block_size + t % block_size
   for the server's paged cache ((blocks * block_size, n_kv, hd): head_stride = hd, slot_stride =
   n_kv * hd) with the sequence's block table passed to lmf_forward. */
typedef struct {
    const float *attn_norm, *mlp_norm, *q_norm, *k_norm; /* q_norm / k_norm NULL without QK-norm */
    float *kcache, *vcache;
    lmf_linear wq, wk, wv, wo, w1, w3, w2;
} lmf_layer;

typedef struct {
    int32_t n_layers, d, n_heads, n_kv, hd, ffn, vocab, slots; /* slots: positions the cache holds */
    float eps;
    int64_t head_stride, slot_stride;
    int32_t block_size;
    int32_t max_tokens; /* tokens one call may take (the work buffers' size) */
    const float *emb;       /* vocab x d */
    const float *cos, *sin; /* (positions, hd) RoPE tables */
    const float *norm;      /* the final norm */
    lmf_linear head;
    const lmf_layer *layers;
    float *work;  /* lmf_work_floats(m) floats */
    int8_t *qwork; /* lmf_qwork_bytes(m) bytes */
} lmf_model;

static int64_t widest(const lmf_model *m) {
    int64_t w = m->d, qd = (int64_t)m->n_heads * m->hd;
    if (qd > w) w = qd;
    if (m->ffn > w) w = m->ffn;
    return w;
}

static int64_t groups_per_token(const lmf_model *m) { return widest(m) / 32 + 1; }

long lmf_work_floats(const lmf_model *m) {
    long qd = (long)m->n_heads * m->hd, kd = (long)m->n_kv * m->hd;
    long per_token = 3L * m->d + 2L * qd + 2L * kd + 2L * m->ffn + 2 + 2L * groups_per_token(m);
    return per_token * m->max_tokens + (long)m->n_heads * m->slots;
}

long lmf_qwork_bytes(const lmf_model *m) { return 2L * (widest(m) + 64) * m->max_tokens; }

static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    float ss = dotf(x, x, n);
    float r = 1.f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

static void rope(float *x, int heads, int hd, const float *c, const float *s) {
    int h = hd / 2;
    for (int j = 0; j < heads; j++) {
        float *v = x + (int64_t)j * hd;
        for (int i = 0; i < h; i++) {
            float a = v[i], b = v[i + h];
            v[i] = a * c[i] - b * s[i];
            v[i + h] = b * c[i + h] + a * s[i];
        }
    }
}

/* where each token of a call sits: its position, its sequence's block table (paged cache) and its
   sequence's offset in the cache (contiguous cache with several rows) */
typedef struct {
    const int32_t *pos;
    const int64_t *tables; /* NULL: contiguous cache; else token i's table at tables + i * table_ld */
    int64_t table_ld;
    const int64_t *offsets; /* floats from the layer's cache start to token i's sequence (NULL: 0) */
} rows_t;

static inline const int64_t *table_of(const rows_t *r, int i) { return r->tables ? r->tables + i * r->table_ld : NULL; }
static inline int64_t offset_of(const rows_t *r, int i) { return r->offsets ? r->offsets[i] : 0; }

typedef struct {
    const float *q; /* T tokens x n_heads * hd */
    const float *kc, *vc;
    float *out, *scores;
    int n_heads, group, hd, slots, T, block_size;
    int64_t head_stride, slot_stride;
    const rows_t *rows;
    float scale;
} attn_job;

static inline int64_t slot_of(const int64_t *table, int block_size, int t) {
    return table ? table[t / block_size] * block_size + t % block_size : t;
}

/* heads [h0, h1) of every token: token i (position pos_i) attends to positions 0 .. pos_i of its
   sequence, softmax(q k^T * scale) v */
static void attn_part(const void *arg, int part, int parts) {
    const attn_job *j = (const attn_job *)arg;
    int h0 = (int)((int64_t)j->n_heads * part / parts), h1 = (int)((int64_t)j->n_heads * (part + 1) / parts);
    int64_t qd = (int64_t)j->n_heads * j->hd;
    for (int i = 0; i < j->T; i++) {
        int len = j->rows->pos[i] + 1;
        const int64_t *table = table_of(j->rows, i);
        int64_t off = offset_of(j->rows, i);
        for (int h = h0; h < h1; h++) {
            const float *q = j->q + i * qd + (int64_t)h * j->hd;
            const float *k = j->kc + off + (int64_t)(h / j->group) * j->head_stride;
            const float *v = j->vc + off + (int64_t)(h / j->group) * j->head_stride;
            float *s = j->scores + (int64_t)h * j->slots, *o = j->out + i * qd + (int64_t)h * j->hd;
            float mx = -INFINITY;
            for (int t = 0; t < len; t++) {
                s[t] = dotf(q, k + slot_of(table, j->block_size, t) * j->slot_stride, j->hd) * j->scale;
                mx = s[t] > mx ? s[t] : mx;
            }
            float sum = 0.f;
            for (int t = 0; t < len; t++) {
                s[t] = expf(s[t] - mx);
                sum += s[t];
            }
            float inv = 1.f / sum;
            memset(o, 0, sizeof(float) * j->hd);
            for (int t = 0; t < len; t++)
                axpyf(o, s[t] * inv, v + slot_of(table, j->block_size, t) * j->slot_stride, j->hd);
        }
    }
}

static void forward(const lmf_model *m, const int32_t *tokens, int T, const rows_t *rows, float *hidden, float *logits,
                    int n_logits, int threads) {
    int d = m->d, hd = m->hd, qd = m->n_heads * hd, kd = m->n_kv * hd, ffn = m->ffn;
    float *x = m->work, *xn = x + (int64_t)T * d, *q = xn + (int64_t)T * d, *k = q + (int64_t)T * qd;
    float *v = k + (int64_t)T * kd, *att = v + (int64_t)T * kd, *h1 = att + (int64_t)T * qd;
    float *h3 = h1 + (int64_t)T * ffn, *o = h3 + (int64_t)T * ffn, *sx = o + (int64_t)T * d, *sx4 = sx + T;
    int64_t ldg = groups_per_token(m);
    float *xsum = sx4 + T, *xqsum = xsum + T * ldg, *scores = xqsum + T * ldg;
    act_scratch xq_ = {m->qwork, m->qwork + (widest(m) + 64) * m->max_tokens, sx, sx4, xsum, xqsum, ldg};
    const act_scratch *xq = &xq_;
    for (int i = 0; i < T; i++) memcpy(x + (int64_t)i * d, m->emb + (int64_t)tokens[i] * d, sizeof(float) * d);
    for (int li = 0; li < m->n_layers; li++) {
        const lmf_layer *L = m->layers + li;
        for (int i = 0; i < T; i++) rmsnorm(xn + (int64_t)i * d, x + (int64_t)i * d, L->attn_norm, d, m->eps);
        const lmf_linear *qkv[3] = {&L->wq, &L->wk, &L->wv};
        float *qkv_out[3] = {q, k, v};
        int64_t qkv_ld[3] = {qd, kd, kd};
        linears(3, qkv, qkv_out, qkv_ld, T, xn, d, xq, threads);
        for (int i = 0; i < T; i++) {
            float *qi = q + (int64_t)i * qd, *ki = k + (int64_t)i * kd, *vi = v + (int64_t)i * kd;
            if (L->q_norm) {
                for (int h = 0; h < m->n_heads; h++) rmsnorm(qi + h * hd, qi + h * hd, L->q_norm, hd, m->eps);
                for (int h = 0; h < m->n_kv; h++) rmsnorm(ki + h * hd, ki + h * hd, L->k_norm, hd, m->eps);
            }
            int p = rows->pos[i];
            const float *c = m->cos + (int64_t)p * hd, *s = m->sin + (int64_t)p * hd;
            rope(qi, m->n_heads, hd, c, s);
            rope(ki, m->n_kv, hd, c, s);
            int64_t at = offset_of(rows, i) + slot_of(table_of(rows, i), m->block_size, p) * m->slot_stride;
            for (int h = 0; h < m->n_kv; h++) {
                memcpy(L->kcache + h * m->head_stride + at, ki + h * hd, sizeof(float) * hd);
                memcpy(L->vcache + h * m->head_stride + at, vi + h * hd, sizeof(float) * hd);
            }
        }
        attn_job aj = {q, L->kcache, L->vcache, att, scores, m->n_heads, m->n_heads / m->n_kv, hd, m->slots,
                       T, m->block_size, m->head_stride, m->slot_stride, rows, 1.f / sqrtf((float)hd)};
        int64_t cache_bytes = 0;
        for (int i = 0; i < T; i++) cache_bytes += 2L * (rows->pos[i] + 1) * kd * 4;
        int ap = parts_for(cache_bytes * 4, threads); /* attention does more work per byte than a GEMV */
        parallel(attn_part, &aj, ap > m->n_heads ? m->n_heads : ap);
        const lmf_linear *wo = &L->wo;
        int64_t d_ld = d;
        linears(1, &wo, &o, &d_ld, T, att, qd, xq, threads);
        for (int64_t i = 0; i < (int64_t)T * d; i++) x[i] += o[i];
        for (int i = 0; i < T; i++) rmsnorm(xn + (int64_t)i * d, x + (int64_t)i * d, L->mlp_norm, d, m->eps);
        const lmf_linear *up[2] = {&L->w1, &L->w3};
        float *up_out[2] = {h1, h3};
        int64_t up_ld[2] = {ffn, ffn};
        linears(2, up, up_out, up_ld, T, xn, d, xq, threads);
        for (int64_t i = 0; i < (int64_t)T * ffn; i++) h1[i] = h1[i] / (1.f + expf(-h1[i])) * h3[i];
        const lmf_linear *w2 = &L->w2;
        linears(1, &w2, &o, &d_ld, T, h1, ffn, xq, threads);
        for (int64_t i = 0; i < (int64_t)T * d; i++) x[i] += o[i];
    }
    for (int i = 0; i < T; i++) rmsnorm(xn + (int64_t)i * d, x + (int64_t)i * d, m->norm, d, m->eps);
    if (hidden) memcpy(hidden, xn, sizeof(float) * (size_t)T * d);
    if (logits && n_logits > 0) {
        const lmf_linear *head = &m->head;
        int64_t v_ld = m->vocab;
        linears(1, &head, &logits, &v_ld, n_logits, xn + (int64_t)(T - n_logits) * d, d, xq, threads);
    }
}

/* T tokens (1 <= T <= max_tokens) at positions pos .. pos + T - 1, their keys and values written to
   those positions' slots in every layer's cache (`table`: the block table of a paged cache, NULL for
   a contiguous one). `hidden` (T x d, or NULL): the final hidden states (after the last norm);
   `logits` (n_logits x vocab, or NULL): the next-token logits of the last n_logits tokens. Each token
   gets the arithmetic of a one-token call. The pool is used when free (else one thread). Returns 0. */
static void forward_locked(const lmf_model *m, const int32_t *tokens, int T, const rows_t *rows, float *hidden,
                           float *logits, int n_logits, int threads) {
    if (threads > 1 && pthread_mutex_trylock(&busy) == 0) {
        forward(m, tokens, T, rows, hidden, logits, n_logits, threads);
        pthread_mutex_unlock(&busy);
    } else {
        forward(m, tokens, T, rows, hidden, logits, n_logits, 1);
    }
}

int lmf_forward(const lmf_model *m, const int32_t *tokens, int T, int pos, float *hidden, float *logits, int n_logits,
                int threads, const int64_t *table) {
    int32_t p[T];
    for (int i = 0; i < T; i++) p[i] = pos + i;
    rows_t rows = {p, table, 0, NULL};
    forward_locked(m, tokens, T, &rows, hidden, logits, n_logits, threads);
    return 0;
}

/* One token for each of T sequences (a batch decode step): token i at position pos[i] of its own
   sequence — addressed through its block table (`tables` + i * table_ld; NULL for the contiguous
   cache) and `offsets[i]` floats into every layer's cache (NULL: 0) — with logits for all T rows
   (`logits`: T x vocab). Every row gets exactly the arithmetic of a one-sequence step. Returns 0. */
int lmf_forward_rows(const lmf_model *m, const int32_t *tokens, int T, const int32_t *pos, const int64_t *tables,
                     int64_t table_ld, const int64_t *offsets, float *logits, int threads) {
    rows_t rows = {pos, tables, table_ld, offsets};
    forward_locked(m, tokens, T, &rows, NULL, logits, T, threads);
    return 0;
}

/* y (N fp32) = the int4 x int8 GEMV of x (K fp32) on one thread (tests compare it with exact
   arithmetic). `scratch`: K bytes; `gscratch`: 2 * K / group floats. Returns 0. */
int lmf_int4_gemv(const float *x, int K, int group, const uint8_t *w, const float *scales, const float *zeros, int N,
                  float *y, int8_t *scratch, float *gscratch) {
    lmf_linear l = {LMF_INT4, N, K, w, scales, NULL, zeros, group};
    const lmf_linear *lp = &l;
    float sx4;
    act_scratch a = {.x4 = scratch, .sx4 = &sx4, .xsum = gscratch, .xqsum = gscratch + K / group};
    linears(1, &lp, &y, NULL, 1, x, K, &a, 1);
    return 0;
}

/* y (N fp32) = W x for a row-major fp32 W (N x K) on `threads` threads: the decode step's fp32 GEMV
   (the benchmarks measure memory bandwidth with it). Returns 0. */
int lmf_f32_gemv(const float *x, int K, const float *w, int N, float *y, int threads) {
    lmf_linear l = {LMF_F32, N, K, w, NULL, NULL, NULL, 0};
    const lmf_linear *lp = &l;
    act_scratch a = {0};
    if (parts_for((int64_t)N * K * 4, threads) == 1 || pthread_mutex_trylock(&busy) != 0) {
        f32_rows(x, K, w, 0, N, y);
        return 0;
    }
    linears(1, &lp, &y, NULL, 1, x, K, &a, threads);
    pthread_mutex_unlock(&busy);
    return 0;
}
