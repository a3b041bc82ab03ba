"""Roofline speed model of the full-size SDXL base UNet: FP16 against each 8-bit recipe, per GPU.

Every conv, linear and attention of one UNet call (SDXL base 1.0, 1024x1024 = 128x128 latent, CFG
batch 2) and the memory-bound ops around them (GroupNorm+SiLU, LayerNorm, GEGLU gate, residual
adds, nearest upsampling, quantize passes) are listed with their FLOPs, bytes moved and exp count,
derived analytically from the packaged config (trt_sdxl/configs/sdxl_base_1.0/unet.json; no weights
are read). Which layers run in 8 bits comes from trt_sdxl.quant.recipe, by diffusers module path.

Time per op = max(FLOPs / tensor peak of its precision, bytes / memory bandwidth, exps / SFU exp
rate), summed over the ops; peaks are the published dense (non-sparse) figures in GPUS, each with
its source. Assumptions (also in the JSON):

- FP16 GEMMs accumulate in FP32 (TensorRT's choice for accuracy is assumed; GeForce cards run that
  at half their FP16-accumulate rate); INT8 accumulates in INT32, FP8 in FP32.
- Attention is one fused (flash-style) kernel: reads q, k, v once, writes the output; the score
  matrix stays on chip. FLOPs 4*B*Sq*Sk*C, exps B*heads*Sq*Sk. In FP8 recipes both BMMs run at
  the FP8 rate (q, k, v read as FP8; the softmax output quantized inside the kernel).
- A conv/linear reads its input once, its weights once and writes its output (ideal caching; bias
  and the time-embedding add in the epilogue). Norm-SiLU, GEGLU's gate multiply, residual adds and
  upsampling are one pass each (read inputs, write output); skip concatenation and layout changes
  are free (producers write in place). SiLU and GELU count one exp per element.
- "fused": each activation quantize runs in its producer's epilogue, which writes the 8-bit copy
  (and the FP16 tensor only if another consumer reads it); the 8-bit layer reads 1 byte/element.
  "unfused": every tensor is written in FP16 and each quantize is its own pass (read 2 bytes,
  write 1 byte per element). One quantize per (tensor, scale): layers of a SmoothQuant group
  reading one tensor (attn1 q/k/v, attn2 k/v) share it. Weight Q/DQ are folded at build time and
  dequantize into the GEMM's output scale: neither costs a pass.

    python tools/roofline.py [--json PATH] [--resolution 1024] [--gpu "RTX 4090"] [--layers RECIPE]

Prints the table (markdown) and a per-group breakdown for --gpu; writes tools/roofline.json.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

from trt_sdxl import configs  # noqa: E402
from trt_sdxl.files import write_json  # noqa: E402
from trt_sdxl.quant import recipe as R  # noqa: E402
from trt_sdxl.unet_config import UNetConfig  # noqa: E402

JSON_OUT = REPO / "tools" / "roofline.json"
REPORTED = ("fp16", "int8", "int8_level3", "fp8", "fp8_gemm", "nvidia_modelopt", "nvidia_modelopt_fp8")
TEXT_TOKENS = 77

# ---------------------------------------------------------------- published peaks

# The documents the figures in GPUS are taken from. Their tables were checked against reproductions
# (spec databases, reviews); the per-GPU comments below say which figure each document gives.
SOURCES = {
    "ada": ("NVIDIA Ada GPU Architecture whitepaper (v2.01), Appendix A (GeForce RTX 4090, RTX 6000 Ada)",
            "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf"),
    "rtx6000ada": ("NVIDIA RTX 6000 Ada Generation datasheet",
                   "https://www.nvidia.com/en-us/design-visualization/rtx-6000/"),
    "l40s": ("NVIDIA L40S datasheet", "https://www.nvidia.com/en-us/data-center/l40s/"),
    "h100": ("NVIDIA H100 Tensor Core GPU datasheet (H100 SXM column)",
             "https://www.nvidia.com/en-us/data-center/h100/"),
    "h200": ("NVIDIA H200 Tensor Core GPU datasheet (H200 SXM column)",
             "https://www.nvidia.com/en-us/data-center/h200/"),
    "blackwell_rtx": ("NVIDIA RTX Blackwell GPU Architecture whitepaper, Appendix (GeForce RTX 5090)",
                      "https://images.nvidia.com/aem-dam/Solutions/geforce/blackwell/"
                      "nvidia-rtx-blackwell-gpu-architecture.pdf"),
    "cuda_guide": ("CUDA C++ Programming Guide, 'Arithmetic Instructions' throughput table (32-bit exp2, "
                   "rsqrt, log2, sin, cos: 16 results per clock per SM on compute capability 8.x and 9.0)",
                   "https://docs.nvidia.com/cuda/cuda-c-programming-guide/index.html#arithmetic-instructions"),
    "fa3": ("Shah et al., FlashAttention-3 (2024): H100 SXM5 has 989 TFLOPS of FP16 matmul but 3.9 TFLOPS "
            "of special functions (cross-check of the exp rate)", "https://arxiv.org/abs/2407.08608"),
    "modelopt": ("NVIDIA TensorRT-Model-Optimizer benchmark.md, section 2 'PTQ for Stable Diffusion' (SDXL 1.0 "
                 "base, 1024x1024, 30 steps, batch 1, TensorRT 9.3; pipeline latency)",
                 "https://github.com/NVIDIA/TensorRT-Model-Optimizer/blob/main/benchmark.md"),
}

# MUFU.EX2 results per SM per clock (sources: cuda_guide; fa3 agrees for H100). Compute capability
# 12.0 is assumed to keep Ada's 4 SFU quads per SM: the guide's table is not checked for it here.
EX2_PER_SM_PER_CLOCK = 16


@dataclass(frozen=True)
class Gpu:
    """Dense peaks: tensor TFLOPS/TOPS per precision, DRAM GB/s, and the SM count x clock for the SFU."""

    name: str
    sms: int
    clock_mhz: float  # the clock the tensor peaks are quoted at (boost)
    fp16_acc32: float
    fp16_acc16: float
    int8: float
    fp8_acc32: float
    bandwidth_gbs: float
    sources: tuple[str, ...]
    note: str = ""

    @property
    def exp_per_s(self) -> float:
        return self.sms * EX2_PER_SM_PER_CLOCK * self.clock_mhz * 1e6

    def peak(self, precision: str, fp16_accumulate: bool = False) -> float:
        """Tensor FLOP/s (or OP/s) of a GEMM in `precision` ("fp16", "int8", "fp8")."""
        if precision == "fp16":
            return (self.fp16_acc16 if fp16_accumulate else self.fp16_acc32) * 1e12
        return {"int8": self.int8, "fp8": self.fp8_acc32}[precision] * 1e12


GPUS = (
    # AD102, 128 SMs at 2520 MHz boost. GeForce: FP16 and FP8 with FP32 accumulate at half the
    # FP16-accumulate rate (165.2 / 330.3 vs 330.3 / 660.6); INT8 660.6 TOPS (1321.2 sparse).
    Gpu("RTX 4090", 128, 2520, 165.2, 330.3, 660.6, 330.3, 1008, ("ada",)),
    # AD102, 142 SMs at 2505 MHz; the datasheet's "1,457 TFLOPS tensor" is FP8 with sparsity. Pro card:
    # no accumulate halving. 300 W board power: sustained clocks under tensor load sit below boost.
    Gpu("RTX 6000 Ada", 142, 2505, 364.2, 364.2, 728.5, 728.5, 960, ("ada", "rtx6000ada")),
    # AD102, 142 SMs at 2520 MHz; datasheet FP16 362.05 | 733*, FP8 733 | 1,466*, INT8 733 | 1,466* (* sparse).
    Gpu("L40S", 142, 2520, 362.05, 362.05, 733.0, 733.0, 864, ("l40s",)),
    # GH100, 132 SMs; datasheet FP16 1,979* / FP8 3,958* / INT8 3,958* with sparsity, 3.35 TB/s. The
    # 989.4 dense TFLOPS correspond to 4096 FLOP/clock/SM at 1830 MHz, the clock used for the SFU.
    Gpu("H100 SXM", 132, 1830, 989.4, 989.4, 1978.9, 1978.9, 3350, ("h100", "fa3")),
    # Same GH100 compute as H100 SXM; HBM3e at 4.8 TB/s.
    Gpu("H200 SXM", 132, 1830, 989.4, 989.4, 1978.9, 1978.9, 4800, ("h200",)),
    # GB202, 170 SMs at 2407 MHz. GeForce halving as on Ada: FP16 209.5 (FP32 acc) / 419 (FP16 acc),
    # FP8 419 (FP32 acc) / 838 (FP16 acc), INT8 838 TOPS; GDDR7 1792 GB/s.
    Gpu("RTX 5090", 170, 2407, 209.5, 419.0, 838.0, 419.0, 1792, ("blackwell_rtx",),
        note="exp rate assumes 16 MUFU.EX2 per SM per clock on compute capability 12.0"),
)
GPU_BY_NAME = {g.name: g for g in GPUS}

# NVIDIA's measured pipeline speed-ups over FP16 (source: modelopt): INT8 is ModelOpt's level 2.5
# (our `nvidia_modelopt`), FP8 its level 4 (`nvidia_modelopt_fp8`); latencies are whole 30-step
# pipelines in ms (text encoders and VAE included). H100: the speed-ups were quoted in the project's
# issue; the benchmark.md versions read here list only the three Ada cards, so they are unverified.
NVIDIA_MEASURED = {
    "RTX 6000 Ada": {"nvidia_modelopt": 1.43, "nvidia_modelopt_fp8": 1.45,
                     "latency_ms": {"nvidia_modelopt": 2479.19, "nvidia_modelopt_fp8": 2441.16}},
    "RTX 4090": {"nvidia_modelopt": 1.20, "nvidia_modelopt_fp8": 1.14,
                 "latency_ms": {"nvidia_modelopt": 2058.11, "nvidia_modelopt_fp8": 2161.38}},
    "L40S": {"nvidia_modelopt": 1.25, "nvidia_modelopt_fp8": 1.35,
             "latency_ms": {"nvidia_modelopt": 2338.88, "nvidia_modelopt_fp8": 2167.82}},
    "H100 SXM": {"nvidia_modelopt": 1.08, "nvidia_modelopt_fp8": 1.07, "unverified": True},
}
NVIDIA_STEPS = 30
NVIDIA_RESOLUTION = 1024

# ---------------------------------------------------------------- the UNet as a list of ops

# Layer groups by module path (the quant_report MAC split), then the memory-bound op groups.
GEMM_GROUPS = (
    (r"\.ff\.net\.(0\.proj|2)$", "feed-forward"),
    (r"\.attn[12]\.to_[qkv]$", "attention q/k/v"),
    (r"\.attn[12]\.attention$", "attention BMMs + softmax"),
    (r"\.attn[12]\.to_out\.0$", "to_out"),
    (r"\.resnets\.\d+\.conv[12]$", "resnet convs"),
    (r"samplers\.0\.conv$", "samplers"),
    (r"\.proj_(in|out)$", "proj_in/out"),
    (r"\.conv_shortcut$", "conv_shortcut"),
    (r"^(conv_in|conv_out|time_embedding\..+|add_embedding\..+)$|\.time_emb_proj$", "conv_in/out, embeddings"),
)
MEMORY_GROUPS = ("group norm (+ SiLU)", "layer norm", "GEGLU gate", "residual adds", "upsample", "skip concat",
                 "quantize passes")


def gemm_group(path: str) -> str:
    for pattern, group in GEMM_GROUPS:
        if re.search(pattern, path):
            return group
    raise ValueError(f"{path}: no layer group")


@dataclass
class Op:
    """One kernel's work: FLOPs, exps, weight elements, the tensors it reads and the one it writes."""

    name: str  # the module path for GEMMs and attention, a descriptive path otherwise
    kind: str  # "conv" | "linear" | "attention" | "memory"
    group: str
    reads: tuple[str, ...]
    out: str
    flops: int = 0
    macs: int = 0
    exps: int = 0
    weights: int = 0
    in_place: bool = False  # a skip concatenation: its inputs are already where it reads them, nothing moves


