/* Grouped fp32 GEMMs for the MoE experts on x86-64 CPUs with AVX-512 (the `cgemm` path of
 * grouped_swiglu's torch backend; loaded by ../_cgemm.py, which compiles this file with the system C compiler).
 *
 * Why it exists (measured on the 2-core EPYC VM this project is tested on, fp32, one layer of
 * the `bench layer` MoE: T=4096 D=512 F=256 E=96 top-1, ~43 rows an expert): MKL's grouped batch
 * GEMM ran every expert GEMM at ~1.6x a dense GEMM's time of the same FLOPs. It packs each
 * expert's 512 KB weight panel (read from DRAM: 96 experts x 512 KB do not fit in any cache) for
 * only ~43 rows, and writes the [512 x 256] weight gradients through the cache. This file packs
 * nothing: the microkernel broadcasts A's elements and reads B's rows where they lie, prefetching
 * the next panel of B while it computes this one, and writes weight gradients with streaming
 * stores (they are not read again before the optimizer step).
 *
 * One microkernel, C[mr x 16nv] (+)= A[mr x K] @ B[K x 16nv]: A(i, k) = A[i*sai + k*sak] (any
 * strides: x, or x transposed), B row-major, C row-major, mr <= 6, nv <= 4 (24 accumulators).
 *   smk_rows:    per expert g, C_g[M_g x N] (+)= A_g[M_g x K] @ B_g, B_g [K x N] (trans_b = 0)
 *                or B_g^T with B_g [N x K] (trans_b = 1: computed as (B_g @ A_g^T)^T through a
 *                small transposed copy of A_g's rows, since B_g's columns are not contiguous);
 *   smk_weights: per expert g, C_g[Ka x N] = A_g[M_g x Ka]^T @ B_g[M_g x N] (zeros if M_g = 0).
 * Work is split into tasks (an expert's rows in chunks) run by torch's own OpenMP threads (the
 * library links libgomp.so.1 by soname, which resolves to the copy torch has loaded).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define MR 6
#define NV 4
#define NB (16 * NV)

static inline __attribute__((always_inline)) void
tile(const int mr, const int nv, const int64_t K, const float *A, const int64_t sai,
     const int64_t sak, const float *B, const int64_t ldb, float *C, const int64_t ldc,
     const __mmask16 last, const int beta, const int stream, const float *pf, const float *pfa)
{
    __m512 acc[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int c = 0; c < NV; c++) acc[r][c] = _mm512_setzero_ps();
    const float *a = A, *b = B;
    for (int64_t k = 0; k < K; k++, a += sak, b += ldb) {
        if (pf) _mm_prefetch((const char *)(pf + k * ldb), _MM_HINT_T0);
        if (pfa && (k & 15) == 0) /* the next tile's rows of A, one line each per 16 k */
#pragma GCC unroll 8
            for (int r = 0; r < MR; r++) _mm_prefetch((const char *)(pfa + r * sai + k), _MM_HINT_T0);
        __m512 bv[NV];
#pragma GCC unroll 4
        for (int c = 0; c < NV; c++)
            if (c < nv) bv[c] = c == nv - 1 ? _mm512_maskz_loadu_ps(last, b + 16 * c) : _mm512_loadu_ps(b + 16 * c);
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++)
            if (r < mr) {
                __m512 av = _mm512_set1_ps(a[r * sai]);
#pragma GCC unroll 4
                for (int c = 0; c < NV; c++)
                    if (c < nv) acc[r][c] = _mm512_fmadd_ps(av, bv[c], acc[r][c]);
            }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
        if (r < mr) {
            float *cr = C + r * ldc;
#pragma GCC unroll 4
            for (int c = 0; c < NV; c++)
                if (c < nv) {
                    __mmask16 m = c == nv - 1 ? last : (__mmask16)0xFFFF;
                    __m512 v = acc[r][c];
                    if (beta) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, cr + 16 * c));
                    if (stream && m == (__mmask16)0xFFFF) _mm512_stream_ps(cr + 16 * c, v);
                    else _mm512_mask_storeu_ps(cr + 16 * c, m, v);
                }
        }
}

typedef void (*tile_fn)(int64_t, const float *, int64_t, int64_t, const float *, int64_t, float *,
                        int64_t, __mmask16, int, int, const float *, const float *);
#define DEF(m, v)                                                                                \
    static void tile_##m##_##v(int64_t K, const float *A, int64_t sai, int64_t sak,              \
                               const float *B, int64_t ldb, float *C, int64_t ldc, __mmask16 l,  \
                               int beta, int stream, const float *pf, const float *pfa)          \
    { tile(m, v, K, A, sai, sak, B, ldb, C, ldc, l, beta, stream, pf, pfa); }
#define DEFV(m) DEF(m, 1) DEF(m, 2) DEF(m, 3) DEF(m, 4)
DEFV(1) DEFV(2) DEFV(3) DEFV(4) DEFV(5) DEFV(6)
#define ROWV(m) {tile_##m##_1, tile_##m##_2, tile_##m##_3, tile_##m##_4}
static const tile_fn TILES[MR][NV] = {ROWV(1), ROWV(2), ROWV(3), ROWV(4), ROWV(5), ROWV(6)};

