/* Learned rounding's signed step with momentum (Signum) in one pass over a parameter (see
lowbit/methods/signed_step.py). Per element, with the gradient g, the momentum v (stored as float32 or bfloat16)
and the parameter p (float32):

    m = v * mu + g * keep          v <- m (rounded to nearest even where v is bfloat16)
    p <- clamp(p - rate * sign(m), lo, hi)

the same float32 operations in the same order as the torch path (two products, one sum: built with
-ffp-contract=off, no fused multiply-add; keep = 1 - mu in float32, passed in), so p and v are torch's bit for
bit. No momentum (v NULL): m = g.
sign(0) = 0: an element whose momentum is exactly 0 does not move. */

#include <stdint.h>
#include <string.h>
#include <math.h>

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

/* n elements of p (float32), g (float32) and v (float32 if v_bf16 == 0, else bfloat16; NULL: no momentum),
updated in place */
static inline float stepped(float p, float m, float rate, float lo, float hi) {
    float moved = p - rate * (float)((m > 0.0f) - (m < 0.0f));
    moved = moved < lo ? lo : moved;  /* torch's clamp: max(x, lo), then min(., hi) (as blends: vectorised) */
    return moved > hi ? hi : moved;
}

void lowbit_signed_step(float *p, const float *g, void *v, int v_bf16, int64_t n, float mu, float keep, float rate,
                        float lo, float hi) {
    if (v == NULL) {
        #pragma omp simd
        for (int64_t i = 0; i < n; i++) p[i] = stepped(p[i], g[i], rate, lo, hi);
    } else if (v_bf16) {
        uint16_t *vb = (uint16_t *)v;
        #pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            float m = from_bf16(vb[i]) * mu + g[i] * keep;
            vb[i] = to_bf16(m);
            p[i] = stepped(p[i], m, rate, lo, hi);
        }
    } else {
        float *vf = (float *)v;
        #pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            float m = vf[i] * mu + g[i] * keep;
            vf[i] = m;
            p[i] = stepped(p[i], m, rate, lo, hi);
        }
    }
}