@dataclass
class UNetOps:
    """The ops of one UNet call in execution order; `tensors` maps a tensor name to its element count."""

    batch: int
    latent: int
    cross_width: int  # encoder_hidden_states width (attn2 k/v input)
    temb_width: int  # time embedding width (every resnet's time_emb_proj input)
    ops: list[Op] = field(default_factory=list)
    tensors: dict[str, int] = field(default_factory=dict)
    inputs: set[str] = field(default_factory=set)

    def input(self, name: str, elements: int) -> str:
        self.tensors[name] = elements
        self.inputs.add(name)
        return name

    def add_op(self, op: Op, out_elements: int) -> str:
        if op.out in self.tensors:
            raise ValueError(f"tensor {op.out} written twice")
        self.tensors[op.out] = out_elements
        self.ops.append(op)
        return op.out

    # -- GEMMs: MACs as the network's MacRecords count them (trt_sdxl.layers)

    def conv(self, path: str, x: str, cin: int, cout: int, side: int, kernel: int, stride: int = 1):
        out_side = side // stride
        macs = self.batch * cout * out_side * out_side * cin * kernel * kernel
        name = self.add_op(Op(path, "conv", gemm_group(path), (x,), path, 2 * macs, macs,
                              weights=cout * cin * kernel * kernel), self.batch * cout * out_side * out_side)
        return name, out_side

    def linear(self, path: str, x: str, tokens: int, fin: int, fout: int) -> str:
        macs = self.batch * tokens * fin * fout
        return self.add_op(Op(path, "linear", gemm_group(path), (x,), path, 2 * macs, macs, weights=fin * fout),
                           self.batch * tokens * fout)

    def attention(self, path: str, q: str, k: str, v: str, sq: int, sk: int, channels: int, heads: int) -> str:
        macs = 2 * self.batch * sq * sk * channels  # QK^T and PV: B*heads*Sq*Sk*head_dim each
        name = f"{path}.attention"
        return self.add_op(Op(name, "attention", gemm_group(name), (q, k, v), name, 2 * macs, macs,
                              exps=self.batch * heads * sq * sk), self.batch * sq * channels)

    # -- memory-bound ops

    def memory(self, name: str, group: str, reads: tuple[str, ...], out_elements: int, exps: int = 0,
               in_place: bool = False) -> str:
        return self.add_op(Op(name, "memory", group, reads, name, exps=exps, in_place=in_place), out_elements)


