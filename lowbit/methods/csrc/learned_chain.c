/* Learned rounding's integer-grid chain in one pass over the weights (see lowbit/methods/learned_chain.py).

Per weight of a row r, group g (scale S, zero point Z of that group; width columns a group):

    u = w / S    x = u + Z + o0 + delta    r = round-half-even(x)    q = clamp(r, 0, top)    W^ = (q - Z) * S

the same float32 operations in the same order as torch's elementwise path, so W^ is bit for bit torch's. With the
gradient G = dL/dW^ the backward pass also writes, per weight, dL/ddelta = [r == q] * G * S and, per group,
dL/dS = sum G * (q - Z) - (sum dL/ddelta * u) / S and dL/dZ = sum (dL/ddelta - G * S) (sums in this loop's order:
equal to torch's up to float rounding). Built with -ffp-contract=off (no fused multiply-adds: torch's values).
Weights stored as float32, bfloat16 or float16; the gradient and W^ as float32 or bfloat16. Built with
-fopenmp-simd: the loops' simd pragmas only (vectorised group sums), no OpenMP runtime. */

#include <stdint.h>
#include <string.h>
#include <math.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };

static inline float from_bf16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t to_bf16(float v) {  /* round to nearest even, as torch's float -> bfloat16 */
    uint32_t u;
    memcpy(&u, &v, 4);
    uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return v != v ? (uint16_t)0x7FC0 : rounded;
}

static inline float round_half_even(float x) {  /* torch.round: exact for |x| < 2^23 (grid positions are small) */
    const float big = 8388608.0f;
    float a = fabsf(x);
    return copysignf((a + big) - big, x);
}

/* The grid point of u = w / S: r = round(u + Z + o0 + delta) (added in torch's order), and q = clamp(r, 0, top) */
static inline float rounded_position(float u, float zg, float o0, float delta) {
    float x = u + zg;
    x = x + o0;
    x = x + delta;
    return round_half_even(x);
}

static inline float clamped(float r, float top) {
    return r < 0.0f ? 0.0f : (r > top ? top : r);
}

#define LOAD_F32(p, i) (((const float *)(p))[i])
#define LOAD_BF16(p, i) from_bf16(((const uint16_t *)(p))[i])
#define LOAD_F16(p, i) ((float)((const _Float16 *)(p))[i])
#define LOAD_I8(p, i) ((float)((const int8_t *)(p))[i])
#define LOAD_I16(p, i) ((float)((const int16_t *)(p))[i])
#define STORE_F32(p, i, v) (((float *)(p))[i] = (v))
#define STORE_BF16(p, i, v) (((uint16_t *)(p))[i] = to_bf16(v))

/* The chain of one group's n weights from index i0 (scale sg, zero zg): W^ into out; with the gradient, dL/ddelta
   into gdelta and the group's three sums. Vectorised by "omp simd" (-fopenmp-simd: no OpenMP runtime). */
#define CHAIN(NAME, LOADW, LOADO0, LOADG, STOREO)                                                                 \
static void NAME##_forward(const void *w, const void *o0, const float *delta, float sg, float zg, float top,      \
                           int64_t i0, int64_t n, void *out) {                                                    \
    _Pragma("omp simd")                                                                                           \
    for (int64_t j = 0; j < n; ++j) {                                                                             \
        int64_t i = i0 + j;                                                                                       \
        float q = clamped(rounded_position(LOADW(w, i) / sg, zg, LOADO0(o0, i), delta[i]), top);                  \
        STOREO(out, i, (q - zg) * sg);                                                                            \
    }                                                                                                             \
}                                                                                                                 \
static void NAME##_backward(const void *w, const void *o0, const float *delta, float sg, float zg, float top,     \
                            int64_t i0, int64_t n, void *out, const void *grad, float *gdelta, float sums[3]) {   \
    float a = 0.0f, b = 0.0f, c = 0.0f;                                                                           \
    _Pragma("omp simd reduction(+:a,b,c)")                                                                        \
    for (int64_t j = 0; j < n; ++j) {                                                                             \
        int64_t i = i0 + j;                                                                                       \
        float u = LOADW(w, i) / sg;                                                                               \
        float r = rounded_position(u, zg, LOADO0(o0, i), delta[i]);                                               \
        float q = clamped(r, top);                                                                                \
        STOREO(out, i, (q - zg) * sg);                                                                            \
        float gv = LOADG(grad, i);                                                                                \
        float gq = gv * sg;                                                                                       \
        float gx = r == q ? gq : 0.0f;                                                                            \
        gdelta[i] = gx;                                                                                           \
        a += (q - zg) * gv;                                                                                       \
        b += gx * u;                                                                                              \
        c += gx - gq;                                                                                             \
    }                                                                                                             \
    sums[0] = a;                                                                                                  \
    sums[1] = b;                                                                                                  \
    sums[2] = c;                                                                                                  \
}

