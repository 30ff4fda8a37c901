/* The grid-neighbour search of llama.cpp's lattice encoders (iq2_find_best_neighbour / iq3_find_best_neighbour in
 * ggml-quants.c), for many off-grid groups in one call. The numpy version in lowbit/formats/gguf/neighbours.py
 * computes the same thing with [candidates, dim] temporaries; this loop keeps them in registers.
 *
 * Bit-exactness: float32 throughout, the error summed in i order as  d2 += waux[i]*diff*diff  with
 * diff = scale*p[i] - x[i]; a candidate is kept only if d2 < best (best starts at FLT_MAX, so NaN or overflow never
 * wins). Build without -ffast-math and with -ffp-contract=off: no reassociation, no fused multiply-adds — the
 * llama.cpp build compared against rounds every product.
 */
#include <float.h>
#include <stdint.h>

/* points [N, dim]; neighbour list of key u: flat[start[u] .. start[u] + count[u]); keys [m]; xval, waux [m, dim];
 * scale [m]. Writes out[g] = the best point's index. Returns -1, or the first group every candidate of which
 * overflows (the caller raises: llama.cpp aborts there). */
int64_t lowbit_best_neighbours(const float *points, int64_t dim, const int64_t *start, const int64_t *count,
                               const int64_t *flat, const int64_t *keys, const float *xval, const float *waux,
                               const float *scale, int64_t m, int64_t *out) {
    for (int64_t g = 0; g < m; ++g) {
        const int64_t u = keys[g];
        const int64_t *cand = flat + start[u];
        const float *x = xval + g * dim, *w = waux + g * dim;
        const float s = scale[g];
        float best = FLT_MAX;
        int64_t index = -1;
        for (int64_t j = 0; j < count[u]; ++j) {
            const float *p = points + (int64_t)cand[j] * dim;
            float d2 = 0.0f;
            for (int64_t i = 0; i < dim; ++i) {
                const float diff = s * p[i] - x[i];
                d2 += w[i] * diff * diff;
            }
            if (d2 < best) {
                best = d2;
                index = cand[j];
            }
        }
        if (index < 0) return g;
        out[g] = index;
    }
    return -1;
}
