/* Open-vocabulary token optimization on int8 query caches: fused forward and gradient kernels.
 *
 * One call handles one attention head of one layer. Rows are (step, pixel) pairs, each row holds the
 * head's int8 query codes (d a multiple of 16) and one fp16 scale. With X' = [object, background] the
 * object's softmax probability is sigmoid(scale_r * codes_r . v), v the scaled key difference.
 *
 *   forward:  prob_r = sigmoid(scale_r * codes_r . v);  map[pixel] += prob_r over steps
 *   backward: grad = sum_r g[pixel_r] * prob_r * (1 - prob_r) * scale_r * codes_r
 *
 * The forward product runs on int16 (v quantized per head with 15 bits, exact int32 sums: codes are at most
 * 127 in size, so 128 * 127 * 32767 < 2^31) with AVX-512 VNNI; probabilities are kept in fp16 for the
 * gradient (the map itself is summed from float32). Scales and probabilities in fp16 halve the bytes that
 * are not codes: the kernels are bound by memory bandwidth. Compiled at first
 * use by opendaam._kernels with -march=native; opendaam falls back to torch when this fails.
 */
#include <immintrin.h>
#include <stdint.h>

#define INLINE static inline __attribute__((always_inline))
#ifndef PREFETCH
#define PREFETCH 16384 /* bytes ahead of the rows being read: software prefetch keeps more DRAM reads in flight */
#endif

/* 16 vectors of 16 int32 -> one vector holding their 16 horizontal sums, in order */
INLINE __m512i hsum16(const __m512i *r) {
    __m512i a[8], b[4], c[2];
    for (int k = 0; k < 8; k++)
        a[k] = _mm512_add_epi32(_mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]),
                                _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]));
    for (int k = 0; k < 4; k++)
        b[k] = _mm512_add_epi32(_mm512_unpacklo_epi64(a[2 * k], a[2 * k + 1]),
                                _mm512_unpackhi_epi64(a[2 * k], a[2 * k + 1]));
    for (int k = 0; k < 2; k++)
        c[k] = _mm512_add_epi32(_mm512_shuffle_i32x4(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_i32x4(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* exact int32 dot product of one row of nc * 16 int8 codes with the int16 vector */
INLINE __m512i row_dot(const int8_t *c, const __m512i *v32, __m256i v16, int nc) {
    __m512i a = _mm512_setzero_si512();
    int j = 0;
    for (; j + 2 <= nc; j += 2)
        a = _mm512_dpwssd_epi32(a, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(c + 16 * j))), v32[j / 2]);
    if (j < nc) {
        __m256i t = _mm256_dpwssd_epi32(_mm256_setzero_si256(),
                                        _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + 16 * j))), v16);
        a = _mm512_add_epi32(a, _mm512_zextsi256_si512(t));
    }
    return a;
}

/* sigmoid of 16 floats: exp through 2^x = 2^n * p(f), degree-6 polynomial (relative error ~1e-7) */
INLINE __m512 sigmoid16(__m512 s) {
    __m512 y = _mm512_mul_ps(s, _mm512_set1_ps(-1.4426950408889634f));  /* -s * log2(e) */
    y = _mm512_max_ps(_mm512_min_ps(y, _mm512_set1_ps(126.f)), _mm512_set1_ps(-126.f));
    __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(y, n);  /* in [-0.5, 0.5] */
    __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    __m512 e = _mm512_scalef_ps(p, n);  /* exp(-s) */
    __m512 den = _mm512_add_ps(_mm512_set1_ps(1.f), e);
    __m512 x = _mm512_rcp14_ps(den);  /* 14 bits, then one Newton step: ~23 bits */
    return _mm512_mul_ps(x, _mm512_fnmadd_ps(den, x, _mm512_set1_ps(2.f)));
}

