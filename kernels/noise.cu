// Gaussian noise from a counter-based generator: the same (seed, step) gives the same noise on any
// run, GPU or launch geometry.
//
// Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC'11;
// constants and key schedule as in Random123's philox.h) maps a 128-bit counter and a 64-bit key to
// four uint32 words. Element i of a tensor takes word i % 4 of the block with
//     counter = (g mod 2^32, g div 2^32, step, 0), g = i / 4,    key = (seed mod 2^32, seed div 2^32).
// Box-Muller turns words (w0, w1) into normals (z0, z1) and (w2, w3) into (z2, z3):
//     u = (2 * (w >> 9) + 1) / 2^24          (exact in fp32, in the open interval (0, 1))
//     r = sqrt(-2 ln u_even),  z_even = r cos(2 pi u_odd),  z_odd = r sin(2 pi u_odd)
// The numpy twin is trt_sdxl.kernels (philox4x32_10, philox_uint32, gaussian_noise).
#include "common.cuh"

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u  // golden ratio
#define PHILOX_W1 0xBB67AE85u  // sqrt(3) - 1

struct philox_block { unsigned w[4]; };

__device__ __forceinline__ philox_block philox4x32_10(unsigned c0, unsigned c1, unsigned c2, unsigned c3,
                                                      unsigned k0, unsigned k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        unsigned hi0 = __umulhi(PHILOX_M0, c0), lo0 = PHILOX_M0 * c0;
        unsigned hi1 = __umulhi(PHILOX_M1, c2), lo1 = PHILOX_M1 * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    return {{c0, c1, c2, c3}};
}

__device__ __forceinline__ philox_block philox_for_group(unsigned long long seed, unsigned step, long long g) {
    return philox4x32_10((unsigned)g, (unsigned)((unsigned long long)g >> 32), step, 0u,
                         (unsigned)seed, (unsigned)(seed >> 32));
}

__device__ __forceinline__ float uniform_open(unsigned w) {
    return (float)(2u * (w >> 9) + 1u) * 5.9604644775390625e-8f;  // * 2^-24
}

// The raw uint32 stream (element i = word i % 4 of block i / 4), for checking the generator itself.
extern "C" __global__ void philox_uint32(unsigned* out, unsigned long long seed, unsigned step, long long n) {
    long long groups = (n + 3) / 4;
    for (long long g = first_index(); g < groups; g += grid_stride()) {
        philox_block r = philox_for_group(seed, step, g);
        for (int k = 0; k < 4 && 4 * g + k < n; ++k) out[4 * g + k] = r.w[k];
    }
}

// out[i] = scale * z_i; one thread per block of four elements.
extern "C" __global__ void gaussian_noise_f32(float* out, unsigned long long seed, unsigned step, float scale,
                                              long long n) {
    long long groups = (n + 3) / 4;
    for (long long g = first_index(); g < groups; g += grid_stride()) {
        philox_block r = philox_for_group(seed, step, g);
        float z[4];
        for (int pair = 0; pair < 2; ++pair) {
            float radius = sqrtf(-2.0f * logf(uniform_open(r.w[2 * pair])));
            float s, c;
            sincospif(2.0f * uniform_open(r.w[2 * pair + 1]), &s, &c);
            z[2 * pair] = radius * c;
            z[2 * pair + 1] = radius * s;
        }
        for (int k = 0; k < 4 && 4 * g + k < n; ++k) out[4 * g + k] = scale * z[k];
    }
}
