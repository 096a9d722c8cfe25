/* Open-vocabulary token optimization on int8 query caches: the map and its Jacobian in one pass.
 *
 * Rows of a head are (step, pixel) pairs; each row holds the head's int8 query codes (d a multiple of 16)
 * and one fp16 scale. With X' = [object, background] the object's softmax probability is
 * sigmoid(scale_r * codes_r . v_h), v_h the head's scaled key difference, so
 *
 *   map[pixel]        = sum over heads h and steps of prob_r
 *   jac[pixel, h, :]  = sum over steps of prob_r (1 - prob_r) scale_r codes_r      (= d map[pixel] / d v_h)
 *
 * and the gradient of any loss of the map is g @ jac: the codes are read once per epoch, not twice. The
 * product is exact in int32: v is quantized per head to int16 within +-32512 (= 127 * 256, so that it also
 * splits into two int8 halves, 256 hi + lo, for AMX tiles), codes are at most 127 in size, and
 * 128 * 127 * 32512 < 2^31. It runs on AMX tiles where the CPU and Linux allow, else with AVX-512 VNNI, else
 * (the portable path, x86-64-v3: AVX2, FMA, F16C) with AVX2's int16 multiply-adds; all three give the same
 * integers, and the float steps after them are the same operations in the same order (the sigmoid divides
 * rather than using AVX-512's reciprocal estimate), so the maps and Jacobians are bit-identical between
 * paths. The Jacobian's weights are int16 per block of 16 pixels (pairs of rows in one multiply-add).
 * Compiled at first use by opendaam._kernels with -march=native (or -march=x86-64-v3 for the portable
 * path); opendaam falls back to torch when this fails.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    !defined(OV_PORTABLE)
#define OV_ISA 512
#if defined(__AMX_INT8__)
#define OV_AMX 1 /* tiles come with the AVX-512 path only */
#endif
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define OV_ISA 256
#else
#error "opendaam's kernels need AVX2, FMA and F16C (x86-64-v3) or AVX-512 VNNI"
#endif
#define INLINE static inline __attribute__((always_inline))
#define SCHUNK 64 /* steps whose weights are kept on the stack at once (more steps: the Jacobian is re-read) */
/* 2^f on [-0.5, 0.5], degree-6 polynomial, highest power first (relative error ~1e-7): one table for both
 * paths, which must run the same operations to agree bit for bit */
static const float EXP2_POLY[7] = {1.5403530393381606e-4f, 1.3333558146428443e-3f, 9.6181291076284772e-3f,
                                   5.5504108664821580e-2f, 2.4022650695910071e-1f, 6.9314718055994531e-1f, 1.f};

/* v (d floats) to int16 within +-32512, rounded half away from zero; returns the unit (v ~ unit * vq). AMX
 * multiplies int8 by int8, so v = 256 hi + lo with int8 parts stops at 127 * 256; every path uses this one
 * quantization, so that all compute the same integers. */
INLINE float quantize_v(const float *v, int64_t d, int16_t *vq) {
    float amax = 0.f;
    for (int64_t k = 0; k < d; k++) amax = v[k] > amax ? v[k] : (-v[k] > amax ? -v[k] : amax);
    float unit = amax > 0.f ? amax / 32512.f : 1.f;
    for (int64_t k = 0; k < d; k++) {
        float x = v[k] / unit;
        vq[k] = (int16_t)(x >= 0.f ? (int)(x + 0.5f) : -(int)(-x + 0.5f));
    }
    return unit;
}

#if OV_ISA == 256
/* The portable path: the same computation in 256-bit registers, 8 lanes where AVX-512 has 16. */

