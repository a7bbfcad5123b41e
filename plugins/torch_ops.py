"""The plugin library's kernels as functions of CUDA torch tensors (ctypes), for tests and benchmarks.

Same signatures and results as the torch custom ops of export/custom_ops.py, so a test can feed both
the same tensors:

    causal_conv_with_state(x, weight, bias, past_state, activation="silu") -> (y, present_state)
    linear_attention(q, k, v, past_state, decay, beta, q_num_heads, kv_num_heads, scale, impl="auto") -> (out, present_state)
    moe(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k, normalize) -> out
    moe_fp8(x, router_logits, fc1, scale1, fc2, scale2, k, normalize, impl="auto") -> out

`impl` picks the kernel: "auto" (what the TensorRT plugins get: the fast kernel when the shapes fit),
"simple" (the issue-5 kernels: the oracle), or one fast kernel by name ("decode", "chunk" (CUDA cores),
"chunk_tc" (tensor cores), "chunk_split" (factor + state passes, with a workspace allocated here) for the
scan; "fast", "prefill" for the FP8 MoE), which raises when the shapes do not fit.

Outputs are allocated here; the kernels run on torch's current stream of the inputs' device.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from .build import library_path

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ACTIVATIONS = {"none": 0, None: 0, "silu": 1}
STATUS_NAMES = {
    -1: "Q3N_ERR_NULL_POINTER (a required pointer is NULL)",
    -2: "Q3N_ERR_BAD_SHAPE (a size is out of range or sizes disagree)",
    -3: "Q3N_ERR_BAD_DTYPE (dtype code not 0/1/2)",
    -4: "Q3N_ERR_BAD_ATTRIBUTE (activation or top_k out of range)",
    -5: "Q3N_ERR_UNSUPPORTED (a size beyond the kernel's limits, see the op's README)",
    -6: "Q3N_ERR_WORKSPACE (workspace NULL, too small or not 16-byte aligned)",
}

_p, _i, _f, _sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_size_t
_PROTOTYPES = {
    "q3n_causal_conv_with_state": (_i, [_p, _p, _p, _p, _p, _p, _i, _i, _i, _i, _i, _i, _p]),
    "q3n_linear_attention_workspace_size": (_sz, [_i, _i, _i, _i, _i, _i]),
    "q3n_linear_attention": (_i, [_p, _p, _p, _p, _p, _p, _p, _p, _i, _i, _i, _i, _i, _i, _f, _i, _p, _sz, _p]),
    "q3n_linear_attention_impl": (_i, [_p, _p, _p, _p, _p, _p, _p, _p, _i, _i, _i, _i, _i, _i, _f, _i, _p, _sz, _i, _p]),
    "q3n_moe_workspace_size": (_sz, [_i, _i, _i, _i, _i]),
    "q3n_moe": (_i, [_p, _p, _p, _p, _p, _p, _p, _i, _i, _i, _i, _i, _i, _i, _p, _sz, _p]),
    "q3n_moe_fp8": (_i, [_p, _p, _p, _p, _p, _p, _p, _i, _i, _i, _i, _i, _i, _i, _p, _sz, _p]),
    "q3n_moe_fp8_impl": (_i, [_p, _p, _p, _p, _p, _p, _p, _i, _i, _i, _i, _i, _i, _i, _p, _sz, _i, _p]),
}
LINEAR_ATTENTION_IMPLS = {"auto": 0, "simple": 1, "decode": 2, "chunk": 3, "chunk_tc": 4, "chunk_split": 5}
MAX_DECODE_TOKENS = 4  # q3n_gdn::kMaxDecodeTokens: the decode kernel's calls, which need no workspace
MOE_FP8_IMPLS = {"auto": 0, "simple": 1, "fast": 2, "prefill": 3}


@functools.cache
def load_library() -> ctypes.CDLL:
    """The compiled plugin library (built on first use), with the C prototypes declared."""
    lib = ctypes.CDLL(str(library_path()))
    for name, (restype, argtypes) in _PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


@functools.cache
def _cudart():
    # The plugin library links the runtime statically and exports none of it; torch has loaded a
    # shared libcudart, which dlopen finds by soname.
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            lib = ctypes.CDLL(name)
            lib.cudaGetErrorString.restype = ctypes.c_char_p
            lib.cudaGetErrorString.argtypes = [ctypes.c_int]
            return lib
        except (OSError, AttributeError):
            continue
    return None


def status_message(code: int) -> str:
    if code < 0:
        return STATUS_NAMES.get(code, "unknown argument error")
    rt = _cudart()
    text = rt.cudaGetErrorString(code).decode() if rt is not None else "see cudaError_t"
    return f"CUDA error {text}"


def _check(name: str, code: int) -> None:
    if code != 0:
        raise RuntimeError(f"{name} returned {code}: {status_message(code)}")


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _stream(device: torch.device):
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)


def _prepare(name: str, t: torch.Tensor | None, device: torch.device, dtype: torch.dtype | None, shape=None, optional=False):
    """`t` checked (CUDA, device, dtype, shape) and made contiguous; None passes when optional."""
    if t is None:
        if optional:
            return None
        raise ValueError(f"tensor '{name}' is required")
    if not t.is_cuda or t.device != device:
        raise ValueError(f"tensor '{name}' must be on {device}, got {t.device}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"tensor '{name}' must be {dtype}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"tensor '{name}' must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t.contiguous()


def _dtype_code(name: str, t: torch.Tensor) -> int:
    if t.dtype not in DTYPE_CODES:
        raise ValueError(f"tensor '{name}' has dtype {t.dtype}: expected float32, float16 or bfloat16")
    return DTYPE_CODES[t.dtype]


def causal_conv_with_state(x, weight, bias, past_state, activation="silu"):
    """x [B, C, T], weight [C, 1, K], bias [C] or None, past_state [B, C, K-1] or None -> (y, present_state)."""
    if x.dim() != 3 or weight.dim() != 3:
        raise ValueError(f"x must be [B, C, T] and weight [C, 1, K]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of 'silu', 'none'; got {activation!r}")
    B, C, T = x.shape
    K = weight.shape[-1]
    dev, dt = x.device, x.dtype
    code = _dtype_code("x", x)
    x = _prepare("x", x, dev, dt)
    weight = _prepare("weight", weight, dev, dt, (C, 1, K))
    bias = _prepare("bias", bias, dev, dt, (C,), optional=True)
    past_state = _prepare("past_state", past_state, dev, dt, (B, C, K - 1), optional=True)
    y = torch.empty_like(x)
    present = torch.empty(B, C, K - 1, dtype=dt, device=dev)
    with torch.cuda.device(dev):
        rc = load_library().q3n_causal_conv_with_state(
            _ptr(x), _ptr(weight), _ptr(bias), _ptr(past_state), _ptr(y), _ptr(present), B, C, T, K,
            ACTIVATIONS[activation], code, _stream(dev))
    _check("q3n_causal_conv_with_state", rc)
    return y, present


def linear_attention(q, k, v, past_state, decay, beta, q_num_heads: int, kv_num_heads: int, scale: float, impl: str = "auto"):
    """q, k [B, T, Hk*Dk]; v [B, T, Hv*Dv]; past_state [B, Hv, Dk, Dv] (any float dtype, used as float32) or None;
    decay, beta [B, T, Hv] -> (out [B, T, Hv*Dv] in v's dtype, present_state float32)."""
    if q.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q and v must be [B, T, H*D]; got {tuple(q.shape)} and {tuple(v.shape)}")
    B, T, qk_width = q.shape
    Hk, Hv = int(q_num_heads), int(kv_num_heads)
    if Hk <= 0 or Hv % Hk or qk_width % Hk or v.shape[-1] % Hv:
        raise ValueError(f"heads: q width {qk_width} / q_num_heads {Hk}, v width {v.shape[-1]} / kv_num_heads {Hv} "
                         "must divide, and kv_num_heads must be a multiple of q_num_heads")
    Dk, Dv = qk_width // Hk, v.shape[-1] // Hv
    if impl not in LINEAR_ATTENTION_IMPLS:
        raise ValueError(f"impl must be one of {sorted(LINEAR_ATTENTION_IMPLS)}, got {impl!r}")
    dev, dt = v.device, v.dtype
    code = _dtype_code("v", v)
    q = _prepare("q", q, dev, dt)
    k = _prepare("k", k, dev, dt, q.shape)
    v = _prepare("v", v, dev, dt, (B, T, Hv * Dv))
    decay = _prepare("decay", decay, dev, dt, (B, T, Hv))
    beta = _prepare("beta", beta, dev, dt, (B, T, Hv))
    if past_state is not None:
        past_state = _prepare("past_state", past_state, dev, None, (B, Hv, Dk, Dv)).float().contiguous()
    out = torch.empty_like(v)
    present = torch.empty(B, Hv, Dk, Dv, dtype=torch.float32, device=dev)
    ws_bytes = linear_attention_workspace_size(B, T, Hk, Hv, Dk, Dv, impl)
    workspace = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=dev)
    with torch.cuda.device(dev):
        rc = load_library().q3n_linear_attention_impl(
            _ptr(q), _ptr(k), _ptr(v), _ptr(past_state), _ptr(decay), _ptr(beta), _ptr(out), _ptr(present),
            B, T, Hk, Hv, Dk, Dv, float(scale), code, _ptr(workspace), ws_bytes, LINEAR_ATTENTION_IMPLS[impl], _stream(dev))
    _check(f"q3n_linear_attention_impl ({impl})", rc)
    return out, present


