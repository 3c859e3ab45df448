/* int4-weight x int8-activation matrix products for decoding on x86 CPUs (see q4kernel.py).

   Weights as PackedLinear's int4 layout holds them: `nibbles` [N, K/2] (byte j of a row: column 2j
   in the low nibble, column 2j+1 in the high one) and `scale_zero` [K/32, N, 2] bfloat16, so that
   w = (code - 8) * scale + zero per group of 32 columns. The activations are quantized here per
   group of 32 to int8 (d = max|x| / 127, q = round(x / d)), stored as [even columns | odd columns]
   so that one group's 16 bytes of nibbles meet them as two 16-byte halves. Then per group
       sum(w x) = scale * d * sum(code q) + (zero - 8 scale) * d * sum(q),
   the first sum an integer dot product (AVX-512 VNNI's vpdpbusd, or AVX2's vpmaddubsw + vpmaddwd),
   everything after it in float32. Output rows are split between OpenMP threads (the OpenMP runtime
   torch has loaded: same pool, same thread count). */

#include <immintrin.h>
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 32

static inline float bf16_to_float(uint16_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float result;
    memcpy(&result, &bits, sizeof result);
    return result;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One row of K activations -> codes [K] (each group as even | odd columns), d and d * sum(q) per group. */
static void quantize_row(const float *x, int64_t K, int8_t *codes, float *d, float *dsum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t g = 0; g < K / GROUP; g++) {
        const float *in = x + g * GROUP;
        __m256 m = _mm256_andnot_ps(sign, _mm256_loadu_ps(in));
        for (int i = 8; i < GROUP; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(in + i)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h);
        const float scale = amax / 127.0f;
        const float inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
        int8_t *out = codes + g * GROUP;
        int sum = 0;
        for (int j = 0; j < GROUP / 2; j++) {
            const int even = (int)lrintf(in[2 * j] * inverse);
            const int odd = (int)lrintf(in[2 * j + 1] * inverse);
            out[j] = (int8_t)even;
            out[GROUP / 2 + j] = (int8_t)odd;
            sum += even + odd;
        }
        d[g] = scale;
        dsum[g] = scale * (float)sum;
    }
}

static inline __m256 widen8(const uint16_t *in) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)in)), 16));
}

/* For one row against one activation row: factor[g] = scale[g] * d[g] and returns
   sum over g of (zero[g] - 8 scale[g]) * dsum[g] (zeros NULL: 0). */
static float row_factors(const uint16_t *scales, const uint16_t *zeros, const float *d, const float *dsum,
                         float *factor, int64_t groups) {
    __m256 offset = _mm256_setzero_ps();
    const __m256 eight = _mm256_set1_ps(-8.0f);
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
        const __m256 scale = widen8(scales + g);
        _mm256_storeu_ps(factor + g, _mm256_mul_ps(scale, _mm256_loadu_ps(d + g)));
        __m256 shift = _mm256_mul_ps(scale, eight);
        if (zeros != NULL) shift = _mm256_add_ps(shift, widen8(zeros + g));
        offset = _mm256_fmadd_ps(shift, _mm256_loadu_ps(dsum + g), offset);
    }
    float rest = 0.0f;
    for (; g < groups; g++) {
        const float scale = bf16_to_float(scales[g]);
        factor[g] = scale * d[g];
        rest += ((zeros != NULL ? bf16_to_float(zeros[g]) : 0.0f) - 8.0f * scale) * dsum[g];
    }
    return hsum(offset) + rest;
}

/* One output row: sum over groups of factor[g] * sum(code q) + offset; factor[g] = scale d. */
static float row_dot(const uint8_t *row, const int8_t *q, const float *factor, int64_t groups) {
    int64_t g = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m256i mask2 = _mm256_set1_epi8(0x0F);
    __m512 wide = _mm512_setzero_ps();
    for (; g + 2 <= groups; g += 2) {
        /* two groups' nibbles [g0 | g1] -> [low g0 | high g0 | low g1 | high g1] */
        const __m256i packed = _mm256_loadu_si256((const __m256i *)(row + g * (GROUP / 2)));
        const __m256i low = _mm256_and_si256(packed, mask2);
        const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask2);
        const __m512i halves = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
        const __m512i weights = _mm512_shuffle_i64x2(halves, halves, _MM_SHUFFLE(3, 1, 2, 0));
        const __m512i activations = _mm512_loadu_si512((const void *)(q + g * GROUP));
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), weights, activations);
        const __m512 scale = _mm512_permutexvar_ps(
            spread, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(factor + g)))));
        wide = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, wide);
    }
    __m256 acc = _mm256_add_ps(_mm512_castps512_ps256(wide), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(wide), 1)));
