"""megastream.adapters.quant: the quantized frozen base (issue 15). NF4 codes, int8 block-scale codes
and dequantized values bit for bit against torchao's `to_nf4` (an independent reference); the error
bounds per block (nf4) and per element (int8); flat buffers; padding; dtypes, devices and sizes."""

import os

import pytest
import torch

from megastream.adapters.quant import (
    BLOCK,
    GROUP,
    NF4_MAX_HALF_GAP,
    NF4_VALUES,
    QuantizedWeight,
    block_absmax,
    dequantize,
    from_flat,
    quantize,
    quantized_nbytes,
    to_flat,
)

UNIT = BLOCK * GROUP  # 16384: torchao's NF4 needs numel divisible by this


@pytest.fixture(scope="module")
def to_nf4():
    """torchao's NF4Tensor constructor (its module moved between releases)."""
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # its CUDA kernels: not needed
    pytest.importorskip("torchao", reason="torchao (the NF4 reference) is not installed: pip install torchao")
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:
        from torchao.dtypes.nf4tensor import to_nf4
    return to_nf4


def _weight(shape, dtype, seed=0, heavy=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    if heavy:  # outliers, as real weights have: wide-ranging block absmaxes, clamped scale codes
        w = w * torch.distributions.StudentT(2.5).sample(shape).clamp(-50, 50)
    return w.to(dtype)


def _ties(dtype) -> torch.Tensor:
    """Values on and around every midpoint between neighbouring NF4 values (and on the values), in
    blocks of 64 each holding its own absmax: the nearest-value tie rule must be torchao's."""
    t = torch.tensor(NF4_VALUES, dtype=dtype).double()
    points = torch.cat([(t[:-1] + t[1:]) / 2, t]).to(dtype)
    around, up, down = [points], points, points
    for _ in range(3):  # 1, 2 and 3 ulps either side
        up = torch.nextafter(up, torch.tensor(2.0, dtype=dtype))
        down = torch.nextafter(down, torch.tensor(-2.0, dtype=dtype))
        around += [up, down]
    vals = torch.cat(around).clamp(-1, 1)
    g = torch.Generator().manual_seed(3)
    n_blocks = 4 * GROUP
    body = vals[torch.randint(0, vals.numel(), (n_blocks, BLOCK - 1), generator=g)]
    scale = torch.ones(n_blocks, 1)
    scale[n_blocks // 2 :] = torch.rand(n_blocks // 2, 1, generator=g) * 0.1 + 1e-3  # w / A rounds
    scale = scale.to(dtype)
    blocks = torch.cat([torch.ones(n_blocks, 1, dtype=dtype), body], dim=1) * scale
    return blocks.view(-1, 4 * BLOCK)


CASES = [
    ((64, UNIT), torch.float32, False),
    ((1024, 1024), torch.bfloat16, True),
    ((96, 512), torch.float32, True),
]


@pytest.mark.parametrize("shape,dtype,heavy", CASES,
                         ids=["fp32-64x16384", "bf16-1024x1024-heavy", "fp32-96x512-heavy"])
def test_nf4_matches_torchao(to_nf4, shape, dtype, heavy):
    w = _weight(shape, dtype, heavy=heavy)
    ref, q = to_nf4(w), quantize(w, "nf4")
    assert q.pad == 0 and q.data.dtype == torch.uint8 and q.scales.dtype == torch.int8
    assert torch.equal(q.data, ref.quantized_data)  # the 4-bit codes, packed the same way
    assert torch.equal(q.scales, ref.quantized_scalers)  # the int8 double-quantized block absmaxes
    assert torch.equal(q.scale_scales, ref.quantization_factor.float())
    assert torch.equal(q.scale_offset, ref.scaler_mean.float().reshape(1))
    out = dequantize(q, dtype)
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out, ref.get_original_weight())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_ties_match_torchao(to_nf4, dtype):
    w = _ties(dtype)
    ref, q = to_nf4(w), quantize(w, "nf4")
    # The input does put values on ties (equal distances to two neighbours in the compute dtype).
    table = torch.tensor(NF4_VALUES, dtype=dtype)
    v = (w.view(-1, BLOCK) / w.view(-1, BLOCK).abs().amax(1, keepdim=True)).view(-1, 1)
    d = (v - table).abs()
    assert ((d == d.min(dim=1, keepdim=True).values).sum(1) > 1).sum() > 100
    assert torch.equal(q.data, ref.quantized_data)
    assert torch.equal(q.scales, ref.quantized_scalers)
    assert torch.equal(dequantize(q, dtype), ref.get_original_weight())



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_c_op_equals_the_torch_path(dtype):
    """The CPU's default, the C++ op (csrc/nf4.h, ~10x faster than the torch ops), gives the torch path's
    bytes exactly: heavy-tailed weights, values on and 1-3 ulps around every midpoint, an all-zero
    block, and a tail padded up to 64 x 256."""
    from megastream import ops

    if not ops.have_ext():
        pytest.skip("the C++ ops are not built here")
    ties = _ties(dtype).view(-1)
    w = torch.cat([_weight((64, 512), dtype, seed=5, heavy=True).view(-1), ties, torch.zeros(BLOCK, dtype=dtype),
                   _weight((1, 3 * BLOCK), dtype, seed=6).view(-1)]).view(-1, BLOCK)
    a, b = quantize(w, "nf4", use_ext=False), quantize(w, "nf4", use_ext=True)
    assert a.pad > 0
    for field in ("data", "scales", "scale_scales", "scale_offset"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_nf4_on_the_cpu_takes_the_c_op(monkeypatch):
    from megastream import ops

    if not ops.have_ext():
        pytest.skip("the C++ ops are not built here")

    def torch_path(*args):
        raise AssertionError("the torch path ran on the CPU with the C++ ops built")

    monkeypatch.setattr(ops.reference, "nf4_codes", torch_path)
    quantize(_weight((64, 256), torch.bfloat16), "nf4")


def test_nf4_load_benchmark_runs(tmp_path):
    """benchmarks/nf4_load.py (the figure the README quotes) on a small weight: both paths, the same codes."""
    import json
    import subprocess
    import sys

    from helpers import REPO
    from megastream import ops

    if not ops.have_ext():
        pytest.skip("the C++ ops are not built here")
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "nf4_load.py"), "--rows", "64", "--cols", "512",
                    "--rounds", "1", "--json", str(out)], check=True, timeout=120)
    r = json.loads(out.read_text())
    assert r["same_codes"] and r["shape"] == [64, 512] and r["ns_per_param"]["torch"] > 0 and r["speedup"] > 0