/* C[M x N] (+)= A(M x K) @ B[K x N], panel by panel of NB columns; while the first NV row
 * blocks of a panel run, each prefetches one 64-byte column of the next panel's rows.
 * Measured (2 threads, the layer benchmark's shapes): prefetching B's next panel took x @ W[e]
 * from 13.5 to 12.6 ms on one thread; prefetching A's next row block took dx (two transposed
 * products) from 16.0 to 12.9 ms and dy @ W_down[e]^T from 7.4 to 6.5. */
static void gemm_nn(int64_t M, int64_t N, int64_t K, const float *A, int64_t sai, int64_t sak,
                    const float *B, int64_t ldb, float *C, int64_t ldc, int beta, int stream)
{
    for (int64_t j = 0; j < N; j += NB) {
        int64_t n = N - j < NB ? N - j : NB;
        int nv = (int)((n + 15) / 16);
        __mmask16 last = (n % 16) ? (__mmask16)((1u << (n % 16)) - 1) : (__mmask16)0xFFFF;
        const float *next = j + NB < N ? B + j + NB : NULL;
        for (int64_t i = 0, ib = 0; i < M; i += MR, ib++) {
            int mr = (int)(M - i < MR ? M - i : MR);
            const float *pf = next && ib < NV ? next + 16 * ib : NULL;
            /* rows of A in place (sak = 1): prefetch the next row block's while this one runs
             * (the transposed products read every weight row once, straight from DRAM) */
            const float *pfa = sak == 1 && i + MR < M ? A + (i + MR) * sai : NULL;
            TILES[mr - 1][nv - 1](K, A + i * sai, sai, sak, B + j, ldb, C + i * ldc + j, ldc, last,
                                  beta, stream, pf, pfa);
        }
    }
}

/* r[0..15] rows in, rows of the transpose out (in place) */
static inline void tr16(__m512 r[16])
{
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
        __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xDD);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
    }
}

/* at[k * NB + r] = a[r * lda + k] for r < m <= NB, k < K (lanes r >= m of at: zeros) */
static void transpose_in(const float *a, int64_t lda, int64_t m, int64_t K, float *at)
{
    __m512 v[16];
    for (int64_t r0 = 0; r0 < m; r0 += 16) {
        int64_t rows = m - r0 < 16 ? m - r0 : 16;
        for (int64_t k0 = 0; k0 < K; k0 += 16) {
            int64_t cols = K - k0 < 16 ? K - k0 : 16;
            __mmask16 km = (__mmask16)((1u << cols) - 1);
            for (int i = 0; i < 16; i++)
                v[i] = i < rows ? _mm512_maskz_loadu_ps(km, a + (r0 + i) * lda + k0) : _mm512_setzero_ps();
            tr16(v);
            for (int i = 0; i < cols; i++) _mm512_storeu_ps(at + (k0 + i) * NB + r0, v[i]);
        }
    }
}

/* c[r * ldc + n] (+)= ct[n * NB + r] for r < m <= NB, n < N */
static void transpose_out(const float *ct, int64_t N, int64_t m, float *c, int64_t ldc, int beta)
{
    __m512 v[16];
    for (int64_t n0 = 0; n0 < N; n0 += 16) {
        int64_t cols = N - n0 < 16 ? N - n0 : 16;
        __mmask16 nm = (__mmask16)((1u << cols) - 1);
        for (int64_t r0 = 0; r0 < m; r0 += 16) {
            int64_t rows = m - r0 < 16 ? m - r0 : 16;
            for (int i = 0; i < 16; i++)
                v[i] = i < cols ? _mm512_loadu_ps(ct + (n0 + i) * NB + r0) : _mm512_setzero_ps();
            tr16(v);
            for (int j = 0; j < rows; j++) {
                float *p = c + (r0 + j) * ldc + n0;
                __m512 o = beta ? _mm512_add_ps(v[j], _mm512_maskz_loadu_ps(nm, p)) : v[j];
                _mm512_mask_storeu_ps(p, nm, o);
            }
        }
    }
}

/* A task: rows [r0, r1) of product g. */
typedef struct { int64_t g, r0, r1; } task_t;

static int64_t chunk_rows(int64_t rows, int64_t work, int64_t cap, int64_t lo, int64_t hi)
{
    int64_t per_row = rows ? (work + rows - 1) / rows : 1;
    int64_t c = (cap / (per_row ? per_row : 1)) / MR * MR;
    c = c < lo ? lo : c;
    return hi > 0 && c > hi ? hi : c;
}