#else
    __m256 acc = _mm256_setzero_ps();
#endif
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (; g < groups; g++) {
        const __m128i packed = _mm_loadu_si128((const __m128i *)(row + g * (GROUP / 2)));
        const __m128i low = _mm_and_si128(packed, mask);
        const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
        const __m256i weights = _mm256_set_m128i(high, low);
        const __m256i activations = _mm256_loadu_si256((const __m256i *)(q + g * GROUP));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), weights, activations);
#else
        const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(weights, activations), _mm256_set1_epi16(1));
#endif
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(factor + g), acc);
    }
    return hsum(acc);
}

/* The activations' int8 codes and group scales, for M rows of K (NULL when out of memory). */
typedef struct {
    int8_t *codes;
    float *d, *dsum;
} Quantized;

static int quantize(const float *x, int64_t M, int64_t K, Quantized *out) {
    const int64_t groups = K / GROUP;
    out->codes = malloc((size_t)(M * K) + 64);
    out->d = malloc(sizeof(float) * (size_t)(M * groups * 2));
    if (out->codes == NULL || out->d == NULL) {
        free(out->codes);
        free(out->d);
        return 0;
    }
    out->dsum = out->d + M * groups;
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * K, K, out->codes + m * K, out->d + m * groups, out->dsum + m * groups);
    return 1;
}

static void release(Quantized *q) {
    free(q->codes);
    free(q->d);
}

/* Output n of activation row m against one matrix's row n. */
static inline float output(const Quantized *q, int64_t m, int64_t K, const uint8_t *nibbles, const uint16_t *scales,
                           const uint16_t *zeros, int64_t n, float *factor) {
    const int64_t groups = K / GROUP;
    const float offset = row_factors(scales + n * groups, zeros != NULL ? zeros + n * groups : NULL,
                                     q->d + m * groups, q->dsum + m * groups, factor, groups);
    return row_dot(nibbles + n * (K / 2), q->codes + m * K, factor, groups) + offset;
}

/* y [M, N] = x [M, K] W^T (+ bias [N]) for int4 W: nibbles [N, K/2], scales and zeros [N, K/32] bfloat16
   (zeros NULL: all 0, as Q4_0's). x, y float32; everything contiguous. Out of memory: y is NaN. */
void llmchat_int4_mm(const float *x, int64_t M, int64_t K, const uint8_t *nibbles, const uint16_t *scales,
                     const uint16_t *zeros, int64_t N, const float *bias, float *y, int threads) {
    Quantized q;
    if (!quantize(x, M, K, &q)) {
        for (int64_t i = 0; i < M * N; i++) y[i] = NAN;
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        float factor[K / GROUP]; /* on the stack: a worker thread's malloc makes it a glibc arena of its own */
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++)
            for (int64_t m = 0; m < M; m++)
                y[m * N + n] = output(&q, m, K, nibbles, scales, zeros, n, factor) + (bias != NULL ? bias[n] : 0.0f);
    }
    release(&q);
}

/* A stack of E matrices (nibbles [E, N, K/2], scales and zeros [E, N, K/32]); y [k, N]: row i is
   the input times matrix experts[i], the input being x's row i (M == k) or its only row (M == 1).
   One call, one thread team, for a decode step's k experts. */
void llmchat_int4_experts(const float *x, int64_t M, int64_t K, const uint8_t *nibbles, const uint16_t *scales,
                          const uint16_t *zeros, int64_t N, const int64_t *experts, int64_t k, float *y, int threads) {
    Quantized q;
    if (!quantize(x, M, K, &q)) {
        for (int64_t i = 0; i < k * N; i++) y[i] = NAN;
        return;
    }
    const int64_t groups = K / GROUP;
#pragma omp parallel num_threads(threads)
    {
        float factor[groups];
#pragma omp for schedule(static)
        for (int64_t j = 0; j < k * N; j++) {
            const int64_t i = j / N, n = j % N, e = experts[i];
            y[j] = output(&q, M == 1 ? 0 : i, K, nibbles + e * N * (K / 2), scales + e * N * groups,
                          zeros != NULL ? zeros + e * N * groups : NULL, n, factor);
        }
    }
    release(&q);
}