INLINE __m512 load_half(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
INLINE void store_half(uint16_t *p, __m512 x) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

#define FBLOCK 1024 /* rows whose scores wait in L1 for the sigmoid (a separate loop keeps the dot products'
                       registers free) */
INLINE void forward_head(const int8_t *codes, const uint16_t *scales, const float *v, int64_t steps, int64_t n,
                         int nc, uint16_t *prob, float *map) {
    int64_t d = 16 * (int64_t)nc, rows = steps * n;
    float amax = 0.f;
    for (int64_t k = 0; k < d; k++) amax = v[k] > amax ? v[k] : (-v[k] > amax ? -v[k] : amax);
    float unit = amax > 0.f ? amax / 32767.f : 1.f;
    int16_t vq[128];
    for (int64_t k = 0; k < d; k++) {
        float x = v[k] / unit;
        vq[k] = (int16_t)(x >= 0.f ? (int)(x + 0.5f) : -(int)(-x + 0.5f));
    }
    __m512i v32[4];
    for (int j = 0; j + 2 <= nc; j += 2) v32[j / 2] = _mm512_loadu_si512((const void *)(vq + 16 * j));
    __m256i v16 = nc % 2 ? _mm256_loadu_si256((const __m256i *)(vq + 16 * (nc - 1))) : _mm256_setzero_si256();
    __m512 vunit = _mm512_set1_ps(unit);
    float buf[FBLOCK + 16];
    for (int64_t r0 = 0; r0 < rows; r0 += FBLOCK) {
        int64_t nb = rows - r0 < FBLOCK ? rows - r0 : FBLOCK;
        int64_t i = 0;
        for (; i < nb; i += 16) {  /* scores, 16 rows at a time; a short last group is padded with zero rows */
            __m512i acc[16];
            const int8_t *c = codes + (r0 + i) * d;
            const char *ahead = (const char *)(c + 16 * d) + PREFETCH;
            for (int64_t b = 0; b < 16 * d; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
            int m = nb - i < 16 ? (int)(nb - i) : 16;
            for (int k = 0; k < 16; k++) acc[k] = k < m ? row_dot(c + k * d, v32, v16, nc) : _mm512_setzero_si512();
            __m512 sc;
            if (m == 16) {
                sc = load_half(scales + r0 + i);
            } else {
                uint16_t part[16] = {0};
                for (int k = 0; k < m; k++) part[k] = scales[r0 + i + k];
                sc = load_half(part);
            }
            _mm512_storeu_ps(buf + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hsum16(acc)), vunit), sc));
        }
        for (i = 0; i < nb; i += 16) _mm512_storeu_ps(buf + i, sigmoid16(_mm512_loadu_ps(buf + i)));
        /* the map from the float32 probabilities; a group of 16 rows stays in one step when it fits */
        for (i = 0; i < nb; i += 16) {
            int64_t q = (r0 + i) % n;
            if (i + 16 <= nb && q + 16 <= n)
                _mm512_storeu_ps(map + q, _mm512_add_ps(_mm512_loadu_ps(map + q), _mm512_loadu_ps(buf + i)));
            else
                for (int64_t k = i; k < nb && k < i + 16; k++) map[(r0 + k) % n] += buf[k];
        }
        for (i = 0; i + 16 <= nb; i += 16) store_half(prob + r0 + i, _mm512_loadu_ps(buf + i));
        if (i < nb) {
            uint16_t part[16];
            store_half(part, _mm512_loadu_ps(buf + i));
            for (int64_t k = i; k < nb; k++) prob[r0 + k] = part[k - i];
        }
    }
}

/* Gradient: w_r = g[pixel] * p (1 - p) * scale_r is quantized to int16 per block of WBLOCK rows (the
 * block's absolute maximum is 32767), and pairs of rows are interleaved so that one VNNI instruction adds
 * w_r c_r[k] + w_{r+1} c_{r+1}[k] to an exact int32 sum; each block is then added to float sums with its
 * scale. WBLOCK * 127 * 32767 < 2^31 keeps the int32 sums exact. */