/* 8 vectors of 8 int32 -> one vector holding their 8 horizontal sums, in order */
INLINE __m256i hsum8(const __m256i *r) {
    __m256i a0 = _mm256_hadd_epi32(r[0], r[1]), a1 = _mm256_hadd_epi32(r[2], r[3]);
    __m256i a2 = _mm256_hadd_epi32(r[4], r[5]), a3 = _mm256_hadd_epi32(r[6], r[7]);
    __m256i b0 = _mm256_hadd_epi32(a0, a1), b1 = _mm256_hadd_epi32(a2, a3);  /* rows 0-3 | 4-7, two halves */
    return _mm256_add_epi32(_mm256_permute2x128_si256(b0, b1, 0x20), _mm256_permute2x128_si256(b0, b1, 0x31));
}

/* exact int32 partial sums (8 lanes) of one row of nc * 16 int8 codes with the int16 vector */
INLINE __m256i row_dot(const int8_t *c, const __m256i *vq, int nc) {
    __m256i a = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)c)), vq[0]);
    for (int j = 1; j < nc; j++)
        a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + 16 * j))),
                                                  vq[j]));
    return a;
}

/* sigmoid of 8 floats: the AVX-512 path's operations (2^n built in the exponent bits, where scalef is exact) */
INLINE __m256 sigmoid8(__m256 s) {
    __m256 y = _mm256_mul_ps(s, _mm256_set1_ps(-1.4426950408889634f));  /* -s * log2(e) */
    y = _mm256_max_ps(_mm256_min_ps(y, _mm256_set1_ps(126.f)), _mm256_set1_ps(-126.f));
    __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(y, n);  /* in [-0.5, 0.5] */
    __m256 p = _mm256_set1_ps(EXP2_POLY[0]);
    for (int k = 1; k < 7; k++) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_POLY[k]));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));  /* exp(-s) */
    return _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_add_ps(_mm256_set1_ps(1.f), e));
}

INLINE __m256 load_half8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
INLINE void store_half8(uint16_t *p, __m256 x) {
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* 16 pixels' int32 Jacobian sums of elements [16 j0, 16 j1) of pixel k over the block's steps [0, ns), in
 * element order (8 lanes per register), paired rows through one multiply-add each */
INLINE void jac_part(const int8_t *base, int64_t s0, int64_t ns, int k, int64_t d, const int16_t *wq, int j0,
                     int j1, __m256i *acc) {
    for (int j = 0; j < 2 * (j1 - j0); j++) acc[j] = _mm256_setzero_si256();
    for (int64_t s = 0; s < ns; s += 2) {
        const int8_t *c0 = base + ((s0 + s) * 16 + k) * d;
        const int8_t *c1 = s + 1 < ns ? c0 + 16 * d : c0;
        __m256i ww = _mm256_set1_epi32((int32_t)(((uint32_t)(uint16_t)wq[16 * (s + 1) + k] << 16) |
                                                 (uint16_t)wq[16 * s + k]));
        for (int j = j0; j < j1; j++) {
            __m128i x0 = _mm_loadu_si128((const __m128i *)(c0 + 16 * j));
            __m128i x1 = _mm_loadu_si128((const __m128i *)(c1 + 16 * j));
            __m256i *a = acc + 2 * (j - j0);
            a[0] = _mm256_add_epi32(a[0], _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_unpacklo_epi8(x0, x1)), ww));
            a[1] = _mm256_add_epi32(a[1], _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_unpackhi_epi8(x0, x1)), ww));
        }
    }
}

