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

/* ---- the worker pool ------------------------------------------------------------------------- */

#define MAX_THREADS 64
#define SPIN_NS 200000L
#define MIN_PART_BYTES (128 * 1024)

typedef struct {
    const int8_t *xq;
    float sx;
    int K, N, parts;
    const int8_t *w;
    const float *ws;
    const int32_t *wsum;
    float *y;
} job_t;

static job_t job;
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

static void run_part(int part) {
    int n0, n1;
    part_range(part, job.parts, job.N, &n0, &n1);
    if (n0 < n1) gemv_rows(job.xq, job.sx, job.K, job.w, job.ws, job.wsum, n0, n1, job.y);
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
        if (id < job.parts) run_part(id);
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

/* y (N fp32) = int8 GEMV of x (K fp32) on `threads` threads (the caller's included). `scratch`:
   K bytes. Returns 0. */
int lmf_int8_gemv(const float *x, int K, const int8_t *w, const float *ws, const int32_t *wsum, int N, float *y,
                  int8_t *scratch, int threads) {
    float sx = quantize_row(x, K, scratch);
    int parts = threads < 1 ? 1 : threads;
    if (parts > MAX_THREADS) parts = MAX_THREADS;
    /* each extra thread must have at least MIN_PART_BYTES of weights to read: below that, waking it
       and waiting for it costs more than the rows it would take (small models' GEMVs stay on one) */
    int64_t most = ((int64_t)N * K) / MIN_PART_BYTES;
    if (most < parts) parts = most > 1 ? (int)most : 1;
    if (parts == 1 || pthread_mutex_trylock(&busy) != 0) {
        gemv_rows(scratch, sx, K, w, ws, wsum, 0, N, y);
        return 0;
    }
    int have = ensure_workers(parts - 1);
    if (have + 1 < parts) parts = have + 1;
    job.xq = scratch; job.sx = sx; job.K = K; job.N = N; job.parts = parts;
    job.w = w; job.ws = ws; job.wsum = wsum; job.y = y;
    atomic_store(&pending, have);
    atomic_fetch_add(&generation, 1);
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&mu);
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
    }
    run_part(0);
    while (atomic_load(&pending) > 0) CPU_RELAX();
    pthread_mutex_unlock(&busy);
    return 0;
}
