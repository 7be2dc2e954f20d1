"""The host optimizer ops (csrc/adamw.cpp) against float64 references, and against their
pure-PyTorch fallback (megastream/ops/reference.py), on odd sizes and every dtype combination, on
every instruction-set path (avx512 / avx2 / scalar) that this machine can run."""

import functools
import math
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from megastream import ops
from megastream.ops import reference as R

SIZES = [1, 7, 255, 257, 4097, 262_147]  # the largest spans ~1000 blocks, many OpenMP chunks
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


@pytest.fixture(params=ops.ISAS)
def isa(request):
    """Run the test on one instruction-set path of the C++ ops; skipped where the CPU (or a
    MEGASTREAM_CPU_ISA cap) has no such path. The scalar path runs everywhere, avx2 on x86-64-v3."""
    assert ops.have_ext(), "the C++ ops could not be built"
    if request.param not in ops.supported_cpu_isas():
        pytest.skip(f"this machine has no {request.param} path (its paths: {ops.supported_cpu_isas()})")
    ops.set_cpu_isa(request.param)
    yield request.param
    ops.set_cpu_isa(None)


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


@functools.lru_cache(maxsize=None)
def _reference_run(n, combo):
    """Three steps of the pure-PyTorch reference (computed once, shared by every path's test)."""
    bufs, _ = _setup(_inputs(n, seed=1), *COMBOS[combo])
    for step in (1, 2, 3):
        _step(bufs, n // 3, step, use_ext=False, key=step)
    return bufs


@pytest.mark.parametrize("n", [1, 7, 257, 4097, 100_003])
@pytest.mark.parametrize("combo", range(len(COMBOS)), ids=COMBO_IDS)
def test_fallback_matches_cpp_exactly(n, combo, isa):
    """Element for element, on every path: the C++ op and the reference do the same float32
    operations in the same order (no FMA, IEEE sqrt and division, integer bit tricks)."""
    a, _ = _setup(_inputs(n, seed=1), *COMBOS[combo])
    for step in (1, 2, 3):
        _step(a, n // 3, step, use_ext=True, key=step)
    for ta, tb in zip(a, _reference_run(n, combo)):
        if ta is not None:
            assert torch.equal(ta, tb)


def _special(n, seed, dtype):
    """Random values with ~1/8 of them replaced by NaN (the default payloads arithmetic makes,
    and bf16 0xffff, what torch's vectorised float->bf16 cast gives a NaN), infinities, zeros of
    both signs, subnormals and values near the float32 limits."""
    g = torch.Generator().manual_seed(seed)
    vals = torch.tensor([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38, 1e-45,
                         2.0 ** -126, 1e-20, -1e-20])
    x = torch.randn(n, generator=g) * 1e-3
    k = n // 8
    x[torch.randint(0, n, (k,), generator=g)] = vals[torch.randint(0, len(vals), (k,), generator=g)]
    if dtype == torch.bfloat16:
        b = x.view(torch.int32) >> 16  # truncate: keeps the NaNs' payloads as they are
        b[torch.randint(0, n, (n // 64,), generator=g)] = -1  # 0xffff
        return b.to(torch.int16).view(torch.bfloat16)
    return x


def _same_bits(a, b):
    """Bit-identical, except that a NaN's sign and payload may differ (IEEE leaves which NaN
    operand propagates open, and compilers commute float additions and multiplications)."""
    if a.dtype in (torch.float32, torch.bfloat16):
        if not torch.equal(a.isnan(), b.isnan()):
            return False
        a, b = a[~a.isnan()], b[~b.isnan()]
        ints = torch.int32 if a.dtype == torch.float32 else torch.int16
        return torch.equal(a.view(ints), b.view(ints))
    return torch.equal(a, b)


@pytest.mark.parametrize("combo", range(len(COMBOS)), ids=COMBO_IDS)
def test_special_values_agree_on_every_path(combo):
    """NaN, infinities, signed zeros, subnormals, overflow: every path gives the scalar path's bits
    (NaNs in the same places), including the int8 codes and scales. (The reference differs from all
    paths on NaNs: torch's bf16 casts and amax treat them their own way.)"""
    wdt, sdt, gdt = COMBOS[combo]
    n = 3 * 256 + 37

    def bufs():
        w, g = _special(n, 1, wdt), _special(n, 2, gdt)
        if sdt == "int8":
            m, ms = R.quantize_m(torch.randn(n, generator=torch.Generator().manual_seed(3)) * 1e-3)
            v, vs = R.quantize_sqrt_v(torch.rand(n, generator=torch.Generator().manual_seed(4)) * 1e-3)
            m[::17], v[::19] = -128, 255  # codes the op never writes, but a corrupt file could hold
            ms[1], vs[2] = math.inf, 0.0
            return [w, g, m, v, ms, vs, None]
        working = torch.empty(n, dtype=torch.bfloat16) if wdt == torch.float32 else None
        return [w, g, _special(n, 3, sdt), _special(n, 4, sdt).abs(), None, None, working]

    results = {}
    for path in ops.supported_cpu_isas():
        ops.set_cpu_isa(path)
        try:
            b = bufs()
            for step in (1, 2):
                _step(b, n // 2, step, use_ext=True, key=step)
            results[path] = b
        finally:
            ops.set_cpu_isa(None)
    want = results["scalar"]
    for path, got in results.items():
        for i, (ta, tb) in enumerate(zip(got, want)):
            if ta is not None:
                assert _same_bits(ta, tb), f"{path} differs from scalar in buffer {i}"


def test_unaligned_working_copy(isa):
    """A 64-byte-aligned working copy is written with non-temporal stores, any other with plain
    ones: the same bits either way."""
    n = 4 * 256 + 5
    x = _inputs(n, seed=5)
    out = []
    for offset in (0, 1):
        bufs, _ = _setup(x, torch.float32, torch.float32, torch.bfloat16)
        bufs[6] = torch.empty(n + offset, dtype=torch.bfloat16)[offset:]
        _step(bufs, n, 1, use_ext=True)
        out.append(bufs)
    ref, _ = _setup(x, torch.float32, torch.float32, torch.bfloat16)
    _step(ref, n, 1, use_ext=False)
    for a, b, r in zip(*out, ref):
        if a is not None:
            assert torch.equal(a, r) and torch.equal(b, r)


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


@pytest.mark.parametrize("src_dtype", [None, torch.float32, torch.bfloat16])
def test_accumulate_sqnorm_same_bits_on_every_path_and_thread_count(src_dtype):
    """The norm feeds the clipping factor, so exact resume needs it independent of the thread
    count; it is also the same on every path (16 interleaved float lanes per block of 256, summed in
    a fixed order, blocks summed in order in double). Sizes cover partial groups and blocks."""
    threads = torch.get_num_threads()
    for n in (1, 15, 16, 17, 255, 256, 257, 4096 + 33, 100_003):
        g = torch.Generator().manual_seed(n)
        dst0 = torch.randn(n, generator=g)
        src = None if src_dtype is None else torch.randn(n, generator=g).to(src_dtype)
        seen = set()
        for path in ops.supported_cpu_isas():
            for t in (1, 2):
                ops.set_cpu_isa(path)
                torch.set_num_threads(t)
                try:
                    dst = dst0.clone()
                    norm = ops.accumulate_sqnorm(dst, src, 0.5, use_ext=True)
                finally:
                    ops.set_cpu_isa(None)
                    torch.set_num_threads(threads)
                seen.add((norm, dst.view(torch.int32).sum().item(), hash(dst.numpy().tobytes())))
        assert len(seen) == 1, (n, seen)


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


def test_cpu_isa_choice():
    """The widest path this CPU has runs by default (or MEGASTREAM_CPU_ISA's); others can be
    switched to; asking for one the CPU lacks is a clear error, not a crash on an illegal
    instruction."""
    paths = ops.supported_cpu_isas()
    assert paths and paths[-1] == "scalar" and ops.cpu_isa() == paths[0]
    assert paths == [i for i in ops.ISAS if i in paths]  # widest first
    for p in paths:
        assert ops.set_cpu_isa(p) == p == ops.cpu_isa()
    assert ops.set_cpu_isa(None) == paths[0]
    with pytest.raises(ops.CpuIsaError, match="avx512, avx2, scalar"):
        ops.set_cpu_isa("sse9")
    for p in ops.ISAS:
        if p not in paths:
            with pytest.raises(ops.CpuIsaError, match=p):
                ops.set_cpu_isa(p)
            assert ops.cpu_isa() == paths[0]


def test_env_var_forces_a_path(monkeypatch):
    """MEGASTREAM_CPU_ISA=scalar runs (and caps the ops at) the scalar path; a bad value, or a path
    the CPU lacks, stops at load with a message that names the variable. (In-process: the ops are
    loaded once per process, so the load is replayed with the library already in.)"""
    assert ops.have_ext()
    have = ops._cpu_isas()

    def load(value):
        monkeypatch.setenv("MEGASTREAM_CPU_ISA", value)
        monkeypatch.setattr(ops, "_state", {})
        monkeypatch.setattr(ops, "_build", lambda: True)
        return ops.have_ext()

    try:
        assert load("scalar") and ops.cpu_isa() == "scalar" and ops.supported_cpu_isas() == ["scalar"]
        assert ops.set_cpu_isa(None) == "scalar"
        if "avx2" in have:
            with pytest.raises(ops.CpuIsaError, match="MEGASTREAM_CPU_ISA=scalar limits"):
                ops.set_cpu_isa("avx2")
        with pytest.raises(ops.CpuIsaError, match="MEGASTREAM_CPU_ISA='avx3': expected one of avx512, avx2, scalar"):
            load("avx3")
        for p in ops.ISAS:
            if p not in have:
                with pytest.raises(ops.CpuIsaError, match=f"MEGASTREAM_CPU_ISA={p}: this CPU cannot run"):
                    load(p)
    finally:
        monkeypatch.undo()
        ops.set_cpu_isa(None)


@pytest.mark.slow  # ~25 s to compile SIMDe's AVX-512 emulation: over this file's 10 s per-test budget
def test_avx512_path_emulated(tmp_path):
    """The AVX-512 kernels, which most CI machines cannot run, built against SIMDe's portable
    AVX-512 intrinsics and compared with the scalar path on every mode, random and special values
    (csrc/check_isa.cpp). Skipped without g++ or the SIMDe headers (Debian/Ubuntu: libsimde-dev)."""
    csrc = Path(ops.__file__).resolve().parent.parent.parent / "csrc"
    if not shutil.which("g++"):
        pytest.skip("no g++")
    exe = tmp_path / "check_isa"
    build = subprocess.run(["g++", "-O1", "-std=c++17", "-ffp-contract=off", "-fno-math-errno", f"-I{csrc}",
                            str(csrc / "check_isa.cpp"), "-o", str(exe)], capture_output=True, text=True, timeout=300)
    if build.returncode and "simde/x86/avx512.h" in build.stderr:
        pytest.skip("SIMDe headers not installed")
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "passed: 0 failed" in run.stdout, run.stdout[-3000:]
