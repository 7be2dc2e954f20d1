"""Pure-PyTorch references for the ops in csrc/adamw.cpp and csrc/nf4.h, also the fallback when the C++
build is unavailable. Same arithmetic in the same order (fp32, no fused multiply-add), so the two agree
element for element; see csrc/adamw.cpp for the modes and the 8-bit code."""

from __future__ import annotations

import math

import torch

BLOCK = 256
_MASK = 0xFFFFFFFF
_M_BASE = ((127 - 15) << 3) - 1  # code 1 <-> 2^-15 of the block's absmax
_V_BASE = ((127 - 31) << 3) - 1  # code 1 <-> 2^-31 of the block's max sqrt(v)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> its IEEE bits as non-negative int64."""
    return x.contiguous().view(torch.int32).to(torch.int64) & _MASK


def _from_bits(b: torch.Tensor) -> torch.Tensor:
    """int64 holding 32 bits -> float32."""
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 without int64 overflow."""
    hi, lo = h >> 16, h & 0xFFFF
    return ((((hi * c) & 0xFFFF) << 16) + lo * c) & _MASK


def fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def bf16_stochastic_round(x: torch.Tensor, key: int) -> torch.Tensor:
    """fp32 -> bf16, rounding the magnitude up with probability equal to the dropped fraction.
    The random bits are a hash of (key, element index): reproducible and thread-count free."""
    b = _bits(x)
    idx = torch.arange(x.numel(), dtype=torch.int64)
    r = fmix32((idx * 0x9E3779B1 + key) & _MASK) >> 16
    out = (b + r) >> 16
    return torch.where(out >= 2**15, out - 2**16, out).to(torch.int16).view(torch.bfloat16)


_STATE_KEY = 0x68E31DA4


def _state_rand(n: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One hash per element: 16 random bits for m's code, 16 for v's, shifted to the top of the
    20 bits each code drops."""
    idx = torch.arange(n, dtype=torch.int64)
    r = fmix32((idx * 0x9E3779B1 + (key ^ _STATE_KEY)) & _MASK)
    return (r >> 16) << 4, (r & 0xFFFF) << 4


def _enc_mag(y: torch.Tensor, base: int, maxcode: int, r: torch.Tensor) -> torch.Tensor:
    """Stochastically rounded code (see csrc/adamw.cpp, "8-bit code")."""
    c = (_bits(y) + r) >> 20
    return torch.where(c > base, c - base, torch.zeros_like(c)).clamp_max(maxcode)


def _dec_mag(c: torch.Tensor, base: int) -> torch.Tensor:
    return torch.where(c == 0, torch.zeros((), dtype=torch.float32), _from_bits((c + base) << 20))


def _blocks(x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    pad = (-n) % BLOCK
    return torch.nn.functional.pad(x, (0, pad)).view(-1, BLOCK) if pad else x.view(-1, BLOCK)


def _per_block(scale: torch.Tensor, n: int) -> torch.Tensor:
    return scale.repeat_interleave(BLOCK)[:n]


def dequantize_m(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    c = q.to(torch.int64)
    mag = _dec_mag(c.abs(), _M_BASE) * _per_block(scale, q.numel())
    return torch.where(c < 0, -mag, mag)


def dequantize_sqrt_v(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _dec_mag(q.to(torch.int64), _V_BASE) * _per_block(scale, q.numel())


def quantize_m(m: torch.Tensor, key: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 -> (int8 codes, fp32 absmax per block)."""
    n = m.numel()
    mx = _blocks(m.abs()).amax(dim=1)
    inv = torch.where(mx > 0, 1.0 / mx, torch.zeros_like(mx))
    c = _enc_mag(m.abs() * _per_block(inv, n), _M_BASE, 127, _state_rand(n, key)[0])
    return torch.where(m < 0, -c, c).to(torch.int8), mx


def quantize_sqrt_v(s: torch.Tensor, key: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(v) in fp32 -> (uint8 codes, fp32 max per block)."""
    mx = _blocks(s).amax(dim=1)
    inv = torch.where(mx > 0, 1.0 / mx, torch.zeros_like(mx))
    return _enc_mag(s * _per_block(inv, s.numel()), _V_BASE, 255, _state_rand(s.numel(), key)[1]).to(torch.uint8), mx


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (torch's vectorised one is not; double rounding is exact here)."""
    return x.double().sqrt().float()


def adamw_step(weights, grad, exp_avg, exp_avg_sq, m_scale, v_scale, working, n_decay: int, lr: float,
               beta1: float, beta2: float, eps: float, weight_decay: float, step: int, grad_scale: float,
               key: int) -> None:
    g = grad.float()
    if grad_scale != 1.0:
        g = g * grad_scale
    p = weights.float().clone()
    int8 = exp_avg.dtype == torch.int8
    if int8:
        m = dequantize_m(exp_avg, m_scale)
        s = dequantize_sqrt_v(exp_avg_sq, v_scale)
        v = s * s
    else:
        m, v = exp_avg.float().clone(), exp_avg_sq.float().clone()
    # Elementary ops only, each rounded once (torch's lerp_/addcmul_ kernels use FMA; the C++ op
    # is built with -ffp-contract=off). Scalars are computed in double, applied as float32.
    if weight_decay and n_decay:
        p[:n_decay] = p[:n_decay] * (1 - lr * weight_decay)
    m = m + (g - m) * (1 - beta1)
    v = v * beta2 + (g * (1 - beta2)) * g
    sv = _sqrt(v)
    denom = sv * (1.0 / math.sqrt(1 - beta2 ** step)) + eps
    p = p + (m / denom) * (-(lr / (1 - beta1 ** step)))
    if weights.dtype == torch.float32:
        weights.copy_(p)
        if working is not None and working.numel():
            working.copy_(p)  # round to nearest even
    else:
        weights.copy_(bf16_stochastic_round(p, key))
    if int8:
        qm, sm = quantize_m(m, key)
        qv, s_v = quantize_sqrt_v(sv, key)
        exp_avg.copy_(qm)
        exp_avg_sq.copy_(qv)
        m_scale.copy_(sm)
        v_scale.copy_(s_v)
    else:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)


def accumulate_sqnorm(dst: torch.Tensor, src: torch.Tensor | None, alpha: float) -> float:
    if src is not None:
        dst.add_(src.float(), alpha=alpha)
    return float(torch.dot(dst.double(), dst.double()))


def nf4_codes(x: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> None:
    """out <- the packed 4-bit codes of x's blocks of 64 (absmaxes `absmax`): the nearest NF4 value to
    x / A in x's dtype, ties to the lower index, two codes a byte, high nibble first (csrc/nf4.h)."""
    v = (x.view(-1, 64) / torch.where(absmax == 0, torch.ones_like(absmax), absmax)[:, None]).view(-1)
    lo = torch.searchsorted(table.float(), v.float(), right=True, out_int32=True).sub_(1).clamp_(0, 14)
    hi = lo + 1
    d_lo = (v - table.index_select(0, lo)).abs()
    d_hi = (v - table.index_select(0, hi)).abs()
    code = torch.where(d_hi < d_lo, hi, lo).to(torch.uint8).view(-1, 2)
    out.copy_((code[:, 0] << 4) | code[:, 1])
