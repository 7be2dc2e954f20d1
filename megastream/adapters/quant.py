"""The quantized frozen base: one 2-D weight (out, in) quantized at load, streamed as one flat byte
buffer, dequantized on the device right before its matmul.

Schemes
- "int8": symmetric per output channel. scale = absmax(row) / 127 (fp32), code = round(w / scale)
  in [-127, 127]; w ~ code * scale, error <= scale / 2. About 8 + 32 / in bits a parameter.
- "nf4": QLoRA's NormalFloat-4 with double quantization, the layout of torchao's NF4Tensor
  (`to_nf4`, block 64, scaler block 256), which this module reproduces bit for bit:
  * the weight, flattened row-major, in blocks of 64: A = absmax(block), code = index of the NF4 value
    nearest to w / A (ties to the lower index), two codes a byte, the first one in the high nibble;
  * the block absmaxes A minus their mean m, in groups of 256 blocks: f = 256 / (2 * absmax(group)),
    q = clamp(round(f * (A - m)), -128, 127) as int8; A' = q / f + m.
  * dequantized: NF4[code] * A'.
  For bf16 input every step runs in bf16 and for fp32 input in fp32, as torchao does (so codes and
  values match it); any other input dtype (fp16, fp64) is computed in fp32. NF4 is the 4-decimal table
  torchao uses (bitsandbytes keeps more digits: they differ by < 5e-5). About 4 + 8/64 + 32/(64*256)
  = 4.127 bits a parameter.
  A numel that is not a multiple of 64 * 256 is padded with zeros up to one (`QuantizedWeight.pad`);
  the padded blocks do not move the mean (it is taken over the real blocks) and get A = m exactly.

Flat buffer (`to_flat` / `from_flat`): the sections back to back, each starting on a 16-byte boundary:
int8 = [codes: out*in bytes][scales: out fp32]; nf4 = [codes: padded/2 bytes][block scale codes:
padded/64 int8][group factors: padded/16384 fp32][mean: one fp32]. `from_flat` returns views into the
buffer, so a unit's weights go to the GPU in one H2D copy and are dequantized there with no host sync.

A 3-D stack of experts' weights (E, out, in), as a MoE layer holds them fused, is quantized expert by
expert: E such flat buffers back to back (`packed_nbytes`, `pack`, `unpack`; the store's layers use
these for 2-D and 3-D weights alike).

Pure torch: runs on CPU and CUDA tensors alike.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

SCHEMES = ("int8", "nf4")
BLOCK = 64  # NF4 elements per absmax
GROUP = 256  # block absmaxes per second-level (double-quantization) factor
_ALIGN = 16  # each section of a flat buffer starts on this many bytes
_CHUNK = 1 << 22  # elements quantized at once (a multiple of BLOCK * GROUP): bounds the temporaries

# The 16 NormalFloat values of QLoRA (Dettmers et al. 2023, appendix E), to 4 decimals as in torchao.
NF4_VALUES = (
    -1.0000, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0000,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0000,
)  # fmt: skip
# Half the widest gap between neighbours (-1 .. -0.6962): the largest rounding error, in units of A.
NF4_MAX_HALF_GAP = max(b - a for a, b in zip(NF4_VALUES, NF4_VALUES[1:])) / 2


@dataclass
class QuantizedWeight:
    """One 2-D weight (out, in) packed for streaming. All tensors on one device.

    scheme: "int8" | "nf4".
    shape: (out, in) of the original weight.
    data: uint8, flat. int8: the out*in int8 codes (bit pattern). nf4: two 4-bit codes a byte, high
        nibble first, padded numel / 2 bytes.
    scales: int8: fp32 per output channel (out,). nf4: the int8 double-quantized block absmaxes
        (padded numel / 64,).
    scale_scales: nf4: fp32 factor f per group of 256 blocks (padded numel / 16384,); a block's absmax
        is scales / f + scale_offset (divided, as torchao does, so the values match it exactly).
        None for int8.
    scale_offset: nf4: the mean of the block absmaxes, subtracted before the second quantization, as a
        one-element fp32 tensor (a tensor, not a float, so that `from_flat` on a device buffer needs no
        device-to-host read). None for int8.
    """

    scheme: str
    shape: tuple[int, int]
    data: torch.Tensor
    scales: torch.Tensor
    scale_scales: torch.Tensor | None = None
    scale_offset: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def pad(self) -> int:
        """Zeros appended to the flattened weight before quantizing (nf4 only; 0 for int8)."""
        return _padded_numel(self.shape, self.scheme) - self.numel

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes(self) -> int:
        """Bytes streamed for this weight: the length of its flat buffer (== quantized_nbytes)."""
        return quantized_nbytes(self.shape, self.scheme)


def _check(shape, scheme: str) -> tuple[int, int]:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}: expected one of {SCHEMES}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"quantize a 2-D weight (out, in) with no empty dimension, got shape {shape}")
    return shape  # type: ignore[return-value]


def _padded_numel(shape, scheme: str) -> int:
    n = shape[0] * shape[1]
    if scheme != "nf4":
        return n
    unit = BLOCK * GROUP
    return -(-n // unit) * unit


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _sections(shape, scheme: str) -> list[tuple[str, int, int, torch.dtype]]:
    """(field, byte offset, element count, dtype) of each section of the flat buffer."""
    shape = _check(shape, scheme)
    if scheme == "int8":
        fields = [("data", shape[0] * shape[1], torch.uint8), ("scales", shape[0], torch.float32)]
    else:
        n = _padded_numel(shape, scheme)
        fields = [
            ("data", n // 2, torch.uint8),
            ("scales", n // BLOCK, torch.int8),
            ("scale_scales", n // (BLOCK * GROUP), torch.float32),
            ("scale_offset", 1, torch.float32),
        ]
    out, off = [], 0
    for name, count, dtype in fields:
        out.append((name, off, count, dtype))
        off = _align(off + count * dtype.itemsize)
    return out


def quantized_nbytes(shape, scheme: str) -> int:
    """Bytes a weight of this shape takes quantized (its flat buffer), without quantizing it."""
    name, off, count, dtype = _sections(shape, scheme)[-1]
    return _align(off + count * dtype.itemsize)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32


def _nf4_table(dtype: torch.dtype, device) -> torch.Tensor:
    return torch.tensor(NF4_VALUES, dtype=dtype, device=device)


@torch.no_grad()
def quantize(w: torch.Tensor, scheme: str, *, use_ext: bool | None = None) -> QuantizedWeight:
    """Quantize a 2-D weight (bf16, fp32, or any float dtype) on its own device. nf4 finds its 4-bit
    codes with megastream.ops.nf4_codes: the C++ op on the CPU when the ops are built (bit for bit the
    torch ops' result), else torch ops; `use_ext` as that function takes it (tests compare the two)."""
    shape = _check(w.shape, scheme)
    if not w.is_floating_point():
        raise ValueError(f"quantize a floating-point weight, got {w.dtype}")
    w = w.detach().contiguous()
    if scheme == "int8":
        return _quantize_int8(w, shape)
    return _quantize_nf4(w, shape, use_ext)


def _quantize_int8(w: torch.Tensor, shape) -> QuantizedWeight:
    rows = max(1, _CHUNK // shape[1])
    codes = torch.empty(shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(shape[0], dtype=torch.float32, device=w.device)
    for r in range(0, shape[0], rows):
        x = w[r : r + rows].to(torch.float32, copy=True)  # never in place on the caller's weight
        s = x.abs().amax(dim=1) / 127
        scales[r : r + rows] = s
        x /= torch.where(s == 0, 1.0, s)[:, None]  # an all-zero row: codes 0, scale 0
        codes[r : r + rows] = x.round_().clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", shape, codes.view(-1).view(torch.uint8), scales)


def _nf4_chunks(flat: torch.Tensor, padded: int, dtype: torch.dtype):
    """(start, chunk) over the flattened weight, in `dtype`, the tail padded with zeros to `padded`."""
    n = flat.numel()
    for s in range(0, padded, _CHUNK):
        e = min(s + _CHUNK, padded)
        x = flat[s : min(e, n)].to(dtype)
        if x.numel() < e - s:
            x = torch.cat([x, x.new_zeros(e - s - x.numel())])
        yield s, x


def _quantize_nf4(w: torch.Tensor, shape, use_ext: bool | None = None) -> QuantizedWeight:
    dt = _compute_dtype(w.dtype)
    dev = w.device
    flat = w.view(-1)
    n = flat.numel()
    padded = _padded_numel(shape, "nf4")
    n_blocks, n_groups = padded // BLOCK, padded // (BLOCK * GROUP)
    real_blocks = -(-n // BLOCK)

    # First level: the absmax of each block of 64, in the compute dtype.
    absmax = torch.empty(n_blocks, dtype=dt, device=dev)
    for s, x in _nf4_chunks(flat, padded, dt):
        absmax[s // BLOCK : (s + x.numel()) // BLOCK] = x.view(-1, BLOCK).abs().amax(dim=1)

    # Second level: the absmaxes minus their mean, int8 per group of 256 (torchao's double_quantize_scalers).
    mean = absmax[:real_blocks].mean()
    absmax[real_blocks:] = mean  # padded blocks: centred value 0, code 0, dequantized to m exactly
    centred = (absmax - mean).view(n_groups, GROUP)
    gmax = centred.abs().amax(dim=1)
    factor = 256 / (2 * gmax)
    factor = torch.where(gmax == 0, torch.ones_like(factor), factor)  # all equal to the mean: codes 0
    scale_codes = (centred * factor[:, None]).round().clamp(-128, 127).to(torch.int8).view(-1)

    # The 4-bit codes: nearest NF4 value to w / A (A unquantized), ties to the lower index, with the
    # distances computed in the compute dtype as torchao does (its argmin over all 16; only the two
    # neighbours of w / A can be nearest, since rounding a difference is monotone).
    table = _nf4_table(dt, dev)
    data = torch.empty(padded // 2, dtype=torch.uint8, device=dev)
    from megastream import ops

    for s, x in _nf4_chunks(flat, padded, dt):
        a = absmax[s // BLOCK : (s + x.numel()) // BLOCK]
        ops.nf4_codes(x, a, table, data[s // 2 : (s + x.numel()) // 2], use_ext=use_ext)

    return QuantizedWeight(
        "nf4",
        shape,
        data,
        scale_codes,
        factor.float().contiguous(),
        mean.float().reshape(1),
    )


@functools.lru_cache(maxsize=None)
def _nf4_pair_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 2): the two NF4 values a byte holds, high nibble first. Built once per dtype and device
    (read-only): built per call, its torch.tensor(list, device=cuda) would be a pageable H2D copy that
    makes the host wait for the device, once per projection on every layer's dequantization."""
    t = _nf4_table(dtype, device)
    b = torch.arange(256, device=device)
    table = torch.stack([t[b >> 4], t[b & 15]], dim=1)
    if table.is_cuda:  # once: ready before any stream reads it
        torch.cuda.synchronize(table.device)
    return table


def block_absmax(q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """nf4: the double-dequantized block absmaxes A' (padded numel / 64,), computed in `dtype`."""
    if q.scheme != "nf4":
        raise ValueError(f"block_absmax is for nf4 weights, not {q.scheme}")
    groups = q.scales.view(-1, GROUP).to(dtype)
    return (groups / q.scale_scales.to(dtype)[:, None]).view(-1) + q.scale_offset.to(dtype)


@torch.no_grad()
def dequantize(q: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in `dtype`, on q.data's device, computed in `dtype`."""
    if q.scheme == "int8":
        w = q.data.view(torch.int8).view(q.shape).to(dtype)
        return w.mul_(q.scales.to(dtype)[:, None])
    if q.scheme != "nf4":
        raise ValueError(f"unknown quantization scheme {q.scheme!r}")
    vals = _nf4_pair_table(dtype, q.device).index_select(0, q.data.int())  # (padded/2, 2)
    vals = vals.view(-1, BLOCK).mul_(block_absmax(q, dtype)[:, None]).view(-1)
    return vals[: q.numel].view(q.shape)


def to_flat(q: QuantizedWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight as one contiguous uint8 buffer (see the module docstring for the layout), written
    into `out` (e.g. a slice of a pinned arena, on any device) when given."""
    size = q.nbytes()
    if out is None:
        out = torch.zeros(size, dtype=torch.uint8, device=q.device)
    elif out.dtype != torch.uint8 or out.dim() != 1 or out.numel() != size or not out.is_contiguous():
        raise ValueError(f"to_flat: out must be a contiguous 1-D uint8 tensor of {size} bytes")
    sections = _sections(q.shape, q.scheme)
    for i, (name, off, count, dtype) in enumerate(sections):
        src = getattr(q, name).reshape(-1)
        if src.numel() != count:
            raise ValueError(f"to_flat: {name} has {src.numel()} elements, the layout {count}")
        end = off + count * dtype.itemsize
        out[off:end].view(dtype).copy_(src)
        out[end : sections[i + 1][1] if i + 1 < len(sections) else size].zero_()  # alignment gap
    return out


def from_flat(buf: torch.Tensor, shape, scheme: str) -> QuantizedWeight:
    """The weight whose flat buffer is `buf`: every tensor a view into it (no copy, no sync). `buf`
    must start on a 4-byte boundary of its storage (an arena's slots are 16-byte aligned)."""
    shape = _check(shape, scheme)
    size = quantized_nbytes(shape, scheme)
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != size:
        raise ValueError(f"from_flat: expected a 1-D uint8 buffer of {size} bytes for {scheme} "
                         f"{shape}, got {buf.dtype} {tuple(buf.shape)}")
    views = {name: buf[off : off + count * dtype.itemsize].view(dtype)
             for name, off, count, dtype in _sections(shape, scheme)}
    return QuantizedWeight(scheme, shape, **views)


# ---- a layer's weights: one 2-D projection, or a stack of experts' (E, out, in) ----------------------
def _slices(shape) -> tuple[int, tuple[int, int]]:
    """(number of 2-D slices, their shape) of a 2-D weight or a 3-D stack (a MoE layer's experts,
    quantized expert by expert, each slice its own flat buffer)."""
    shape = tuple(shape)
    if len(shape) == 2:
        return 1, shape
    if len(shape) == 3:
        return shape[0], shape[1:]
    raise ValueError(f"a {len(shape)}-D weight {shape}: quantized are 2-D projections (out, in) and 3-D stacks "
                     "of experts' (E, out, in)")


def packed_nbytes(shape, scheme: str) -> int:
    """Bytes of a 2-D weight's flat buffer, or of a 3-D stack's: its slices' buffers back to back."""
    n, sl = _slices(shape)
    return n * quantized_nbytes(sl, scheme)


def pack(w: torch.Tensor, scheme: str, out: torch.Tensor) -> None:
    """Quantize `w` (out, in) or (E, out, in), slice by slice, into `out` (packed_nbytes bytes)."""
    n, sl = _slices(w.shape)
    nb = quantized_nbytes(sl, scheme)
    for k, part in enumerate([w] if w.dim() == 2 else w.unbind(0)):
        to_flat(quantize(part, scheme), out=out[k * nb:(k + 1) * nb])


def unpack(buf: torch.Tensor, shape, scheme: str, out: torch.Tensor) -> None:
    """Dequantize `buf` (pack's output, on any device) into `out` (`shape`, in its dtype), slice by
    slice (no host sync)."""
    n, sl = _slices(shape)
    nb = quantized_nbytes(sl, scheme)
    for k, part in enumerate([out] if len(shape) == 2 else out.unbind(0)):
        part.copy_(dequantize(from_flat(buf[k * nb:(k + 1) * nb], sl, scheme), out.dtype))