INLINE void map_jac_head(const int8_t *codes, const uint16_t *scales, const float *v, int64_t steps, int64_t n,
                         int nc, int64_t b0, int64_t b1, float *map, uint16_t *jac, int64_t jstride, float jinv,
                         int amx) {
    (void)amx;
    int64_t d = 16 * (int64_t)nc;
    int16_t vq[128];
    float unit = quantize_v(v, d, vq);
    __m256i vv[8];
    for (int j = 0; j < nc; j++) vv[j] = _mm256_loadu_si256((const __m256i *)(vq + 16 * j));
    __m256 vunit = _mm256_set1_ps(unit), one = _mm256_set1_ps(1.f);
    __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    float w[SCHUNK * 16];
    int64_t block = steps * 16 * d;  /* bytes of one block's codes */
    for (int64_t blk = b0; blk < b1; blk++) {
        int64_t b = 16 * blk;  /* first pixel */
        int m = n - b < 16 ? (int)(n - b) : 16;
        const int8_t *base = codes + blk * block;
        const uint16_t *sbase = scales + blk * steps * 16;
        __m256 keep_lo = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(m), lane));  /* pixels < m */
        __m256 keep_hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(m - 8), lane));
        __m256 msum_lo = _mm256_setzero_ps(), msum_hi = _mm256_setzero_ps();
        for (int64_t s0 = 0; s0 < steps; s0 += SCHUNK) {
            int64_t ns = steps - s0 < SCHUNK ? steps - s0 : SCHUNK;
            for (int64_t s = 0; s < ns; s++) {
                const int8_t *c = base + (s0 + s) * 16 * d;
                if (blk + 1 < b1)  /* this step's rows of the next block */
                    for (int64_t o = 0; o < 16 * d; o += 64) _mm_prefetch((const char *)(c + block) + o, _MM_HINT_T0);
                __m256i acc[8];
                for (int k = 0; k < 8; k++) acc[k] = row_dot(c + k * d, vv, nc);
                __m256i dots_lo = hsum8(acc);
                for (int k = 0; k < 8; k++) acc[k] = row_dot(c + (8 + k) * d, vv, nc);
                __m256i dots_hi = hsum8(acc);
                const uint16_t *sp = sbase + (s0 + s) * 16;  /* padded pixels have scale 0, and are masked */
                __m256 sc_lo = load_half8(sp), sc_hi = load_half8(sp + 8);
                __m256 p_lo = sigmoid8(_mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dots_lo), vunit), sc_lo));
                __m256 p_hi = sigmoid8(_mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dots_hi), vunit), sc_hi));
                p_lo = _mm256_and_ps(p_lo, keep_lo);
                p_hi = _mm256_and_ps(p_hi, keep_hi);
                msum_lo = _mm256_add_ps(msum_lo, p_lo);
                msum_hi = _mm256_add_ps(msum_hi, p_hi);
                _mm256_storeu_ps(w + 16 * s, _mm256_mul_ps(_mm256_mul_ps(p_lo, _mm256_sub_ps(one, p_lo)), sc_lo));
                _mm256_storeu_ps(w + 16 * s + 8, _mm256_mul_ps(_mm256_mul_ps(p_hi, _mm256_sub_ps(one, p_hi)), sc_hi));
            }
            /* the block's weights in int16, as on the AVX-512 path */
            __m256 wmax = _mm256_setzero_ps();
            for (int64_t s = 0; s < 2 * ns; s++) wmax = _mm256_max_ps(wmax, _mm256_loadu_ps(w + 8 * s));
            float top8[8], top = 0.f;
            _mm256_storeu_ps(top8, wmax);
            for (int k = 0; k < 8; k++) top = top8[k] > top ? top8[k] : top;
            float wunit = top > 0.f ? top / 32767.f : 1.f;
            __m256 inv = _mm256_set1_ps(1.f / wunit), wj = _mm256_set1_ps(wunit * jinv);  /* to the jac's unit */
            int16_t wq[(SCHUNK + 1) * 16];
            for (int64_t s = 0; s < ns; s++) {
                __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(w + 16 * s), inv));
                __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(w + 16 * s + 8), inv));
                __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), _MM_SHUFFLE(3, 1, 2, 0));
                _mm256_storeu_si256((__m256i *)(wq + 16 * s), packed);
            }
            _mm256_storeu_si256((__m256i *)(wq + 16 * ns), _mm256_setzero_si256());  /* odd last step pairs with 0 */
            for (int k = 0; k < m; k++) {
                uint16_t *out = jac + (b + k) * jstride;
                /* at most 4 chunks (8 accumulators) at a time, so that they stay in the 16 registers */
                for (int j0 = 0; j0 < nc; j0 += 4) {
                    int j1 = j0 + 4 < nc ? j0 + 4 : nc;
                    __m256i acc[8];
                    jac_part(base, s0, ns, k, d, wq, j0, j1, acc);
                    for (int j = 0; j < 2 * (j1 - j0); j++) {
                        uint16_t *o = out + 16 * j0 + 8 * j;
                        __m256 x = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[j]), wj);
                        store_half8(o, s0 ? _mm256_add_ps(load_half8(o), x) : x);
                    }
                }
            }
        }
        float sums[16];
        _mm256_storeu_ps(sums, msum_lo);
        _mm256_storeu_ps(sums + 8, msum_hi);
        for (int k = 0; k < m; k++) map[b + k] += sums[k];
    }
}

