/* Exemplar updates of one batch, in place: the per-neuron top-k windows and the quantile-band samples.
 *
 * Built with histogram.c into the same library (neuronhunter/stats/native.py) and called through ctypes by
 * neuronhunter/stats/exemplars.py, whose torch code does the same (and is the reference the tests compare to).
 * Most (window, neuron) pairs of a batch do not enter a neuron's lists once they have filled, so a loop that checks
 * each pair against the list's last entry and inserts the rare winners costs a few microseconds per layer, where
 * the tensor version pays for its gathers and sorts on every call.
 *
 * Orders (the same as the torch code, so that results do not depend on batching, sharding or merge order):
 *   top-k: higher value first; equal values: smaller window id first; empty slots (value -inf, window -1) last.
 *   bands: smaller hash first (hashes are distinct per window); empty slots have hash INT64_MAX and window -1.
 */
#include <math.h>
#include <stdint.h>

/* Offer ``n`` windows to the top-k lists of ``d`` neurons.
 * cand ``[n, d]`` window peaks (row-major, float32); cpos ``[n, d]`` int64 positions of the peaks; cwin ``[n]``
 * window ids. A peak that is -inf or NaN (no counted token) is no candidate.
 * values ``[k, d]`` float32, window ``[k, d]`` int64, pos ``[k, d]`` int32: the lists, updated in place. */
void nh_topk_update(const float *cand, const int64_t *cpos, const int64_t *cwin, int64_t n, int64_t d, int64_t k,
                    float *values, int64_t *window, int32_t *pos)
{
    for (int64_t i = 0; i < n; i++) {
        const float *row = cand + i * d;
        const int64_t w = cwin[i];
        for (int64_t j = 0; j < d; j++) {
            const float v = row[j];
            if (isnan(v) || v == -INFINITY)
                continue;
            /* does it beat entry p? (higher value, or equal value and smaller window id; empty slots last) */
#define BEATS(p) (v > values[(p) * d + j] || (v == values[(p) * d + j] && \
                  (window[(p) * d + j] < 0 || w < window[(p) * d + j])))
            if (!BEATS(k - 1))
                continue;
            int64_t p = k - 1;
            while (p > 0 && BEATS(p - 1)) {
                values[p * d + j] = values[(p - 1) * d + j];
                window[p * d + j] = window[(p - 1) * d + j];
                pos[p * d + j] = pos[(p - 1) * d + j];
                p--;
            }
#undef BEATS
            values[p * d + j] = v;
            window[p * d + j] = w;
            pos[p * d + j] = (int32_t)cpos[i * d + j];
        }
    }
}

/* Offer ``n`` windows to the band samples of ``d`` neurons.
 * peak ``[n, d]`` float32 window peaks (not finite: no candidate), cpos ``[n, d]`` int64, cwin ``[n]`` window ids,
 * chash ``[n]`` their seeded hashes; scale ``[d]`` float32 (already clamped to > 0); inner ``[n_bands - 1]`` float32
 * the inner band edges as fractions of the scale (band = the number of inner edges <= peak / scale).
 * hash, window ``[n_bands, r, d]`` int64, pos int32, value float32: the samples, updated in place. */
void nh_bands_update(const float *peak, const int64_t *cpos, const int64_t *cwin, const int64_t *chash, int64_t n,
                     int64_t d, const float *scale, const float *inner, int64_t n_bands, int64_t r,
                     int64_t *hash, int64_t *window, int32_t *pos, float *value)
{
    for (int64_t i = 0; i < n; i++) {
        const float *row = peak + i * d;
        const int64_t w = cwin[i], h = chash[i];
        for (int64_t j = 0; j < d; j++) {
            const float v = row[j];
            if (!isfinite(v))
                continue;
            const float rel = v / scale[j];
            int64_t b = 0;
            while (b < n_bands - 1 && rel >= inner[b])
                b++;
            const int64_t base = b * r * d + j;
            if (!(h < hash[base + (r - 1) * d]))
                continue;
            int64_t p = r - 1;
            while (p > 0 && h < hash[base + (p - 1) * d]) {
                hash[base + p * d] = hash[base + (p - 1) * d];
                window[base + p * d] = window[base + (p - 1) * d];
                pos[base + p * d] = pos[base + (p - 1) * d];
                value[base + p * d] = value[base + (p - 1) * d];
                p--;
            }
            hash[base + p * d] = h;
            window[base + p * d] = w;
            pos[base + p * d] = (int32_t)cpos[i * d + j];
            value[base + p * d] = v;
        }
    }
}
