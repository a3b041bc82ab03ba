// VAE output to 8-bit RGB: [B, 3, H, W] fp32 in [-1, 1] -> [B, H, W, 3] uint8.
//
//     rgb = round_half_even(clamp(x / 2 + 0.5, 0, 1) * 255)
//
// as diffusers' VaeImageProcessor.postprocess + numpy_to_pil do in fp32
// ((image / 2 + 0.5).clamp(0, 1), then (images * 255).round().astype("uint8")). NaN becomes 0
// (fmaxf returns the non-NaN operand). The numpy twin is trt_sdxl.kernels.image_to_rgb8.
#include "common.cuh"

extern "C" __global__ void image_to_rgb8_f32(unsigned char* out, const float* image, int batch, int height, int width) {
    long long plane = (long long)height * width;
    long long n = (long long)batch * plane * 3;
    for (long long o = first_index(); o < n; o += grid_stride()) {
        // o indexes out [B, H, W, 3]: o = (b * plane + p) * 3 + channel
        long long channel = o % 3;
        long long p = (o / 3) % plane;
        long long b = o / (3 * plane);
        float v = image[(b * 3 + channel) * plane + p] * 0.5f + 0.5f;
        v = fminf(fmaxf(v, 0.0f), 1.0f);
        out[o] = (unsigned char)rintf(v * 255.0f);
    }
}