def linear_attention_workspace_size(batch: int, seq: int, q_num_heads: int, kv_num_heads: int, head_k_dim: int,
                                    head_v_dim: int, impl: str = "auto") -> int:
    """The workspace a call asks for. The C function answers 0 at 1-4 tokens (the decode kernel's calls); an
    explicit "chunk_split" there gets one chunk's factors."""
    if impl == "chunk_split":
        seq = max(seq, MAX_DECODE_TOKENS + 1)
    return int(load_library().q3n_linear_attention_workspace_size(batch, seq, q_num_heads, kv_num_heads, head_k_dim,
                                                                    head_v_dim))


def moe_workspace_size(tokens: int, experts: int, top_k: int, hidden: int, inter: int) -> int:
    return int(load_library().q3n_moe_workspace_size(tokens, experts, top_k, hidden, inter))


def _moe_common(x, router_logits, k, inter, experts):
    H = x.shape[-1]
    N = x.numel() // H
    dev, dt = x.device, x.dtype
    code = _dtype_code("x", x)
    tokens = _prepare("x", x, dev, dt).reshape(N, H)
    logits = _prepare("router_logits", router_logits, dev, dt).reshape(-1, experts)
    if logits.shape[0] != N:
        raise ValueError(f"router_logits has {logits.shape[0]} rows for {N} tokens")
    if not 0 < int(k) <= experts:
        raise ValueError(f"k must be in 1..{experts}, got {k}")
    ws_bytes = moe_workspace_size(N, experts, int(k), H, inter)
    workspace = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=dev)
    return tokens, logits, N, H, code, workspace, ws_bytes