def resnet(u: UNetOps, x: str, temb: str, path: str, cin: int, cout: int, side: int) -> str:
    """ResnetBlock2D: GN-SiLU-conv1 (+ time projection), GN-SiLU-conv2, + (1x1-projected) input."""
    n_in, n_out = u.batch * cin * side * side, u.batch * cout * side * side
    h = u.memory(f"{path}.norm1", "group norm (+ SiLU)", (x,), n_in, exps=n_in)
    u.linear(f"{path}.time_emb_proj", temb, 1, u.temb_width, cout)  # [B, T] -> [B, O], added in conv1's epilogue
    h, _ = u.conv(f"{path}.conv1", h, cin, cout, side, 3)
    h = u.memory(f"{path}.norm2", "group norm (+ SiLU)", (h,), n_out, exps=n_out)
    h, _ = u.conv(f"{path}.conv2", h, cout, cout, side, 3)
    shortcut = x if cin == cout else u.conv(f"{path}.conv_shortcut", x, cin, cout, side, 1)[0]
    return u.memory(f"{path}.residual", "residual adds", (shortcut, h), n_out)


def transformer_block(u: UNetOps, x: str, context: str, path: str, tokens: int, c: int, heads: int) -> str:
    """BasicTransformerBlock: self-attention, cross-attention, GEGLU feed-forward, each pre-LN + residual."""
    n = u.batch * tokens * c
    for i, attn in ((1, "attn1"), (2, "attn2")):
        h = u.memory(f"{path}.norm{i}", "layer norm", (x,), n)
        # self-attention: k, v from the normed tokens; cross-attention: from the 77 text tokens
        kv, kv_tokens, kv_width = (h, tokens, c) if i == 1 else (context, TEXT_TOKENS, u.cross_width)
        q = u.linear(f"{path}.{attn}.to_q", h, tokens, c, c)
        k = u.linear(f"{path}.{attn}.to_k", kv, kv_tokens, kv_width, c)
        v = u.linear(f"{path}.{attn}.to_v", kv, kv_tokens, kv_width, c)
        o = u.attention(f"{path}.{attn}", q, k, v, tokens, kv_tokens, c, heads)  # [B, S, C]
        o = u.linear(f"{path}.{attn}.to_out.0", o, tokens, c, c)
        x = u.memory(f"{path}.{attn}.residual", "residual adds", (x, o), n)
    h = u.memory(f"{path}.norm3", "layer norm", (x,), n)
    h = u.linear(f"{path}.ff.net.0.proj", h, tokens, c, 8 * c)  # [B, S, 2 * 4C]
    h = u.memory(f"{path}.ff.net.0.gate", "GEGLU gate", (h,), 4 * n, exps=4 * n)  # h * gelu(gate): [B, S, 4C]
    h = u.linear(f"{path}.ff.net.2", h, tokens, 4 * c, c)
    return u.memory(f"{path}.ff.residual", "residual adds", (x, h), n)


