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
/* a before b in a top-k list: higher value, or equal value and smaller window id; empty slots (window < 0) last */
static inline int topk_before(float va, int64_t wa, float vb, int64_t wb)
{
    return va > vb || (va == vb && (wb < 0 || (wa >= 0 && wa < wb)));
}

void nh_topk_update(const float *cand, const int64_t *cpos, const int64_t *cwin, int64_t n, int64_t d, int64_t k,
                    float *values, int64_t *window, int32_t *pos)
{
    /* neuron by neuron: the windows that beat the list's last entry are sorted among themselves (few: n is one
     * batch), then merged with the list in one pass, instead of being inserted one by one (k moves each) */
    float cv[n > 0 ? n : 1], lv[k];
    int64_t cw[n > 0 ? n : 1], lw[k];
    int32_t cp[n > 0 ? n : 1], lp[k];
    for (int64_t j = 0; j < d; j++) {
        int64_t m = 0;
        const float last_v = values[(k - 1) * d + j];
        const int64_t last_w = window[(k - 1) * d + j];
        for (int64_t i = 0; i < n; i++) {
            const float v = cand[i * d + j];
            if (isnan(v) || v == -INFINITY || !topk_before(v, cwin[i], last_v, last_w))
                continue;
            int64_t q = m++; /* insertion sort of the winners */
            while (q > 0 && topk_before(v, cwin[i], cv[q - 1], cw[q - 1])) {
                cv[q] = cv[q - 1];
                cw[q] = cw[q - 1];
                cp[q] = cp[q - 1];
                q--;
            }
            cv[q] = v;
            cw[q] = cwin[i];
            cp[q] = (int32_t)cpos[i * d + j];
        }
        if (m == 0)
            continue;
        for (int64_t p = 0; p < k; p++) {
            lv[p] = values[p * d + j];
            lw[p] = window[p * d + j];
            lp[p] = pos[p * d + j];
        }
        int64_t a = 0, c = 0;
        for (int64_t p = 0; p < k; p++) { /* merge the two sorted lists, keeping the first k */
            if (c < m && topk_before(cv[c], cw[c], lv[a], lw[a])) { /* a <= p < k: the list never runs out */
                values[p * d + j] = cv[c];
                window[p * d + j] = cw[c];
                pos[p * d + j] = cp[c];
                c++;
            } else {
                values[p * d + j] = lv[a];
                window[p * d + j] = lw[a];
                pos[p * d + j] = lp[a];
                a++;
            }
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
    for (int64_t j = 0; j < d; j++) { /* neuron by neuron, as above */
        for (int64_t i = 0; i < n; i++) {
            const float v = peak[i * d + j];
            const int64_t w = cwin[i], h = chash[i];
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