/* bfloat16 bits of 8 floats, rounded to nearest even (as torch's .bfloat16(); weights are finite). */
static inline __m128i to_bf16(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i packed = _mm256_packus_epi32(rounded, rounded); /* per 128-bit lane: [a0..3 a0..3 | a4..7 a4..7] */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08)); /* [a0..3 a4..7] */
}

/* W [N, K] = (code - 8) * scale + zero, as float32 (bf16 == 0) or bfloat16 (bf16 != 0): a prefill's
   matrix for one GEMM, from the int4 layout's nibbles, scales and zeros (NULL: 0) [N, K/32]. */
void llmchat_int4_dequantize(const uint8_t *nibbles, const uint16_t *scales, const uint16_t *zeros, int64_t N,
                             int64_t K, void *out, int bf16, int threads) {
    const int64_t groups = K / GROUP;
    const __m128i mask = _mm_set1_epi8(0x0F);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < groups; g++) {
            const float scale = bf16_to_float(scales[n * groups + g]);
            const float zero = zeros != NULL ? bf16_to_float(zeros[n * groups + g]) : 0.0f;
            const __m256 vscale = _mm256_set1_ps(scale), base = _mm256_set1_ps(zero - 8.0f * scale);
            const __m128i packed = _mm_loadu_si128((const __m128i *)(nibbles + n * (K / 2) + g * (GROUP / 2)));
            const __m128i low = _mm_and_si128(packed, mask);
            const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
            const __m128i ordered[2] = {_mm_unpacklo_epi8(low, high), _mm_unpackhi_epi8(low, high)};
            const int64_t at = n * K + g * GROUP;
            for (int half = 0; half < 2; half++) {
                const __m256 first = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(ordered[half])), vscale, base);
                const __m256 second = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(ordered[half], 8))), vscale, base);
                if (bf16) {
                    uint16_t *w = (uint16_t *)out + at + 16 * half;
                    _mm_storeu_si128((__m128i *)w, to_bf16(first));
                    _mm_storeu_si128((__m128i *)(w + 8), to_bf16(second));
                } else {
                    float *w = (float *)out + at + 16 * half;
                    _mm256_storeu_ps(w, first);
                    _mm256_storeu_ps(w + 8, second);
                }
            }
        }
    }
}

/* sum over k of w[k] x[k]: int8 weights widened to float32, products and sums in float32. */
static inline float dot_int8_float(const int8_t *w, const float *x, int64_t K) {
    int64_t k = 0;
    float total = 0.0f;
#ifdef __AVX512F__
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k))));
        const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k + 16))));
        a = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + k), a);
        b = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + k + 16), b);
    }
    total = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
#else
    __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + k))));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + k + 8))));
        a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a);
        b = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), b);
    }
    total = hsum(_mm256_add_ps(a, b));
#endif
    for (; k < K; k++) total += (float)w[k] * x[k];
    return total;
}

#define INT8_ROW_BLOCK 16 /* weight rows a thread takes at once: 16 rows of a 4096-wide matrix fit L1/L2 */

/* y [M, N] = (x [M, K] codes^T) * scales (+ bias): int8 codes [N, K] with a float32 scale per row, x, y
   and the arithmetic float32 (an int8 code is exact in float32): the output projection's logits, as a
   float32 GEMM over the codes gives them, reading one byte a weight. */
void llmchat_int8_float_mm(const float *x, int64_t M, int64_t K, const int8_t *codes, const float *scales,
                           int64_t N, const float *bias, float *y, int threads) {
    const int64_t blocks = (N + INT8_ROW_BLOCK - 1) / INT8_ROW_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t block = 0; block < blocks; block++) {
        const int64_t first = block * INT8_ROW_BLOCK;
        const int64_t last = first + INT8_ROW_BLOCK < N ? first + INT8_ROW_BLOCK : N;
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = first; n < last; n++)
                y[m * N + n] = dot_int8_float(codes + n * K, x + m * K, K) * scales[n] + (bias != NULL ? bias[n] : 0.0f);
    }
}

