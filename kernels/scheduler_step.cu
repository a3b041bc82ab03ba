// One scheduler update as a linear combination with per-step coefficients computed on the host.
//
//     x    <- a*x + b*eps + c*prev + d*noise
//     prev <- e*x + f*eps          (x before the update: the denoised estimate x0)
//
// evaluated in fp32, term by term in that order. eps is the guided noise prediction. `prev` may be
// null (then c must be 0); it is read only where c != 0, so its first use need not be initialized,
// and written wherever it is non-null. `noise` may be null (then d is ignored). The coefficient
// formulas for Euler, Euler ancestral, DPM++ 2M and DDIM, and the numpy twin, are in
// trt_sdxl.kernels (StepCoefficients and its constructors, scheduler_step).
#include "common.cuh"

extern "C" __global__ void scheduler_step_f32(float* x, float* prev, const float* eps, const float* noise,
                                              float a, float b, float c, float d, float e, float f, long long n) {
    for (long long i = first_index(); i < n; i += grid_stride()) {
        float xi = x[i];
        float ei = eps[i];
        float next = a * xi + b * ei;
        if (c != 0.0f) next = next + c * prev[i];
        if (noise) next = next + d * noise[i];
        if (prev) prev[i] = e * xi + f * ei;
        x[i] = next;
    }
}