def _ulp_slack(dtype) -> float:
    return 4 * torch.finfo(dtype).eps  # rounding of w / A, of the table and of the products


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_error_bound_per_block(dtype):
    shape = (256, 1024)
    w = _weight(shape, dtype, seed=1, heavy=True)
    q = quantize(w, "nf4")
    x = w.double().view(-1, BLOCK)
    a = x.abs().amax(1)  # the true block absmaxes
    a_dq = block_absmax(q, torch.float64)
    # Double quantization: within half a step (1 / f) of the true absmax, a whole step where the code
    # was clamped at 127 (torchao's f = 256 / (2 * max) puts the group's largest at 128).
    step = (1 / q.scale_scales.double()).repeat_interleave(GROUP)
    dq_err = (a_dq - a).abs()
    clamped = q.scales == 127
    slack = _ulp_slack(dtype) * a
    assert (dq_err[~clamped] <= step[~clamped] / 2 + slack[~clamped]).all()
    assert (dq_err <= step + slack).all()
    # Each element: the nearest NF4 value is within half the widest gap (x A), plus the absmax error.
    a_used = block_absmax(q, dtype).double()
    out = dequantize(q, torch.float64 if dtype == torch.float32 else dtype)
    err = (out.double().view(-1, BLOCK) - x).abs()
    bound = NF4_MAX_HALF_GAP * a + (a_used - a).abs() + _ulp_slack(dtype) * a_used.abs().maximum(a)
    assert (err.amax(1) <= bound).all()
    assert abs(NF4_MAX_HALF_GAP - 0.1519) < 1e-9
    # The bound is not loose by much: the worst element reaches a good part of it.
    assert (err.amax(1) / bound).max() > 0.5