#define WBLOCK 256
INLINE void backward_head(const int8_t *codes, const uint16_t *scales, const uint16_t *prob, const float *g, int64_t steps,
                          int64_t n, int nc, float *grad) {
    int64_t d = 16 * (int64_t)nc, rows = steps * n;
    int ng = nc / 2;  /* 32-element groups; an odd last 16-element chunk is handled on its own */
    __m512 total[8];  /* float sums in the kernel's lane order */
    for (int j = 0; j < nc; j++) total[j] = _mm512_setzero_ps();
    float w[WBLOCK + 16];
    int16_t wq[WBLOCK + 16];
    int64_t nb;
    for (int64_t r0 = 0; r0 < rows; r0 += nb) {
        /* a block never crosses a step, so its pixels are contiguous */
        int64_t q0 = r0 % n;
        nb = n - q0 < WBLOCK ? n - q0 : WBLOCK;
        const uint16_t *pr = prob + r0, *sc = scales + r0;
        const float *gg = g + q0;
        __m512 vmax = _mm512_setzero_ps();
        for (int64_t i = 0; i < nb; i += 16) {
            __m512 p, scale, gv;
            if (i + 16 <= nb) {
                p = load_half(pr + i), scale = load_half(sc + i), gv = _mm512_loadu_ps(gg + i);
            } else {  /* short last group: zero weights past the block */
                uint16_t pp[16] = {0}, ss[16] = {0};
                float gp[16] = {0};
                for (int64_t k = i; k < nb; k++) pp[k - i] = pr[k], ss[k - i] = sc[k], gp[k - i] = gg[k];
                p = load_half(pp), scale = load_half(ss), gv = _mm512_loadu_ps(gp);
            }
            __m512 x = _mm512_mul_ps(_mm512_mul_ps(gv, scale), _mm512_mul_ps(p, _mm512_sub_ps(_mm512_set1_ps(1.f), p)));
            _mm512_storeu_ps(w + i, x);
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(x));
        }
        float amax = _mm512_reduce_max_ps(vmax);
        if (amax == 0.f) continue;
        float unit = amax / 32767.f;
        __m512 inv = _mm512_set1_ps(32767.f / amax);
        int64_t i = 0;
        for (; i + 16 <= nb; i += 16)
            _mm256_storeu_si256((__m256i *)(wq + i),
                                _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(w + i), inv))));
        for (; i < nb; i++) {
            float x = w[i] / unit;
            wq[i] = (int16_t)(x >= 0.f ? (int)(x + 0.5f) : -(int)(-x + 0.5f));
        }
        wq[nb] = 0;
        __m512i acc[8];
        for (int j = 0; j < nc; j++) acc[j] = _mm512_setzero_si512();
        for (i = 0; i < nb; i += 2) {
            const int8_t *c0 = codes + (r0 + i) * d;
            const int8_t *c1 = i + 1 < nb ? c0 + d : c0;  /* odd block end: its weight is 0 */
            for (int64_t b = 0; b < 2 * d; b += 64) _mm_prefetch((const char *)c0 + PREFETCH + b, _MM_HINT_T0);
            __m512i ww = _mm512_set1_epi32((int32_t)(((uint32_t)(uint16_t)wq[i + 1] << 16) | (uint16_t)wq[i]));
            for (int k = 0; k < ng; k++) {
                __m256i x0 = _mm256_loadu_si256((const __m256i *)(c0 + 32 * k));
                __m256i x1 = _mm256_loadu_si256((const __m256i *)(c1 + 32 * k));
                acc[2 * k] = _mm512_dpwssd_epi32(acc[2 * k], _mm512_cvtepi8_epi16(_mm256_unpacklo_epi8(x0, x1)), ww);
                acc[2 * k + 1] = _mm512_dpwssd_epi32(acc[2 * k + 1], _mm512_cvtepi8_epi16(_mm256_unpackhi_epi8(x0, x1)), ww);
            }
            if (nc % 2) {
                __m128i x0 = _mm_loadu_si128((const __m128i *)(c0 + 32 * ng));
                __m128i x1 = _mm_loadu_si128((const __m128i *)(c1 + 32 * ng));
                __m256i pair = _mm256_set_m128i(_mm_unpackhi_epi8(x0, x1), _mm_unpacklo_epi8(x0, x1));
                acc[nc - 1] = _mm512_dpwssd_epi32(acc[nc - 1], _mm512_cvtepi8_epi16(pair), ww);
            }
        }
        __m512 vunit = _mm512_set1_ps(unit);
        for (int j = 0; j < nc; j++) total[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[j]), vunit, total[j]);
    }
    /* lane order of group k: acc[2k] holds elements 0-7 and 16-23, acc[2k+1] elements 8-15 and 24-31 */
    for (int k = 0; k < ng; k++) {
        float lo[16], hi[16];
        _mm512_storeu_ps(lo, total[2 * k]);
        _mm512_storeu_ps(hi, total[2 * k + 1]);
        for (int e = 0; e < 8; e++) {
            grad[32 * k + e] = lo[e];
            grad[32 * k + 16 + e] = lo[8 + e];
            grad[32 * k + 8 + e] = hi[e];
            grad[32 * k + 24 + e] = hi[8 + e];
        }
    }
    if (nc % 2) _mm512_storeu_ps(grad + 32 * ng, total[nc - 1]);
}