/* ---- a decode step's attention over the cached keys and values (float32) ------------------------------
   One query per head; head h reads KV head h / group. The cache is [KV, capacity, D] with rows of D
   contiguous: `head_stride` elements from one KV head to the next. Positions are split between the
   threads in blocks, so that two threads share the work whatever the number of KV heads, and each
   block's key (value) rows are read once for all the query heads of their group. */

#define POSITION_BLOCK 64

static inline float dot_float(const float *a, const float *b, int64_t D) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), s1);
    }
    float total = hsum(_mm256_add_ps(s0, s1));
    for (; d < D; d++) total += a[d] * b[d];
    return total;
}

/* scores [H, L] = (q [H, D] . key rows 0..L-1 of each head's KV head) * scale */
void llmchat_attention_scores(const float *q, int64_t H, int64_t KV, int64_t D, const float *keys, int64_t head_stride,
                              int64_t L, float scale, float *scores, int threads) {
    const int64_t group = H / KV, blocks = (L + POSITION_BLOCK - 1) / POSITION_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t block = 0; block < blocks; block++) {
        const int64_t first = block * POSITION_BLOCK, last = first + POSITION_BLOCK < L ? first + POSITION_BLOCK : L;
        for (int64_t kv = 0; kv < KV; kv++)
            for (int64_t l = first; l < last; l++) {
                const float *row = keys + kv * head_stride + l * D;
                for (int64_t g = 0; g < group; g++) {
                    const int64_t h = kv * group + g;
                    scores[h * L + l] = dot_float(q + h * D, row, D) * scale;
                }
            }
    }
}

/* out [H, D] = sum over l of weights [H, L] times value row l of each head's KV head; `partial` holds
   threads x H x D floats (each thread's sums, added up at the end). */
void llmchat_attention_values(const float *weights, int64_t H, int64_t KV, int64_t D, const float *values,
                              int64_t head_stride, int64_t L, float *out, float *partial, int threads) {
    const int64_t group = H / KV, blocks = (L + POSITION_BLOCK - 1) / POSITION_BLOCK;
    memset(partial, 0, sizeof(float) * (size_t)(threads * H * D));
#pragma omp parallel num_threads(threads)
    {
        float *acc = partial + (int64_t)omp_get_thread_num() * H * D;
#pragma omp for schedule(static)
        for (int64_t block = 0; block < blocks; block++) {
            const int64_t first = block * POSITION_BLOCK;
            const int64_t last = first + POSITION_BLOCK < L ? first + POSITION_BLOCK : L;
            for (int64_t kv = 0; kv < KV; kv++)
                for (int64_t l = first; l < last; l++) {
                    const float *row = values + kv * head_stride + l * D;
                    for (int64_t g = 0; g < group; g++) {
                        const int64_t h = kv * group + g;
                        const float weight = weights[h * L + l];
                        const __m256 w = _mm256_set1_ps(weight);
                        float *into = acc + h * D;
                        int64_t d = 0;
                        for (; d + 8 <= D; d += 8)
                            _mm256_storeu_ps(into + d, _mm256_fmadd_ps(w, _mm256_loadu_ps(row + d), _mm256_loadu_ps(into + d)));
                        for (; d < D; d++) into[d] += weight * row[d];
                    }
                }
        }
    }
    for (int64_t i = 0; i < H * D; i++) {
        float total = 0.0f;
        for (int t = 0; t < threads; t++) total += partial[(int64_t)t * H * D + i];
        out[i] = total;
    }
}

/* ---- one token through a plain decoder layer (Llama's: RMSNorm, attention with RoPE over a full
   cache, RMSNorm, SiLU-gated MLP; int4 matrices), in two calls around the softmax, which torch
   computes between them: one C call in place of some thirty tensor operations a layer. ------------- */

typedef struct {
    const uint8_t *nibbles;
    const uint16_t *scales, *zeros; /* zeros NULL: all 0 */
    const float *bias;              /* NULL: none */
    int64_t rows, cols;
} Int4Matrix;

