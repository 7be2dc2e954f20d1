"""The overlap summary's interval arithmetic, on a hand-made trace."""

import pytest

from megastream.profiling import summarize_trace


def _ev(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_busy_and_hidden_fractions():
    events = [
        _ev("kernel", "gemm", 0, 40), _ev("kernel", "gemm", 30, 30),  # busy [0, 60)
        _ev("kernel", "gemm", 80, 20),  # busy [80, 100)
        _ev("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 10, 20),  # fully under compute
        _ev("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 55, 10),  # half hidden
        _ev("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 60, 20),  # in the gap: not hidden
        _ev("cpu_op", "aten::mm", 0, 500),  # host events are ignored
    ]
    s = summarize_trace(events)
    assert s["gpu_span_s"] == pytest.approx(100e-6)
    assert s["compute_busy_fraction"] == pytest.approx(0.8)
    assert s["h2d_s"] == pytest.approx(30e-6) and s["h2d_hidden_fraction"] == pytest.approx(25 / 30)
    assert s["d2h_hidden_fraction"] == 0.0


def test_no_kernels_is_an_error():
    with pytest.raises(ValueError, match="no CUDA kernels"):
        summarize_trace([_ev("gpu_memcpy", "Memcpy HtoD", 0, 1)])


def test_copies_of_given_sizes_only():
    """copy_bytes picks one kind of copy by its size (the trace's args.bytes): here the small ones,
    hidden under compute, apart from a large exposed one."""
    small = [dict(_ev("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 10, 20), args={"bytes": 64})]
    large = [dict(_ev("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 60, 40), args={"bytes": 4096})]
    events = [_ev("kernel", "gemm", 0, 50), *small, *large, _ev("kernel", "gemm", 100, 10)]
    assert summarize_trace(events)["d2h_hidden_fraction"] == pytest.approx(20 / 60)
    s = summarize_trace(events, copy_bytes={64})
    assert s["d2h_s"] == pytest.approx(20e-6) and s["d2h_hidden_fraction"] == 1.0
    assert summarize_trace(events, copy_bytes={7})["d2h_s"] == 0  # none of that size