/* Tasks of rows [r0, r1) of an expert: chunks of lo..hi rows (hi <= 0: no upper bound). */
static task_t *make_tasks(int G, const int64_t *rows, const int64_t *work, int64_t lo, int64_t hi,
                          int nthreads, int64_t *ntasks)
{
    /* chunk an expert's rows so that no task holds more than ~1/8 of a thread's share of the
     * call's work (one expert holding a quarter of the tokens must not serialise the call) */
    int64_t total = 0;
    for (int g = 0; g < G; g++) total += work[g];
    int64_t cap = total / (8 * (int64_t)nthreads) + 1;
    int64_t n = 0;
    for (int g = 0; g < G; g++) {
        int64_t c = chunk_rows(rows[g], work[g], cap, lo, hi);
        n += rows[g] ? (rows[g] + c - 1) / c : 0;
    }
    task_t *t = (task_t *)malloc(sizeof(task_t) * (n ? n : 1));
    int64_t k = 0;
    for (int g = 0; g < G; g++) {
        int64_t c = chunk_rows(rows[g], work[g], cap, lo, hi);
        for (int64_t r = 0; r < rows[g]; r += c) {
            t[k].g = g;
            t[k].r0 = r;
            t[k].r1 = r + c < rows[g] ? r + c : rows[g];
            k++;
        }
    }
    *ntasks = n;
    return t;
}

/* C_g (+)= A_g @ op(B_g) [+ A2_g @ op(B2_g)] for G experts, M[g] rows each; trans_b = 1: B_g
 * is [N x K]. A2, B2: NULL, or a second product of the same shapes and strides summed in (the
 * backward's dx = dh_gate @ W_gate^T + dh_up @ W_up^T, one transpose out instead of two). */
int smk_rows(int G, const int64_t *M, const int64_t *A, const int64_t *B, const int64_t *A2,
             const int64_t *B2, const int64_t *C, int64_t N, int64_t K, int64_t lda, int64_t ldb,
             int64_t ldc, int trans_b, int beta, int nthreads)
{
    int64_t *work = (int64_t *)malloc(sizeof(int64_t) * (G ? G : 1));
    for (int g = 0; g < G; g++) work[g] = M[g] * N * K;
    int64_t ntasks;
    /* trans_b: a task's rows become the columns of one NB-wide panel */
    task_t *t = make_tasks(G, M, work, MR, trans_b ? NB : 0, nthreads, &ntasks);
    free(work);
    int err = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *at = NULL, *ct = NULL;
        if (trans_b) {
            at = (float *)aligned_alloc(64, sizeof(float) * K * NB);
            ct = (float *)aligned_alloc(64, sizeof(float) * N * NB);
            if (!at || !ct) {
#pragma omp atomic write
                err = -2;
            }
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < ntasks; i++) {
            const int64_t g = t[i].g, r0 = t[i].r0, m = t[i].r1 - t[i].r0;
            const float *a = (const float *)A[g] + r0 * lda;
            const float *b = (const float *)B[g];
            float *c = (float *)C[g] + r0 * ldc;
            const float *a2 = A2 ? (const float *)A2[g] + r0 * lda : NULL;
            const float *b2 = B2 ? (const float *)B2[g] : NULL;
            if (!trans_b) {
                gemm_nn(m, N, K, a, lda, 1, b, ldb, c, ldc, beta, 0);
                if (a2) gemm_nn(m, N, K, a2, lda, 1, b2, ldb, c, ldc, 1, 0);
            } else if (at && ct) {
                /* C^T[N x m] = B_g[N x K] @ A^T[K x m]; A^T is a copy, B_g is read in place */
                transpose_in(a, lda, m, K, at);
                gemm_nn(N, m, K, b, ldb, 1, at, NB, ct, NB, 0, 0);
                if (a2) {
                    transpose_in(a2, lda, m, K, at);
                    gemm_nn(N, m, K, b2, ldb, 1, at, NB, ct, NB, 1, 0);
                }
                transpose_out(ct, N, m, c, ldc, beta);
            }
        }
        free(at);
        free(ct);
    }
    free(t);
    return err;
}

/* C_g[Ka x N] = A_g[M_g x Ka]^T @ B_g[M_g x N] for G experts; zeros where M_g = 0. */
int smk_weights(int G, const int64_t *M, const int64_t *A, const int64_t *B, const int64_t *C,
                int64_t Ka, int64_t N, int64_t lda, int64_t ldb, int64_t ldc, int nthreads)
{
    int64_t *rows = (int64_t *)malloc(sizeof(int64_t) * (G ? G : 1));
    int64_t *work = (int64_t *)malloc(sizeof(int64_t) * (G ? G : 1));
    for (int g = 0; g < G; g++) {
        rows[g] = Ka;
        work[g] = Ka * N * (M[g] ? M[g] : 1);
    }
    int64_t ntasks;
    task_t *t = make_tasks(G, rows, work, MR, 0, nthreads, &ntasks);
    free(rows);
    free(work);
    const int stream = ((ldc * 4) % 64 == 0);
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < ntasks; i++) {
            const int64_t g = t[i].g, r0 = t[i].r0, m = t[i].r1 - t[i].r0;
            float *c = (float *)C[g] + r0 * ldc;
            int s = stream && ((uintptr_t)c % 64 == 0);
            gemm_nn(m, N, M[g], (const float *)A[g] + r0, 1, lda, (const float *)B[g], ldb, c,
                    ldc, 0, s);
        }
        _mm_sfence(); /* this thread's streaming stores, before the region's closing barrier */
    }
    free(t);
    return 0;
}
