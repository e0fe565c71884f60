/* Per-neuron fixed-bin histograms of one batch of float32 activations, counted straight into the running counts.
 *
 * Built on first use by neuronhunter/stats/native.py (cc -O3 -fopenmp -shared) and called through ctypes. With
 * OpenMP it links the libgomp that torch has already loaded, so it runs on torch's own thread team: the neurons
 * are split between the threads, each incrementing only its own rows of ``counts`` (no atomics, no reduction).
 *
 * x          row-major activations: ``rows`` rows, row i starting at x + i * row_stride, ``d`` neurons each
 * keep       one byte per row: 0 = the row does not count (padding, position 0)
 * scale, shift: one float per neuron; the bin of v for neuron j is floor(clamp(v * scale[j] + shift[j], 0, top)),
 *            so 0 is the underflow bin and nb - 1 the overflow bin (top = nb - 0.5); NaN goes to the underflow bin
 * counts     int64 [d, nb], incremented in place
 * groups     NULL, or one uint64 bit mask per row: the groups (concept categories) the row belongs to
 * gcounts    int32 [n_groups, d, nb], incremented in place for each group bit set in a counted row
 */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define CHUNK 512

void nh_histogram_f32(const float *x, const uint8_t *keep, int64_t rows, int64_t d, int64_t row_stride,
                      const float *scale, const float *shift, float top, int64_t nb, int64_t *counts,
                      const uint64_t *groups, int64_t n_groups, int32_t *gcounts, int threads)
{
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
    {
        int nt = 1, tid = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        tid = omp_get_thread_num();
#else
        (void)threads;
#endif
        int64_t j0 = d * tid / nt, j1 = d * (tid + 1) / nt;
        int32_t bin[CHUNK];
        for (int64_t i = 0; i < rows; i++) {
            if (!keep[i])
                continue;
            const float *row = x + i * row_stride;
            uint64_t mask = groups ? groups[i] : 0;
            for (int64_t c0 = j0; c0 < j1; c0 += CHUNK) {
                int64_t n = j1 - c0 < CHUNK ? j1 - c0 : CHUNK;
                for (int64_t k = 0; k < n; k++) { /* vectorised: bins of a run of neurons */
                    float v = row[c0 + k] * scale[c0 + k] + shift[c0 + k];
                    v = v >= 0.0f ? v : 0.0f; /* also NaN */
                    v = v < top ? v : top;
                    bin[k] = (int32_t)v;
                }
                int64_t *c = counts + c0 * nb;
                for (int64_t k = 0; k < n; k++)
                    c[k * nb + bin[k]]++;
                for (int64_t g = 0; g < n_groups; g++) {
                    if (!((mask >> g) & 1u))
                        continue;
                    int32_t *gc = gcounts + (g * d + c0) * nb;
                    for (int64_t k = 0; k < n; k++)
                        gc[k * nb + bin[k]]++;
                }
            }
        }
    }
}