def test_int8_error_bound_per_element():
    w = _weight((300, 700), torch.float32, seed=2, heavy=True)
    w[5] = 0  # an all-zero row
    q = quantize(w, "int8")
    assert q.scales.dtype == torch.float32 and q.scales.shape == (300,) and q.scale_scales is None
    codes = q.data.view(torch.int8).view(300, 700)
    assert codes.abs().max() == 127 and int(codes[5].abs().max()) == 0
    out = dequantize(q, torch.float32)
    err = (out.double() - w.double()).abs()
    eps = 4 * torch.finfo(torch.float32).eps  # fp32 rounding of w / scale and of code * scale
    assert (err <= q.scales.double()[:, None] / 2 + eps * w.double().abs()).all()
    assert torch.equal(out[5], torch.zeros(700))
    wb = w.to(torch.bfloat16)
    qb = quantize(wb, "int8")  # bf16 in: same bound against the bf16 values
    errb = (dequantize(qb, torch.float32).double() - wb.double()).abs()
    assert (errb <= qb.scales.double()[:, None] / 2 + eps * wb.double().abs()).all()


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_flat_round_trip(scheme):
    shape = (48, 1000)  # nf4: padded; int8: odd section sizes, aligned by the layout
    w = _weight(shape, torch.bfloat16, seed=4)
    q = quantize(w, scheme)
    buf = to_flat(q)
    assert buf.dtype == torch.uint8 and buf.dim() == 1 and buf.numel() == q.nbytes()
    # Into a slice of a bigger (pinned-like) arena, at an aligned offset, then viewed back.
    arena = torch.full((64 + buf.numel() + 16,), 0xAB, dtype=torch.uint8)
    slot = arena[64 : 64 + buf.numel()]
    to_flat(q, out=slot)
    assert torch.equal(slot, buf)
    q2 = from_flat(slot, shape, scheme)
    assert isinstance(q2, QuantizedWeight) and q2.scheme == scheme and q2.shape == shape
    for name in ("data", "scales", "scale_scales", "scale_offset"):
        a, b = getattr(q, name), getattr(q2, name)
        if a is None:
            assert b is None
            continue
        assert b.dtype == a.dtype and torch.equal(a, b)
        assert b.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()  # a view, no copy
    assert torch.equal(dequantize(q2, torch.bfloat16), dequantize(q, torch.bfloat16))
    with pytest.raises(ValueError, match="bytes"):
        from_flat(buf[:-1], shape, scheme)
    with pytest.raises(ValueError, match="bytes"):
        to_flat(q, out=torch.empty(buf.numel() + 1, dtype=torch.uint8))


def test_nf4_padding(to_nf4):
    shape = (5, 100)  # 500 elements: 7 whole blocks and one of 36, padded to 16384
    w = _weight(shape, torch.float32, seed=5)
    q = quantize(w, "nf4")
    assert q.pad == UNIT - 500
    assert q.data.numel() == UNIT // 2 and q.scales.numel() == UNIT // BLOCK and q.scale_scales.numel() == 1
    real = 8
    a = torch.cat([w.view(-1), w.new_zeros(12)]).view(real, BLOCK).abs().amax(1)
    assert torch.equal(q.scale_offset, a.mean().reshape(1))  # the mean of the real blocks only
    assert (q.data[250:] == 0x77).all()  # padded elements: code 7 (0.0)
    assert (q.scales[real:] == 0).all()  # padded blocks: absmax = the mean exactly
    out = dequantize(q, torch.float32)
    assert out.shape == shape
    a_dq = block_absmax(q)[:real]
    err = (torch.cat([out.view(-1), out.new_zeros(12)]) - torch.cat([w.view(-1), w.new_zeros(12)])).abs()
    bound = NF4_MAX_HALF_GAP * a + (a_dq - a).abs() + 1e-6
    assert (err.view(real, BLOCK).amax(1) <= bound).all()
    # The 4-bit codes of the real elements depend on the unquantized absmaxes alone: torchao's on the
    # zero-padded weight agree (its scale codes differ: its mean counts the padded blocks).
    ref = to_nf4(torch.cat([w.view(-1), w.new_zeros(q.pad)]).view(-1, 1024))
    assert torch.equal(q.data[:250], ref.quantized_data[:250])


