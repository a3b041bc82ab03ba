// Scale an fp32 tensor and cast it to an engine's input dtype, optionally writing several copies.
//
//     out[k * n + i] = cast(x[i] * scale)    for k < copies, i < n
//
// Serves two steps of the pipeline:
// - the UNet input: the scheduler's `scale_model_input` (Euler: scale = 1 / sqrt(sigma^2 + 1),
//   DPM++ and DDIM: scale = 1) into both halves of the classifier-free-guidance batch (copies = 2);
// - the VAE input: latents / scaling_factor (scale = 1 / scaling_factor, copies = 1).
// The numpy twin is trt_sdxl.kernels.scale_cast.
#include "common.cuh"

template <typename T>
__device__ void scale_cast(T* out, const float* x, float scale, long long n, int copies) {
    for (long long i = first_index(); i < n; i += grid_stride()) {
        T v = from_float<T>(x[i] * scale);
        for (int k = 0; k < copies; ++k) out[k * n + i] = v;
    }
}

extern "C" __global__ void scale_cast_f32(float* out, const float* x, float scale, long long n, int copies) {
    scale_cast(out, x, scale, n, copies);
}

extern "C" __global__ void scale_cast_f16(half_t* out, const float* x, float scale, long long n, int copies) {
    scale_cast(out, x, scale, n, copies);
}

extern "C" __global__ void scale_cast_bf16(bfloat16_t* out, const float* x, float scale, long long n, int copies) {
    scale_cast(out, x, scale, n, copies);
}