/* the vector operations that ov_jac_vm uses, at this path's width: 12 accumulators of 8 floats */
#define VF __m256
#define VLANES 8
#define VACC 12
#define VZERO _mm256_setzero_ps
#define VSET1 _mm256_set1_ps
#define VFMADD _mm256_fmadd_ps
#define VLOADH load_half8
#define VSTORE _mm256_storeu_ps
#else
#ifdef OV_AMX
#include <sys/syscall.h>
#include <unistd.h>

/* Linux hands AMX tile state to a process only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA) */
static int amx_ready(void) {
    static volatile int state = 0;  /* 0 unknown, 1 granted, -1 refused (asking twice is harmless) */
    if (state == 0) state = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
    return state == 1;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;
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

/* sigmoid of 16 floats: exp through 2^x = 2^n * EXP2_POLY(f) */
INLINE __m512 sigmoid16(__m512 s) {
    __m512 y = _mm512_mul_ps(s, _mm512_set1_ps(-1.4426950408889634f));  /* -s * log2(e) */
    y = _mm512_max_ps(_mm512_min_ps(y, _mm512_set1_ps(126.f)), _mm512_set1_ps(-126.f));
    __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(y, n);  /* in [-0.5, 0.5] */
    __m512 p = _mm512_set1_ps(EXP2_POLY[0]);
    for (int k = 1; k < 7; k++) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[k]));
    __m512 e = _mm512_scalef_ps(p, n);  /* exp(-s) */
    /* a division, not rcp14 + Newton: AVX2 has no 14-bit estimate, and the paths must agree bit for bit */
    return _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