typedef struct {
    Int4Matrix qkv, o, gate_up, down;
    const float *attn_norm, *mlp_norm;
    const float *q_norm, *k_norm; /* Qwen3's RMSNorm of each query and key head, or NULL */
    float eps, scale;
    int64_t hidden, heads, kv_heads, head_dim, intermediate;
    float *keys, *values; /* the layer's cache [kv_heads, capacity, head_dim] */
    int64_t head_stride;  /* capacity * head_dim */
    /* scratch */
    float *normed, *qkv_out, *scores, *attended, *partial, *branch, *gate_up_out, *product;
} DecodeLayer;

static void product(const Int4Matrix *m, const float *x, float *y, int threads) {
    llmchat_int4_mm(x, 1, m->cols, m->nibbles, m->scales, m->zeros, m->rows, m->bias, y, threads);
}

/* out = w * (x * rsqrt(mean(x^2) + eps)), in that order (the reference's float32 RMSNorm) */
static void rms_norm(const float *x, const float *w, float eps, int64_t n, float *out) {
    __m256 s = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        s = _mm256_fmadd_ps(v, v, s);
    }
    float total = hsum(s);
    for (; i < n; i++) total += x[i] * x[i];
    const float r = 1.0f / sqrtf(total / (float)n + eps);
    for (i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

/* half-split RoPE of one head in place: cos, sin [head_dim] for this position */
static void rotate(float *head, const float *cos, const float *sin, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t d = 0; d < half; d++) {
        const float a = head[d], b = head[d + half];
        head[d] = a * cos[d] + (-b) * sin[d];
        head[d + half] = b * cos[d + half] + a * sin[d + half];
    }
}

/* norm, q/k/v, RoPE, the cache written at `position`, and the scores [heads, position + 1] (contiguous) */
void llmchat_decode_layer_in(const DecodeLayer *L, const float *x, const float *cos, const float *sin, int64_t position,
                             int threads) {
    const int64_t D = L->head_dim, H = L->heads, KV = L->kv_heads;
    rms_norm(x, L->attn_norm, L->eps, L->hidden, L->normed);
    product(&L->qkv, L->normed, L->qkv_out, threads);
    float *q = L->qkv_out, *k = q + H * D, *v = k + KV * D;
    for (int64_t h = 0; h < H; h++) {
        if (L->q_norm != NULL) rms_norm(q + h * D, L->q_norm, L->eps, D, q + h * D);
        rotate(q + h * D, cos, sin, D);
    }
    for (int64_t h = 0; h < KV; h++) {
        if (L->k_norm != NULL) rms_norm(k + h * D, L->k_norm, L->eps, D, k + h * D);
        rotate(k + h * D, cos, sin, D);
        memcpy(L->keys + h * L->head_stride + position * D, k + h * D, sizeof(float) * (size_t)D);
        memcpy(L->values + h * L->head_stride + position * D, v + h * D, sizeof(float) * (size_t)D);
    }
    llmchat_attention_scores(q, H, KV, D, L->keys, L->head_stride, position + 1, L->scale, L->scores, threads);
}

/* from the softmax's weights [heads, position + 1]: the attention's output, its projection and residual,
   norm, gated MLP and residual: y [hidden]. Without an MLP (gate_up.nibbles NULL: a mixture of experts,
   which the caller runs) y is x plus the attention's branch. */
void llmchat_decode_layer_out(const DecodeLayer *L, const float *x, const float *weights, int64_t position, float *y,
                              int threads) {
    const int64_t I = L->intermediate, n = L->hidden;
    llmchat_attention_values(weights, L->heads, L->kv_heads, L->head_dim, L->values, L->head_stride, position + 1,
                             L->attended, L->partial, threads);
    product(&L->o, L->attended, L->branch, threads);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] + L->branch[i];
    if (L->gate_up.nibbles == NULL) return;
    rms_norm(y, L->mlp_norm, L->eps, n, L->normed);
    product(&L->gate_up, L->normed, L->gate_up_out, threads);
    for (int64_t i = 0; i < I; i++) {
        const float gate = L->gate_up_out[i];
        L->product[i] = gate / (1.0f + expf(-gate)) * L->gate_up_out[I + i];
    }
    product(&L->down, L->product, L->branch, threads);
    for (int64_t i = 0; i < n; i++) y[i] += L->branch[i];
}
