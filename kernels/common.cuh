// Storage types of the tensors the engines exchange, their fp32 conversions, and the grid-stride loop.
//
// Self-contained on purpose: NVRTC ships no cuda_fp16.h / cuda_bf16.h, so fp16 converts with the
// PTX `cvt` instructions cuda_fp16.h itself uses, and bf16 with integer bit arithmetic (which also
// works on SM 7.5, where PTX has no bf16 conversion). All conversions to 16 bits round to nearest
// even, as numpy's astype(float16) and ml_dtypes' astype(bfloat16) do.
#pragma once

struct half_t { unsigned short bits; };      // IEEE binary16
struct bfloat16_t { unsigned short bits; };  // the upper half of an IEEE binary32

__device__ __forceinline__ float to_float(float v) { return v; }

__device__ __forceinline__ float to_float(half_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}

__device__ __forceinline__ float to_float(bfloat16_t v) { return __uint_as_float((unsigned)v.bits << 16); }

template <typename T> __device__ __forceinline__ T from_float(float v);

template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }

template <> __device__ __forceinline__ half_t from_float<half_t>(float v) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
    return h;
}

template <> __device__ __forceinline__ bfloat16_t from_float<bfloat16_t>(float v) {
    unsigned u = __float_as_uint(v);
    bfloat16_t b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b.bits = (unsigned short)((u >> 16) | 0x0040u);  // NaN stays NaN (quiet), sign kept
    } else {
        b.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round half to even
    }
    return b;
}

// for (long long i = first_index(); i < n; i += grid_stride()): any grid size covers any n.
__device__ __forceinline__ long long first_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long grid_stride() { return (long long)gridDim.x * blockDim.x; }