INLINE __m512 load_half(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
INLINE void store_half(uint16_t *p, __m512 x) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* Map and Jacobian of one head in one pass, over pixel blocks [b0, b1). The codes are laid out in blocks of
 * 16 pixels, (blocks, steps, 16, d), zero rows past the last pixel, so that one block's rows of all steps are
 * contiguous: they are read once from memory (streamed, with a software prefetch of the next block), then
 * again from L1/L2 for the Jacobian. */
INLINE void map_jac_head(const int8_t *codes, const uint16_t *scales, const float *v, int64_t steps, int64_t n,
                         int nc, int64_t b0, int64_t b1, float *map, uint16_t *jac, int64_t jstride, float jinv,
                         int amx) {
    int64_t d = 16 * (int64_t)nc;
    int16_t vq[128];
    float unit = quantize_v(v, d, vq);
    __m512i v32[4];
    for (int j = 0; j + 2 <= nc; j += 2) v32[j / 2] = _mm512_loadu_si512((const void *)(vq + 16 * j));
    __m256i v16 = nc % 2 ? _mm256_loadu_si256((const __m256i *)(vq + 16 * (nc - 1))) : _mm256_setzero_si256();
    __m512 vunit = _mm512_set1_ps(unit), one = _mm512_set1_ps(1.f);
#ifdef OV_AMX
    /* B tiles: rows of 4 consecutive elements of v, in two columns (hi, lo); one tile per 64 elements */
    int8_t bt[2][16 * 8];
    int32_t out32[32];
    __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    if (amx) {
        memset(bt, 0, sizeof bt);
        for (int64_t k = 0; k < d; k++) {
            int hi = (vq[k] + (vq[k] >= 0 ? 128 : -127)) / 256;  /* |hi| <= 127, lo in -128..127 */
            bt[k / 64][(k % 64) / 4 * 8 + k % 4] = (int8_t)hi;
            bt[k / 64][(k % 64) / 4 * 8 + 4 + k % 4] = (int8_t)(vq[k] - 256 * hi);
        }
        _tile_loadd(2, bt[0], 8);
        if (d > 64) _tile_loadd(4, bt[1], 8);
    }
#endif
    float w[SCHUNK * 16];
    int64_t block = steps * 16 * d;  /* bytes of one block's codes */
    for (int64_t blk = b0; blk < b1; blk++) {
        int64_t b = 16 * blk;  /* first pixel */
        int m = n - b < 16 ? (int)(n - b) : 16;
        const int8_t *base = codes + blk * block;
        const uint16_t *sbase = scales + blk * steps * 16;
        __mmask16 lanes = (__mmask16)((1u << m) - 1u);
        __m512 msum = _mm512_setzero_ps();
        for (int64_t s0 = 0; s0 < steps; s0 += SCHUNK) {
            int64_t ns = steps - s0 < SCHUNK ? steps - s0 : SCHUNK;
            for (int64_t s = 0; s < ns; s++) {
                const int8_t *c = base + (s0 + s) * 16 * d;
                if (blk + 1 < b1)  /* this step's rows of the next block */
                    for (int64_t o = 0; o < 16 * d; o += 64) _mm_prefetch((const char *)(c + block) + o, _MM_HINT_T0);
                __m512i dots;  /* the 16 rows' exact products with the int16 v */
#ifdef OV_AMX
                if (amx) {  /* one tile product: 16 rows x (hi, lo) */
                    _tile_zero(0);
                    _tile_loadd(1, c, d);
                    _tile_dpbssd(0, 1, 2);
                    if (d > 64) {
                        _tile_loadd(3, c + 64, d);
                        _tile_dpbssd(0, 3, 4);
                    }
                    _tile_stored(0, out32, 8);
                    __m512i z0 = _mm512_loadu_si512(out32), z1 = _mm512_loadu_si512(out32 + 16);
                    dots = _mm512_add_epi32(_mm512_slli_epi32(_mm512_permutex2var_epi32(z0, even, z1), 8),
                                            _mm512_permutex2var_epi32(z0, odd, z1));
                } else
#endif
                {
                    __m512i acc[16];
                    for (int k = 0; k < 16; k++) acc[k] = row_dot(c + k * d, v32, v16, nc);
                    dots = hsum16(acc);
                }
                __m512 sc = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, sbase + (s0 + s) * 16));
                __m512 p = sigmoid16(_mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dots), vunit), sc));
                p = _mm512_maskz_mov_ps(lanes, p);
                msum = _mm512_add_ps(msum, p);
                _mm512_storeu_ps(w + 16 * s, _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(one, p)), sc));
            }
            /* the block's weights in int16 (unit: their maximum / 32767; ns * 127 * 32767 < 2^31 keeps the
             * int32 sums exact), each pixel's steps paired so that one VNNI instruction adds two rows */
            __m512 wmax = _mm512_setzero_ps();
            for (int64_t s = 0; s < ns; s++) wmax = _mm512_max_ps(wmax, _mm512_loadu_ps(w + 16 * s));
            float top = _mm512_reduce_max_ps(wmax);
            float wunit = top > 0.f ? top / 32767.f : 1.f;
            __m512 inv = _mm512_set1_ps(1.f / wunit), wj = _mm512_set1_ps(wunit * jinv);  /* to the jac's unit */
            int16_t wq[(SCHUNK + 1) * 16];
            for (int64_t s = 0; s < ns; s++)
                _mm256_storeu_si256((__m256i *)(wq + 16 * s),
                                    _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(w + 16 * s), inv))));
            _mm256_storeu_si256((__m256i *)(wq + 16 * ns), _mm256_setzero_si256());  /* odd last step pairs with 0 */
            int ng = nc / 2;
            for (int k = 0; k < m; k++) {
                uint16_t *out = jac + (b + k) * jstride;
                __m512i acc[8];
                for (int j = 0; j < nc; j++) acc[j] = _mm512_setzero_si512();
                for (int64_t s = 0; s < ns; s += 2) {
                    const int8_t *c0 = base + ((s0 + s) * 16 + k) * d;
                    const int8_t *c1 = s + 1 < ns ? c0 + 16 * d : c0;
                    __m512i ww = _mm512_set1_epi32((int32_t)(((uint32_t)(uint16_t)wq[16 * (s + 1) + k] << 16) |
                                                             (uint16_t)wq[16 * s + k]));
                    for (int g = 0; g < ng; g++) {
                        __m256i x0 = _mm256_loadu_si256((const __m256i *)(c0 + 32 * g));
                        __m256i x1 = _mm256_loadu_si256((const __m256i *)(c1 + 32 * g));
                        acc[2 * g] = _mm512_dpwssd_epi32(acc[2 * g], _mm512_cvtepi8_epi16(_mm256_unpacklo_epi8(x0, x1)), ww);
                        acc[2 * g + 1] = _mm512_dpwssd_epi32(acc[2 * g + 1], _mm512_cvtepi8_epi16(_mm256_unpackhi_epi8(x0, x1)), ww);
                    }
                    if (nc % 2) {
                        __m128i x0 = _mm_loadu_si128((const __m128i *)(c0 + 32 * ng));
                        __m128i x1 = _mm_loadu_si128((const __m128i *)(c1 + 32 * ng));
                        __m256i pair = _mm256_set_m128i(_mm_unpackhi_epi8(x0, x1), _mm_unpacklo_epi8(x0, x1));
                        acc[nc - 1] = _mm512_dpwssd_epi32(acc[nc - 1], _mm512_cvtepi8_epi16(pair), ww);
                    }
                }
                /* lane order of group g: acc[2g] holds elements 0-7 and 16-23, acc[2g+1] elements 8-15 and 24-31;
                 * the odd last chunk is in order */
                for (int g = 0; g < ng; g++) {
                    __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[2 * g]), wj);
                    __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[2 * g + 1]), wj);
                    __m512 first = _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(1, 0, 1, 0));   /* 0-7 | 8-15 */
                    __m512 second = _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(3, 2, 3, 2));  /* 16-23 | 24-31 */
                    uint16_t *o = out + 32 * g;
                    store_half(o, s0 ? _mm512_add_ps(load_half(o), first) : first);
                    store_half(o + 16, s0 ? _mm512_add_ps(load_half(o + 16), second) : second);
                }
                if (nc % 2) {
                    uint16_t *o = out + 32 * ng;
                    __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[nc - 1]), wj);
                    store_half(o, s0 ? _mm512_add_ps(load_half(o), x) : x);
                }
            }
        }
        _mm512_mask_storeu_ps(map + b, lanes, _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, map + b), msum));
    }
}

