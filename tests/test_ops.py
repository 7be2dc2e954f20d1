"""The host optimizer ops (csrc/adamw.cpp) against float64 references, and against their
pure-PyTorch fallback (megastream/ops/reference.py), on odd sizes and every dtype combination."""

import math
import warnings

import pytest
import torch

from megastream import ops
from megastream.ops import reference as R

SIZES = [1, 7, 255, 257, 4097, 1_000_003]
HP = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_scale=0.7)


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(p=torch.randn(n, generator=g, dtype=torch.float64) * 0.05,
                g=torch.randn(n, generator=g, dtype=torch.float64) * 1e-2,
                m=torch.randn(n, generator=g, dtype=torch.float64) * 1e-3,
                v=torch.rand(n, generator=g, dtype=torch.float64) * 1e-4 + 1e-8)


def _f64_step(x, n_decay, step):
    """The AdamW update in float64 on the given (already dtype-rounded) values.
    Returns (p, m, v, step_size / denom): the last is how errors in m reach p."""
    p, g, m, v = (x[k].clone() for k in "pgmv")
    g = g * HP["grad_scale"]
    p[:n_decay] *= 1 - HP["lr"] * HP["weight_decay"]
    m = m + (1 - HP["beta1"]) * (g - m)
    v = HP["beta2"] * v + (1 - HP["beta2"]) * g * g
    denom = v.sqrt() / math.sqrt(1 - HP["beta2"] ** step) + HP["eps"]
    gain = HP["lr"] / (1 - HP["beta1"] ** step) / denom
    p = p - gain * m
    return p, m, v, gain


def _setup(x, wdt, sdt, gdt):
    """Buffers of the op's mode, plus the float64 values they actually hold."""
    n = x["p"].numel()
    w = x["p"].to(wdt)
    grad = x["g"].to(gdt)
    if sdt == "int8":
        m, ms = R.quantize_m(x["m"].float())
        v, vs = R.quantize_sqrt_v(x["v"].float().sqrt())
        held_m, held_v = R.dequantize_m(m, ms).double(), R.dequantize_sqrt_v(v, vs).double() ** 2
    else:
        m, v, ms, vs = x["m"].to(sdt), x["v"].to(sdt), None, None
        held_m, held_v = m.double(), v.double()
    working = torch.empty(n, dtype=torch.bfloat16) if wdt == torch.float32 else None
    held = dict(p=w.double(), g=grad.double(), m=held_m, v=held_v)
    return [w, grad, m, v, ms, vs, working], held


def _step(bufs, n_decay, step, use_ext, key=7):
    ops.adamw_step(*bufs, n_decay=n_decay, step=step, key=key, use_ext=use_ext, **HP)


COMBOS = [(w, s, g) for w in (torch.float32, torch.bfloat16) for s in (torch.float32, torch.bfloat16, "int8")
          for g in (torch.float32, torch.bfloat16)]
COMBO_IDS = [f"w{str(w)[6:]}-s{s if isinstance(s, str) else str(s)[6:]}-g{str(g)[6:]}" for w, s, g in COMBOS]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("wdt,sdt,gdt", COMBOS, ids=COMBO_IDS)
def test_matches_float64_reference(n, wdt, sdt, gdt):
    x = _inputs(n, seed=n)
    bufs, held = _setup(x, wdt, sdt, gdt)
    n_decay = n // 2
    p64, m64, v64, gain = _f64_step(held, n_decay, step=3)
    _step(bufs, n_decay, 3, use_ext=True)
    w, _, m, v, ms, vs, working = bufs
    # Errors are bounded relative to the magnitudes of the terms that produce each value (a result
    # near zero by cancellation carries the rounding of its terms).
    g_eff = held["g"].abs() * HP["grad_scale"]
    scale_m = held["m"].abs() + g_eff
    scale_v = held["v"] + g_eff ** 2
    scale_p = held["p"].abs() + gain * scale_m
    # Weights: fp32 master to float32 rounding; bf16 (stochastic rounding) within one bf16 ulp.
    tol_w = 4e-7 if wdt == torch.float32 else 2 ** -7
    assert ((w.double() - p64).abs() <= tol_w * scale_p).all()
    if working is not None:
        assert torch.equal(working, w.to(torch.bfloat16))  # the fp32 master, rounded to nearest even
    if sdt == "int8":
        got_m, got_v = R.dequantize_m(m, ms).double(), R.dequantize_sqrt_v(v, vs).double() ** 2
        _check_code(got_m, m64, ms, 15)
        _check_code(got_v.sqrt(), v64.sqrt(), vs, 31)
    else:
        tol_s = 4e-7 if sdt == torch.float32 else 2 ** -8
        assert ((m.double() - m64).abs() <= tol_s * scale_m).all()
        assert ((v.double() - v64).abs() <= tol_s * scale_v).all()