def spatial_transformer(u: UNetOps, x: str, context: str, path: str, c: int, side: int, heads: int,
                        depth: int) -> str:
    """Transformer2DModel with linear projections: GN, proj_in, `depth` blocks, proj_out, + input."""
    tokens = side * side
    n = u.batch * tokens * c
    h = u.memory(f"{path}.norm", "group norm (+ SiLU)", (x,), n)  # GroupNorm alone, no SiLU
    h = u.linear(f"{path}.proj_in", h, tokens, c, c)
    for i in range(depth):
        h = transformer_block(u, h, context, f"{path}.transformer_blocks.{i}", tokens, c, heads)
    h = u.linear(f"{path}.proj_out", h, tokens, c, c)
    return u.memory(f"{path}.residual", "residual adds", (h, x), n)


def unet_ops(cfg: UNetConfig, batch: int = 2, latent: int = 128) -> UNetOps:
    """The ops of one SDXL UNet call on a [batch, 4, latent, latent] sample, walked like models/unet.py."""
    ch0, temb_dim = cfg.block_out_channels[0], cfg.time_embed_dim
    u = UNetOps(batch, latent, cfg.cross_attention_dim, temb_dim)
    sample = u.input("sample", batch * cfg.in_channels * latent * latent)
    context = u.input("encoder_hidden_states", batch * TEXT_TOKENS * cfg.cross_attention_dim)
    t_sin = u.input("timestep_embedding", batch * ch0)
    add_in = u.input("add_embedding.input", batch * cfg.projection_class_embeddings_input_dim)
    h = u.linear("time_embedding.linear_1", t_sin, 1, ch0, temb_dim)
    u.linear("time_embedding.linear_2", h, 1, temb_dim, temb_dim)
    h = u.linear("add_embedding.linear_1", add_in, 1, cfg.projection_class_embeddings_input_dim, temb_dim)
    temb = u.linear("add_embedding.linear_2", h, 1, temb_dim, temb_dim)  # + time emb, SiLU: tiny, in its epilogue

    side = latent
    h, _ = u.conv("conv_in", sample, cfg.in_channels, ch0, side, 3)
    skips = [(h, ch0)]
    c = ch0
    n = cfg.blocks
    for i in range(n):
        out = cfg.block_out_channels[i]
        for j in range(cfg.layers[i]):
            h = resnet(u, h, temb, f"down_blocks.{i}.resnets.{j}", c, out, side)
            c = out
            if cfg.down_attention[i]:
                h = spatial_transformer(u, h, context, f"down_blocks.{i}.attentions.{j}", c, side, cfg.heads[i],
                                        cfg.transformer_depth[i])
            skips.append((h, c))
        if i < n - 1:
            h, side = u.conv(f"down_blocks.{i}.downsamplers.0.conv", h, c, c, side, 3, stride=2)
            skips.append((h, c))

    h = resnet(u, h, temb, "mid_block.resnets.0", c, c, side)
    h = spatial_transformer(u, h, context, "mid_block.attentions.0", c, side, cfg.heads[-1], cfg.mid_depth)
    h = resnet(u, h, temb, "mid_block.resnets.1", c, c, side)

    for i in range(n):
        out = cfg.block_out_channels[n - 1 - i]
        for j in range(cfg.layers[n - 1 - i] + 1):
            skip, cs = skips.pop()
            path = f"up_blocks.{i}.resnets.{j}"
            h = u.memory(f"{path}.skip_concat", "skip concat", (h, skip), u.batch * (c + cs) * side * side,
                         in_place=True)
            h = resnet(u, h, temb, path, c + cs, out, side)
            c = out
            if cfg.up_attention[i]:
                h = spatial_transformer(u, h, context, f"up_blocks.{i}.attentions.{j}", c, side,
                                        cfg.heads[n - 1 - i], cfg.transformer_depth_up[i])
        if i < n - 1:
            h = u.memory(f"up_blocks.{i}.upsamplers.0.interpolate", "upsample", (h,), u.batch * c * 4 * side * side)
            side *= 2
            h, _ = u.conv(f"up_blocks.{i}.upsamplers.0.conv", h, c, c, side, 3)

    n_out = u.batch * c * side * side
    h = u.memory("conv_norm_out", "group norm (+ SiLU)", (h,), n_out, exps=n_out)
    u.conv("conv_out", h, c, cfg.out_channels, side, 3)
    return u