/* the vector operations that ov_jac_vm uses, at this path's width: 24 accumulators of 16 floats */
#define VF __m512
#define VLANES 16
#define VACC 24
#define VZERO _mm512_setzero_ps
#define VSET1 _mm512_set1_ps
#define VFMADD _mm512_fmadd_ps
#define VLOADH load_half
#define VSTORE _mm512_storeu_ps
#endif /* OV_ISA */

/* out[c] = sum over rows [r0, r1) of g[r] jac[r, c] for a float16 (rows, cols) matrix, cols a multiple of 16
 * (out is written, not added to): the gradient of the map's loss from its Jacobian. Each column's sum runs
 * over the rows in order with one FMA each, so both widths give the same floats. */
int ov_jac_vm(const uint16_t *jac, const float *g, int64_t r0, int64_t r1, int64_t cols, float *out) {
    if (cols % 16) return -1;
    for (int64_t c0 = 0; c0 < cols; c0 += VACC * VLANES) {  /* the accumulators stay in registers */
        int nb = (int)((cols - c0) / VLANES < VACC ? (cols - c0) / VLANES : VACC);
        VF acc[VACC];
        for (int k = 0; k < VACC; k++) acc[k] = VZERO();
        for (int64_t r = r0; r < r1; r++) {
            VF gv = VSET1(g[r]);
            const uint16_t *p = jac + r * cols + c0;
            for (int k = 0; k < nb; k++) acc[k] = VFMADD(VLOADH(p + VLANES * k), gv, acc[k]);
        }
        for (int k = 0; k < nb; k++) VSTORE(out + c0 + VLANES * k, acc[k]);
    }
    return 0;
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

/* 512 where the kernel runs the AVX-512 VNNI (and AMX) path, 256 on the portable AVX2 path. */
int ov_isa(void) { return OV_ISA; }

/* Whether the kernel can use AMX here: compiled for a CPU with AMX-INT8 and granted by the kernel. */
int ov_int8_amx(void) {
#ifdef OV_AMX
    return amx_ready();
#else
    return 0;
#endif
}

/* One call: heads [h0, h1) and pixel blocks [b0, b1) of a layer's codes, laid out (heads, blocks, steps, 16,
 * d) with scales (heads, blocks, steps, 16), blocks = ceil(n / 16). map has n floats (the call's pixels are
 * added to), jac is (n, heads_total, d) float16 in units of jac_unit (the rows of the call's pixels and heads
 * are written; jac_unit keeps the largest possible entry, steps * 127 * max scale / 4, in float16's range). With
 * amx = 1 the products run on AMX tiles where ov_int8_amx() says they can (the same exact integers).
 * Returns 0, or -1 when d is not a multiple of 16 in 16..128. */
int ov_int8_map(const int8_t *codes, const uint16_t *scales, const float *v, int64_t h0, int64_t h1,
                int64_t heads_total, int64_t steps, int64_t n, int64_t d, int64_t b0, int64_t b1, float *map,
                uint16_t *jac, float jac_unit, int64_t amx) {
    if (d % 16 || d > 128 || d < 16) return -1;
    int nc = (int)(d / 16);
    int64_t rows = steps * 16 * ((n + 15) / 16);  /* rows of a head, padding included */
    int use = 0;
#ifdef OV_AMX
    if (amx && amx_ready()) {
        tile_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        int k0 = d < 64 ? (int)d : 64;
        cfg.rows[0] = 16, cfg.colsb[0] = 8;       /* C: 16 rows x 2 int32 */
        cfg.rows[1] = 16, cfg.colsb[1] = k0;      /* A: 16 rows of codes */
        cfg.rows[2] = k0 / 4, cfg.colsb[2] = 8;   /* B: v in (hi, lo) columns */
        if (d > 64) {
            cfg.rows[3] = 16, cfg.colsb[3] = (int)d - 64;
            cfg.rows[4] = ((int)d - 64) / 4, cfg.colsb[4] = 8;
        }
        _tile_loadconfig(&cfg);
        use = 1;
    }
#else
    (void)amx;
#endif
    for (int64_t h = h0; h < h1; h++) {
        const int8_t *c = codes + h * rows * d;
        const uint16_t *sc = scales + h * rows;
        DISPATCH(map_jac_head(c, sc, v + h * d, steps, n, NC, b0, b1, map, jac + h * d, heads_total * d,
                              1.f / jac_unit, use))
    }
#ifdef OV_AMX
    if (use) _tile_release();
#endif
    return 0;
}