def _check_code(got, want, scale, binades):
    """The documented bound of the 8-bit code: relative error < 2^-3 (one code step, rounding
    stochastically) at or above 2^-binades of the block's absmax; below it values may flush to
    zero (never grow)."""
    block_max = scale.double().repeat_interleave(R.BLOCK)[:want.numel()]
    big = want.abs() >= block_max * 2.0 ** -binades * 1.0001
    err = (got - want).abs()
    assert (err[big] <= 2 ** -3 * want.abs()[big] * 1.0001 + 1e-30).all()
    assert (got.abs()[~big] <= 2.0 ** -binades * block_max[~big] * 1.0001 * 1.125).all()


@pytest.mark.parametrize("n", [1, 7, 257, 4097, 100_003])
@pytest.mark.parametrize("wdt,sdt,gdt", COMBOS, ids=COMBO_IDS)
def test_fallback_matches_cpp_exactly(n, wdt, sdt, gdt):
    x = _inputs(n, seed=1)
    a, _ = _setup(x, wdt, sdt, gdt)
    b, _ = _setup(x, wdt, sdt, gdt)
    for step in (1, 2, 3):
        _step(a, n // 3, step, use_ext=True, key=step)
        _step(b, n // 3, step, use_ext=False, key=step)
    for ta, tb in zip(a, b):
        if ta is not None:
            assert torch.equal(ta, tb)


def test_stochastic_rounding_is_unbiased_and_reproducible():
    n = 200_000
    x = torch.full((n,), 1.0 + 2 ** -10, dtype=torch.float32)  # 1/8 of a bf16 ulp above 1.0
    rounded = R.bf16_stochastic_round(x, key=123).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    mean = rounded.double().mean().item()
    # Bernoulli(1/8) steps of one ulp: std of the mean = ulp * sqrt(p(1-p)/n)
    sd = 2 ** -7 * math.sqrt(0.125 * 0.875 / n)
    assert abs(mean - (1.0 + 2 ** -10)) < 5 * sd
    assert torch.equal(R.bf16_stochastic_round(x, key=123), R.bf16_stochastic_round(x, key=123))
    assert not torch.equal(R.bf16_stochastic_round(x, key=123), R.bf16_stochastic_round(x, key=124))


def test_stochastic_rounding_keeps_small_updates():
    """bf16 weights with round-to-nearest lose updates below half an ulp; with stochastic rounding
    the C++ op keeps them on average (DESIGN.md: why lean mode must round stochastically)."""
    n = 100_000
    w = torch.ones(n, dtype=torch.bfloat16)
    m, v = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
    grad = torch.ones(n, dtype=torch.bfloat16)
    lr = 2 ** -11  # Adam's first step moves each weight by ~lr: a quarter of a bf16 ulp at 1.0
    for step in (1, 2, 3, 4):
        ops.adamw_step(w, grad, m, v, n_decay=0, lr=lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0,
                       step=step, key=step, use_ext=True)
    drift = 1.0 - w.double().mean().item()
    assert drift == pytest.approx(4 * lr, rel=0.05)  # round-to-nearest would give 0
    w2 = torch.ones(n, dtype=torch.bfloat16)
    m2, v2 = torch.zeros_like(m), torch.zeros_like(v)
    for step in (1, 2, 3, 4):
        ops.adamw_step(w2, grad, m2, v2, n_decay=0, lr=lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0,
                       step=step, key=step, use_ext=True)
    assert torch.equal(w, w2)  # same keys, same result


@pytest.mark.parametrize("n", [1, 7, 4097, 1_000_003])
def test_int8_round_trip_error_bound(n):
    g = torch.Generator().manual_seed(n)
    m = torch.randn(n, generator=g) * torch.logspace(-6, 0, n)  # wide dynamic range within blocks
    q, s = R.quantize_m(m)
    _check_code(R.dequantize_m(q, s).double(), m.double(), s, 15)
    sv = torch.rand(n, generator=g) * torch.logspace(-9, 0, n)
    q, s = R.quantize_sqrt_v(sv)
    _check_code(R.dequantize_sqrt_v(q, s).double(), sv.double(), s, 31)


@pytest.mark.parametrize("src_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_ext", [True, False], ids=["cpp", "fallback"])
def test_accumulate_sqnorm(src_dtype, use_ext):
    n = 100_003
    g = torch.Generator().manual_seed(0)
    dst = torch.randn(n, generator=g)
    src = None if src_dtype is None else torch.randn(n, generator=g).to(src_dtype)
    want = dst.double() + (0 if src is None else 0.5 * src.double())
    got = ops.accumulate_sqnorm(dst, src, 0.5, use_ext=use_ext)
    assert got == pytest.approx(float((want * want).sum()), rel=1e-5)
    torch.testing.assert_close(dst.double(), want, rtol=1e-6, atol=1e-7)


def test_fallback_warns_once(monkeypatch, tmp_path):
    monkeypatch.setattr(ops, "_SRC", tmp_path / "missing.cpp")
    monkeypatch.setattr(ops, "_state", {})
    monkeypatch.delenv("MEGASTREAM_NO_EXT", raising=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert ops.have_ext() is False
        assert ops.have_ext() is False
        x = torch.ones(3)
        ops.adamw_step(x, torch.ones(3), torch.zeros(3), torch.zeros(3), n_decay=0, lr=0.1, beta1=0.9,
                       beta2=0.95, eps=1e-8, weight_decay=0.0, step=1)
    msgs = [str(m.message) for m in w if "megastream" in str(m.message)]
    assert len(msgs) == 1 and ("fallback" in msgs[0] or "slower" in msgs[0]), msgs
    assert x.lt(1).all()  # the fallback did the update


def test_the_extension_is_built_here():
    """CI machines have a compiler: the compiled ops must be in use, not the fallback."""
    assert ops.have_ext()


def test_int8_codes_round_stochastically_and_unbiased():
    """A value between two codes is encoded as either neighbour, in proportion: the mean over many
    keys recovers it (with round-to-nearest, small per-step moment changes would stall)."""
    x = torch.full((256,), 0.3)
    x[0] = 1.0  # the block's absmax: 0.3 then sits between two 3-bit-mantissa codes
    means = []
    for fn, dec in ((R.quantize_m, R.dequantize_m), (R.quantize_sqrt_v, R.dequantize_sqrt_v)):
        vals = torch.stack([dec(*fn(x, key)) for key in range(400)])[:, 1:]
        assert len(vals.unique()) == 2  # the two neighbouring codes
        means.append(vals.double().mean().item())
    # 400 keys x 255 elements; one code step at 0.3 is 2^-5: the mean is far tighter than that
    assert means[0] == pytest.approx(0.3, rel=2e-3) and means[1] == pytest.approx(0.3, rel=2e-3)