def sdxl_ops(resolution: int = 1024, batch: int = 2) -> UNetOps:
    cfg = UNetConfig.parse(configs.load("sdxl_base_1.0", "unet"))
    multiple = cfg.image_multiple
    if resolution <= 0 or resolution % multiple:
        raise ValueError(f"--resolution {resolution}: expected a positive multiple of {multiple}")
    return unet_ops(cfg, batch, resolution // 8)


# ---------------------------------------------------------------- which ops are 8-bit

def quantized(recipe: str, op: Op) -> bool:
    if recipe == "fp16" or op.kind == "memory":
        return False
    if op.kind == "attention":
        return bool(R.RECIPES[recipe]["attention_bmm"])
    return R.is_quantized(recipe, op.name)


def scale_owner(op: Op, tensor: str) -> str:
    """Who owns the quantize scale of `tensor` read by `op`: its SmoothQuant group (layers of a group
    reading one tensor share s, so the quantized tensor and its scale are the same), else the layer."""
    if op.kind == "attention":
        return f"{op.name}:{tensor}"
    rule = R.smoothing_rule(op.name)
    return rule[2] if rule else op.name


def mac_shares(u: UNetOps) -> dict[str, float]:
    total = sum(op.macs for op in u.ops)
    shares = {}
    for _, group in GEMM_GROUPS:
        shares[group] = sum(op.macs for op in u.ops if op.group == group) / total
    return shares


# ---------------------------------------------------------------- the roofline

@dataclass
class OpTime:
    op: str
    group: str
    seconds: float
    compute_s: float
    memory_s: float
    exp_s: float
    bytes: int
    precision: str

    @property
    def bound(self) -> str:
        return max((self.compute_s, "compute"), (self.memory_s, "memory"), (self.exp_s, "exp"))[1]


def op_times(u: UNetOps, gpu: Gpu, recipe: str, fused: bool, fp16_accumulate: bool = False) -> list[OpTime]:
    """Roofline time of every op of `u` (plus standalone quantize passes) under `recipe` on `gpu`."""
    fmt = None if recipe == "fp16" else R.RECIPES[recipe]["format"]
    q = [quantized(recipe, op) for op in u.ops]
    consumers: dict[str, list[int]] = {}
    for i, op in enumerate(u.ops):
        for t in op.reads:
            consumers.setdefault(t, []).append(i)
    quant_keys: dict[str, set[str]] = {}  # tensor -> the scales it is quantized with
    eight_bit_reads = set()  # (op index, tensor) read as 8-bit
    for i, op in enumerate(u.ops):
        if q[i]:
            for t in op.reads:
                quant_keys.setdefault(t, set()).add(scale_owner(op, t))
                eight_bit_reads.add((i, t))

    def write_bytes(op: Op) -> int:
        elements = u.tensors[op.out]
        fp16_write = 0 if op.in_place else 2 * elements
        keys = quant_keys.get(op.out, ())
        if not keys or not fused:
            return fp16_write
        fp16_readers = [i for i in consumers.get(op.out, ()) if (i, op.out) not in eight_bit_reads]
        return (fp16_write if fp16_readers else 0) + len(keys) * elements  # the epilogue writes the 8-bit copy

    out = []
    bw = gpu.bandwidth_gbs * 1e9
    for i, op in enumerate(u.ops):
        nbytes = 0 if op.in_place else sum(u.tensors[t] * (1 if (i, t) in eight_bit_reads else 2) for t in op.reads)
        nbytes += op.weights * (1 if q[i] else 2) + write_bytes(op)
        precision = (fmt if q[i] else "fp16") if op.kind != "memory" else "-"
        compute = op.flops / gpu.peak(precision, fp16_accumulate) if op.flops else 0.0
        memory, exp = nbytes / bw, op.exps / gpu.exp_per_s
        out.append(OpTime(op.name, op.group, max(compute, memory, exp), compute, memory, exp, nbytes, precision))
    for t, keys in quant_keys.items():
        if fused and t not in u.inputs:
            continue  # folded into the producer's epilogue above
        for key in sorted(keys):  # a network input has no producer kernel: its quantize is always a pass
            nbytes = 3 * u.tensors[t]
            out.append(OpTime(f"{key}.quantize", "quantize passes", nbytes / bw, 0.0, nbytes / bw, 0.0, nbytes, "-"))
    return out


def total_ms(times: list[OpTime]) -> float:
    return 1e3 * sum(t.seconds for t in times)


def by_group(times: list[OpTime]) -> dict[str, float]:
    groups: dict[str, float] = {}
    for t in times:
        groups[t.group] = groups.get(t.group, 0.0) + 1e3 * t.seconds
    return groups


def bound_split(times: list[OpTime]) -> dict[str, float]:
    """ms of the ops each limit binds (compute / memory / exp)."""
    split = {"compute": 0.0, "memory": 0.0, "exp": 0.0}
    for t in times:
        split[t.bound] += 1e3 * t.seconds
    return split


def eight_bit_share(u: UNetOps, recipe: str) -> float:
    total = sum(op.macs for op in u.ops)
    return sum(op.macs for op in u.ops if quantized(recipe, op)) / total


def roofline(u: UNetOps) -> dict:
    """Per GPU and recipe: ms per UNet call fused and unfused, speed-ups over FP16, group breakdowns."""
    results = {}
    for gpu in GPUS:
        fp16 = op_times(u, gpu, "fp16", fused=True)
        fp16_ms = total_ms(fp16)
        acc16_ms = total_ms(op_times(u, gpu, "fp16", fused=True, fp16_accumulate=True))
        rows = {"fp16": {"ms_fused": fp16_ms, "ms_unfused": fp16_ms, "speedup_fused": 1.0, "speedup_unfused": 1.0,
                         "share_8bit": 0.0, "bound_ms": bound_split(fp16), "groups_ms_fused": by_group(fp16),
                         "ms_fp16_accumulate": acc16_ms}}
        for recipe in REPORTED[1:]:
            fused, unfused = op_times(u, gpu, recipe, True), op_times(u, gpu, recipe, False)
            rows[recipe] = {"ms_fused": total_ms(fused), "ms_unfused": total_ms(unfused),
                            "speedup_fused": fp16_ms / total_ms(fused), "speedup_unfused": fp16_ms / total_ms(unfused),
                            "speedup_fused_vs_fp16_accumulate": acc16_ms / total_ms(fused),
                            "share_8bit": eight_bit_share(u, recipe), "bound_ms": bound_split(fused),
                            "groups_ms_fused": by_group(fused),
                            "quantize_passes_ms_unfused": by_group(unfused).get("quantize passes", 0.0)}
        results[gpu.name] = rows
    return results


# ---------------------------------------------------------------- report

def nvidia_implied_fp16_ms(gpu: str) -> float | None:
    """NVIDIA's FP16 pipeline latency per step (their 8-bit latency x speed-up / 30): an upper bound on
    their FP16 UNet call, since the text encoders and the VAE are inside it."""
    m = NVIDIA_MEASURED.get(gpu, {})
    lat = m.get("latency_ms")
    if not lat:
        return None
    return sum(lat[r] * m[r] for r in lat) / len(lat) / NVIDIA_STEPS


def markdown_table(results: dict, with_nvidia: bool = True) -> list[str]:
    lines = ["| GPU | recipe | 8-bit MACs | ms fused | ms unfused | speed-up fused | speed-up unfused "
             "| NVIDIA measured |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for gpu, rows in results.items():
        measured = NVIDIA_MEASURED.get(gpu, {}) if with_nvidia else {}
        mark = "†" if measured.get("unverified") else ""
        for recipe, r in rows.items():
            nv = f"{measured[recipe]:.2f}×{mark}" if recipe in measured else ""
            lines.append(f"| {gpu} | {recipe} | {r['share_8bit']:.1%} | {r['ms_fused']:.1f} | {r['ms_unfused']:.1f} | "
                         f"{r['speedup_fused']:.2f}× | {r['speedup_unfused']:.2f}× | {nv} |")
    return lines


def breakdown_table(results: dict, gpu: str) -> list[str]:
    rows = results[gpu]
    recipes = list(rows)
    groups = [g for _, g in GEMM_GROUPS] + list(MEMORY_GROUPS)
    lines = [f"| {gpu}: ms per group (fused) | " + " | ".join(recipes) + " |",
             "| --- | " + " | ".join("---" for _ in recipes) + " |"]
    for g in groups:
        cells = [rows[r]["groups_ms_fused"].get(g, 0.0) for r in recipes]
        if any(cells):
            lines.append(f"| {g} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    lines.append("| **total fused** | " + " | ".join(f"**{rows[r]['ms_fused']:.1f}**" for r in recipes) + " |")
    lines.append("| total unfused | " + " | ".join(f"{rows[r]['ms_unfused']:.1f}" for r in recipes) + " |")
    for limit in ("compute", "memory", "exp"):
        lines.append(f"| {limit}-bound ops (fused) | " + " | ".join(f"{rows[r]['bound_ms'][limit]:.1f}"
                                                                   for r in recipes) + " |")
    return lines


def comparison_lines(results: dict) -> list[str]:
    lines = []
    for gpu, m in NVIDIA_MEASURED.items():
        rows = results[gpu]
        a, b = rows["nvidia_modelopt"], rows["nvidia_modelopt_fp8"]
        line = (f"- {gpu}: NVIDIA measured INT8 {m['nvidia_modelopt']:.2f}× / FP8 {m['nvidia_modelopt_fp8']:.2f}×"
                f"{' (unverified source)' if m.get('unverified') else ''}; model fused {a['speedup_fused']:.2f}× / "
                f"{b['speedup_fused']:.2f}×, unfused {a['speedup_unfused']:.2f}× / {b['speedup_unfused']:.2f}×; "
                f"against an FP16-accumulate baseline {a['speedup_fused_vs_fp16_accumulate']:.2f}× / "
                f"{b['speedup_fused_vs_fp16_accumulate']:.2f}×.")
        implied = nvidia_implied_fp16_ms(gpu)
        if implied is not None:
            line += (f" NVIDIA's FP16 pipeline is {implied:.1f} ms per step; model FP16 UNet call "
                     f"{rows['fp16']['ms_fused']:.1f} ms (FP32 accumulate), "
                     f"{rows['fp16']['ms_fp16_accumulate']:.1f} ms (FP16 accumulate).")
        lines.append(line)
    return lines


def layer_lines(u: UNetOps, gpu: Gpu, recipe: str) -> list[str]:
    """Every op (and quantize pass) of `recipe`, fused, on `gpu`: work, bytes, FP16 and 8-bit time, the limit."""
    fp16 = {t.op: t for t in op_times(u, gpu, "fp16", True)}
    ops = {op.name: op for op in u.ops}
    lines = [f"{'op':<64} {'group':<26} {'GFLOP':>8} {'MB':>8} {'Mexp':>8} {'fp16 us':>9} {recipe + ' us':>12} bound"]
    for t in op_times(u, gpu, recipe, True):
        op, base = ops.get(t.op), fp16.get(t.op)
        lines.append(f"{t.op:<64} {t.group:<26} {(op.flops if op else 0) / 1e9:>8.2f} {t.bytes / 1e6:>8.2f} "
                     f"{(op.exps if op else 0) / 1e6:>8.2f} {(base.seconds * 1e6 if base else 0):>9.1f} "
                     f"{t.seconds * 1e6:>12.1f} {t.bound}")
    return lines


def rounded(obj, digits: int = 4):
    """`obj` with every float rounded to `digits` decimals (keeps the JSON readable)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def report(resolution: int = 1024) -> dict:
    u = sdxl_ops(resolution)
    results = roofline(u)
    return {
        "date": date.today().isoformat(),
        "model": "SDXL base 1.0 UNet (trt_sdxl/configs/sdxl_base_1.0/unet.json)",
        "resolution": resolution, "latent": u.latent, "batch": u.batch,
        "totals": {"macs": sum(o.macs for o in u.ops), "flops": sum(o.flops for o in u.ops),
                   "exps": sum(o.exps for o in u.ops), "softmax_exps": sum(o.exps for o in u.ops
                                                                           if o.kind == "attention"),
                   "weight_elements": sum(o.weights for o in u.ops), "ops": len(u.ops)},
        "mac_shares": mac_shares(u),
        "assumptions": [
            "time per op = max(flops / tensor peak of its precision, bytes / DRAM bandwidth, exps / SFU exp rate)",
            "dense peaks; FP16 GEMMs with FP32 accumulate (GeForce: half the FP16-accumulate rate); INT8 with "
            "INT32, FP8 with FP32 accumulate; `ms_fp16_accumulate` is the FP16 baseline at the FP16-accumulate rate",
            f"exp rate = SMs x {EX2_PER_SM_PER_CLOCK} MUFU.EX2 per clock x the clock the tensor peaks are quoted at",
            "attention: one fused kernel (q, k, v read once, output written once, scores on chip); FP8 recipes "
            "run both BMMs at the FP8 rate",
            "conv/linear: input, weights and output moved once; bias/time-embedding add in the epilogue",
            "GroupNorm+SiLU, LayerNorm, GEGLU gate, residual adds, nearest upsampling: one pass each; concat and "
            "layout changes free; SiLU and GELU one exp per element",
            "fused: quantize in the producer's epilogue (8-bit copy written, FP16 only if another consumer reads "
            "it); unfused: one pass per quantize (2 bytes read + 1 written per element); one quantize per "
            "(tensor, scale); weight Q/DQ and dequantize cost nothing at run time",
        ],
        "gpus": {g.name: {"sms": g.sms, "clock_mhz": g.clock_mhz, "fp16_fp32acc_tflops": g.fp16_acc32,
                          "fp16_fp16acc_tflops": g.fp16_acc16, "int8_tops": g.int8, "fp8_fp32acc_tflops": g.fp8_acc32,
                          "bandwidth_gbs": g.bandwidth_gbs, "exp_per_s": g.exp_per_s, "sources": list(g.sources),
                          **({"note": g.note} if g.note else {})} for g in GPUS},
        "sources": {k: {"document": d, "url": url} for k, (d, url) in SOURCES.items()},
        "nvidia_measured": {g: {**m, "fp16_pipeline_ms_per_step": nvidia_implied_fp16_ms(g)}
                            for g, m in NVIDIA_MEASURED.items()},
        "results": results,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=str(JSON_OUT))
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--gpu", default="RTX 4090", choices=list(GPU_BY_NAME), help="GPU of the per-group breakdown")
    p.add_argument("--layers", default=None, choices=REPORTED[1:], help="also print every op for --gpu and this recipe")
    args = p.parse_args(argv)
    try:
        rep = report(args.resolution)
    except ValueError as e:
        p.error(str(e))
    t = rep["totals"]
    print(f"SDXL base UNet roofline, {args.resolution}x{args.resolution} (latent {rep['latent']}), CFG batch "
          f"{rep['batch']}: {t['flops'] / 1e12:.2f} TFLOP, {t['softmax_exps'] / 1e9:.2f} G softmax exps, "
          f"{t['weight_elements'] / 1e9:.3f} G weights per call\n")
    at_nvidia_size = args.resolution == NVIDIA_RESOLUTION
    print("\n".join(markdown_table(rep["results"], with_nvidia=at_nvidia_size)))
    if at_nvidia_size:
        print("\n† quoted in the project's issue; not in the benchmark.md versions read.")
    print()
    print("\n".join(breakdown_table(rep["results"], args.gpu)))
    if at_nvidia_size:
        print("\nAgainst NVIDIA's measurements (whole 30-step pipelines, TensorRT 9.3):")
        print("\n".join(comparison_lines(rep["results"])))
    if args.layers:
        print()
        print("\n".join(layer_lines(sdxl_ops(args.resolution), GPU_BY_NAME[args.gpu], args.layers)))
    write_json(Path(args.json), rounded(rep))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