#define DISPATCH(CALL)                                                                                    \
    switch (nc) {                                                                                         \
    case 1: { const int NC = 1; CALL; } break;                                                            \
    case 2: { const int NC = 2; CALL; } break;                                                            \
    case 3: { const int NC = 3; CALL; } break;                                                            \
    case 4: { const int NC = 4; CALL; } break;                                                            \
    case 5: { const int NC = 5; CALL; } break;                                                            \
    case 6: { const int NC = 6; CALL; } break;                                                            \
    case 7: { const int NC = 7; CALL; } break;                                                            \
    case 8: { const int NC = 8; CALL; } break;                                                            \
    default: return -1;                                                                                   \
    }

/* Entry points. One call handles `heads` consecutive heads of `steps` steps each: head h's rows start
 * h * stride rows after the first (stride = all rows of a head, so a call may also cover a range of steps
 * of each head). The forward adds every head's probabilities into the one map; the backward writes one
 * gradient row of d floats per head. Returns 0, or -1 when d is not a multiple of 16 in 16..128. */
int ov_int8_forward(const int8_t *codes, const uint16_t *scales, const float *v, int64_t heads, int64_t stride,
                    int64_t steps, int64_t n, int64_t d, uint16_t *prob, float *map) {
    if (d % 16) return -1;
    int nc = (int)(d / 16);
    for (int64_t h = 0; h < heads; h++) {
        const int8_t *c = codes + h * stride * d;
        const uint16_t *sc = scales + h * stride;
        uint16_t *pr = prob + h * stride;
        const float *vh = v + h * d;
        DISPATCH(forward_head(c, sc, vh, steps, n, NC, pr, map))
    }
    return 0;
}

int ov_int8_backward(const int8_t *codes, const uint16_t *scales, const uint16_t *prob, const float *g,
                     int64_t heads, int64_t stride, int64_t steps, int64_t n, int64_t d, float *grad) {
    if (d % 16) return -1;
    int nc = (int)(d / 16);
    for (int64_t h = 0; h < heads; h++) {
        const int8_t *c = codes + h * stride * d;
        const uint16_t *sc = scales + h * stride;
        const uint16_t *pr = prob + h * stride;
        float *gr = grad + h * d;
        DISPATCH(backward_head(c, sc, pr, g, steps, n, NC, gr))
    }
    return 0;
}