def test_zero_and_constant_weights():
    for w in (torch.zeros(64, 256), torch.full((64, 256), 0.5)):
        for scheme in ("int8", "nf4"):
            out = dequantize(quantize(w, scheme), torch.float32)
            assert torch.isfinite(out).all()
            assert torch.equal(out, w)  # a constant block is its own absmax: exact in both schemes


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_dequantize_dtype_and_device(scheme):
    w = _weight((64, 512), torch.float32, seed=6)
    q = quantize(w, scheme)
    ref = dequantize(q, torch.float64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = dequantize(q, dtype)
        assert out.dtype == dtype and out.device == q.data.device and out.shape == (64, 512)
        assert out.is_contiguous()
        assert torch.allclose(out.double(), ref, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
    # fp16 input is computed in fp32 (fp16 would overflow the second-level factor): same codes.
    q16 = quantize(w.half(), scheme)
    assert torch.equal(q16.data, quantize(w.half().float(), scheme).data)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_cuda(scheme):
    w = _weight((256, 1024), torch.bfloat16, seed=7, heavy=True)
    q_cpu, q = quantize(w, scheme), quantize(w.cuda(), scheme)
    assert q.data.is_cuda and q.scales.is_cuda
    # Codes match the CPU's (a scale code may differ in a last bit if the device's mean does).
    assert (q.data.cpu() != q_cpu.data).float().mean() < 1e-3
    buf = to_flat(q_cpu).pin_memory().cuda(non_blocking=True)
    q2 = from_flat(buf, w.shape, scheme)
    out = dequantize(q2, torch.bfloat16)
    assert out.is_cuda and out.dtype == torch.bfloat16
    assert torch.equal(out.cpu(), dequantize(q_cpu, torch.bfloat16))


@pytest.mark.gpu
def test_cuda_matches_torchao(to_nf4):
    w = _weight((1024, 1024), torch.bfloat16, seed=8, heavy=True).cuda()
    ref, q = to_nf4(w), quantize(w, "nf4")
    assert torch.equal(q.data, ref.quantized_data) and torch.equal(q.scales, ref.quantized_scalers)
    assert torch.equal(dequantize(q, torch.bfloat16), ref.get_original_weight())


def test_sizes_and_bits_per_param():
    for shape in [(5, 100), (48, 1000), (4096, 4096), (11008, 4096), (151936, 896)]:
        for scheme in ("int8", "nf4"):
            n = quantized_nbytes(shape, scheme)
            if shape[0] * shape[1] < 1 << 20:
                q = quantize(torch.randn(shape), scheme)
                assert q.nbytes() == n == to_flat(q).numel()
                tensors = (q.data, q.scales, q.scale_scales, q.scale_offset)
                parts = sum(t.numel() * t.element_size() for t in tensors if t is not None)
                assert parts <= n < parts + 4 * 16  # the sections, each 16-byte aligned
    bits = {s: quantized_nbytes((4096, 4096), s) * 8 / 4096**2 for s in ("int8", "nf4")}
    assert abs(bits["nf4"] - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-4  # 4.127
    assert abs(bits["int8"] - (8 + 32 / 4096)) < 1e-4  # 8.008
    print(f"bits/param at 4096x4096: {bits}")


def test_bad_input():
    with pytest.raises(ValueError, match="scheme"):
        quantize(torch.randn(4, 64), "int4")
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(2, 4, 64), "nf4")
    with pytest.raises(ValueError, match="floating"):
        quantize(torch.ones(4, 64, dtype=torch.int32), "int8")
    with pytest.raises(ValueError, match="scheme"):
        quantized_nbytes((4, 64), "fp8")