def moe(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k: int, normalize: int):
    """x [..., H]; router_logits [N, E]; fc1 [E, 2I, H] (gate/up rows interleaved); fc1_bias [E, 2I] or None;
    fc2 [E, H, I]; fc2_bias [E, H] or None -> out, shaped like x."""
    E, two_i, H = fc1.shape
    inter = two_i // 2
    dev, dt = x.device, x.dtype
    tokens, logits, N, H, code, workspace, ws_bytes = _moe_common(x, router_logits, k, inter, E)
    fc1 = _prepare("fc1", fc1, dev, dt, (E, 2 * inter, H))
    fc1_bias = _prepare("fc1_bias", fc1_bias, dev, dt, (E, 2 * inter), optional=True)
    fc2 = _prepare("fc2", fc2, dev, dt, (E, H, inter))
    fc2_bias = _prepare("fc2_bias", fc2_bias, dev, dt, (E, H), optional=True)
    out = torch.empty_like(tokens)
    with torch.cuda.device(dev):
        rc = load_library().q3n_moe(
            _ptr(tokens), _ptr(logits), _ptr(fc1), _ptr(fc1_bias), _ptr(fc2), _ptr(fc2_bias), _ptr(out),
            N, H, inter, E, int(k), int(bool(normalize)), code, _ptr(workspace), ws_bytes, _stream(dev))
    _check("q3n_moe", rc)
    return out.reshape(x.shape)


def moe_fp8(x, router_logits, fc1, scale1, fc2, scale2, k: int, normalize: int, impl: str = "auto"):
    """As `moe` with FP8 weights: fc1 [E, 2I, H] and fc2 [E, H, I] as float8_e4m3fn (or their uint8 bytes),
    scale1 [E, 2 * ceil(I/128), ceil(H/128)] and scale2 [E, ceil(H/128), ceil(I/128)] float32 128x128 block
    scales; scale1 is the checkpoint's gate_proj scales [ceil(I/128), ceil(H/128)] above its up_proj scales
    (fc1 row 2i = gate i takes scale1[i // 128], row 2i+1 = up i takes scale1[ceil(I/128) + i // 128]); no biases."""
    E, two_i, H = fc1.shape
    inter = two_i // 2
    blocks = lambda n: -(-n // 128)  # noqa: E731
    if impl not in MOE_FP8_IMPLS:
        raise ValueError(f"impl must be one of {sorted(MOE_FP8_IMPLS)}, got {impl!r}")
    dev = x.device
    tokens, logits, N, H, code, workspace, ws_bytes = _moe_common(x, router_logits, k, inter, E)
    if fc1.dtype == torch.float8_e4m3fn:
        fc1 = fc1.view(torch.uint8)
    if fc2.dtype == torch.float8_e4m3fn:
        fc2 = fc2.view(torch.uint8)
    fc1 = _prepare("fc1", fc1, dev, torch.uint8, (E, 2 * inter, H))
    fc2 = _prepare("fc2", fc2, dev, torch.uint8, (E, H, inter))
    scale1 = _prepare("scale1", scale1, dev, torch.float32, (E, 2 * blocks(inter), blocks(H)))
    scale2 = _prepare("scale2", scale2, dev, torch.float32, (E, blocks(H), blocks(inter)))
    out = torch.empty_like(tokens)
    with torch.cuda.device(dev):
        rc = load_library().q3n_moe_fp8_impl(
            _ptr(tokens), _ptr(logits), _ptr(fc1), _ptr(scale1), _ptr(fc2), _ptr(scale2), _ptr(out),
            N, H, inter, E, int(k), int(bool(normalize)), code, _ptr(workspace), ws_bytes, MOE_FP8_IMPLS[impl],
            _stream(dev))
    _check(f"q3n_moe_fp8_impl ({impl})", rc)
    return out.reshape(x.shape)


__all__ = ["causal_conv_with_state", "linear_attention", "linear_attention_workspace_size", "load_library", "moe",
           "moe_fp8", "moe_workspace_size", "status_message"]