/* every weight dtype, int8/int16 shifts, float32/bfloat16 gradients and outputs: W_O0_G_O_forward / _backward */
#define CHAINS_O0(W, LOADW, O, LOADO0)                                                                            \
    CHAIN(W##_##O##_f32_f32, LOADW, LOADO0, LOAD_F32, STORE_F32)                                                  \
    CHAIN(W##_##O##_f32_bf16, LOADW, LOADO0, LOAD_F32, STORE_BF16)                                                \
    CHAIN(W##_##O##_bf16_f32, LOADW, LOADO0, LOAD_BF16, STORE_F32)                                                \
    CHAIN(W##_##O##_bf16_bf16, LOADW, LOADO0, LOAD_BF16, STORE_BF16)
#define CHAINS(W, LOADW) CHAINS_O0(W, LOADW, i8, LOAD_I8) CHAINS_O0(W, LOADW, i16, LOAD_I16)
CHAINS(f32, LOAD_F32)
CHAINS(bf16, LOAD_BF16)
CHAINS(f16, LOAD_F16)

typedef void (*forward_fn)(const void *, const void *, const float *, float, float, float, int64_t, int64_t,
                           void *);
typedef void (*backward_fn)(const void *, const void *, const float *, float, float, float, int64_t, int64_t,
                            void *, const void *, float *, float *);
/* [weight dtype][shift dtype][gradient dtype][output dtype] */
#define BY_GO(W, O, KIND) {{W##_##O##_f32_f32_##KIND, W##_##O##_f32_bf16_##KIND},                                 \
                           {W##_##O##_bf16_f32_##KIND, W##_##O##_bf16_bf16_##KIND}}
#define BY_DTYPE(W, KIND) {BY_GO(W, i8, KIND), BY_GO(W, i16, KIND)}
static const forward_fn FORWARD[3][2][2][2] = {BY_DTYPE(f32, forward), BY_DTYPE(bf16, forward),
                                               BY_DTYPE(f16, forward)};
static const backward_fn BACKWARD[3][2][2][2] = {BY_DTYPE(f32, backward), BY_DTYPE(bf16, backward),
                                                 BY_DTYPE(f16, backward)};

/* W^ [rows, cols] into out (and with grad [rows, cols] its gradients) for groups of width columns (the last one
   may be narrower: ceil(cols / width) groups a row; s, z, gscale, gzero [rows, groups]). dtypes: 0 float32,
   1 bfloat16, 2 float16 (w); the shifts o0 int8 (o0type 0) or int16 (1); grad and out float32 or bfloat16. One
   thread: the caller runs row ranges in parallel. */
void lowbit_learned_chain(const void *w, int wtype, const void *o0, int o0type, const float *delta, const float *s,
                          const float *z, const void *grad, int gtype, int64_t rows, int64_t cols, int64_t width,
                          float top, void *out, int otype, float *gdelta, float *gscale, float *gzero) {
    int64_t groups = (cols + width - 1) / width;
    forward_fn forward = FORWARD[wtype][o0type == 1][gtype == BF16][otype == BF16];
    backward_fn backward = BACKWARD[wtype][o0type == 1][gtype == BF16][otype == BF16];
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t g = 0; g < groups; ++g) {
            int64_t k = r * groups + g, i0 = r * cols + g * width;
            int64_t n = g + 1 < groups ? width : cols - g * width;
            if (!grad) {
                forward(w, o0, delta, s[k], z[k], top, i0, n, out);
            } else {
                float sums[3];
                backward(w, o0, delta, s[k], z[k], top, i0, n, out, grad, gdelta, sums);
                gscale[k] = sums[0] - sums[1] / s[k];
                gzero[k] = sums[2];
            }
        }
    }
}
