// Classifier-free guidance: one guided noise prediction from the UNet's doubled batch.
//
// noise_pred holds 2n elements in diffusers' order, the unconditional half first
// ([2B, C, h, w], rows 0..B-1 unconditional, rows B..2B-1 conditional); out holds n fp32 elements:
//     out = uncond + guidance_scale * (cond - uncond)
// evaluated in fp32, in that order (the numpy twin is trt_sdxl.kernels.cfg_combine).
#include "common.cuh"

template <typename T>
__device__ void cfg_combine(float* out, const T* noise_pred, float guidance_scale, long long n) {
    for (long long i = first_index(); i < n; i += grid_stride()) {
        float uncond = to_float(noise_pred[i]);
        float cond = to_float(noise_pred[n + i]);
        out[i] = uncond + guidance_scale * (cond - uncond);
    }
}

extern "C" __global__ void cfg_combine_f32(float* out, const float* noise_pred, float guidance_scale, long long n) {
    cfg_combine(out, noise_pred, guidance_scale, n);
}

extern "C" __global__ void cfg_combine_f16(float* out, const half_t* noise_pred, float guidance_scale, long long n) {
    cfg_combine(out, noise_pred, guidance_scale, n);
}

extern "C" __global__ void cfg_combine_bf16(float* out, const bfloat16_t* noise_pred, float guidance_scale, long long n) {
    cfg_combine(out, noise_pred, guidance_scale, n);
}
