"""CUDA faults found by reading the CUDA path (issue 12, section 1), tested without a GPU: the CUDA
runtime, its streams and NVML are replaced by fakes that record what is called, in which order."""

import gc
import sys
import types
import warnings
from types import SimpleNamespace

import pytest
import torch

import megastream.cuda
import megastream.engine.activations
from megastream import telemetry
from megastream.model.layout import model_layout
from megastream.store import HostStore, _unregister, pinned_zeros
from test_engine import _engine, _spec

CUDA_ERROR_MEMORY_ALLOCATION = 2
CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED = 713


class FakeRuntime:
    """torch.cuda.cudart() with one per-thread "last error", as the CUDA runtime keeps it: a failed
    call sets it; cudaGetLastError (megastream.cuda.clear_last_error) reads and resets it."""

    def __init__(self, log, register_error=0, unregister_error=0):
        self.log, self.register_error, self.unregister_error = log, register_error, unregister_error
        self.last_error = 0

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.log.append("register")
        self.last_error = self.last_error or self.register_error
        return self.register_error

    def cudaHostUnregister(self, ptr):
        self.log.append("unregister")
        self.last_error = self.last_error or self.unregister_error
        return self.unregister_error

    def get_last_error(self):
        self.log.append("clear")
        err, self.last_error = self.last_error, 0
        return err


@pytest.fixture
def runtime(monkeypatch):
    def install(**errors):
        log = []
        rt = FakeRuntime(log, **errors)
        monkeypatch.setattr(torch.cuda, "cudart", lambda: rt)
        monkeypatch.setattr(megastream.cuda, "clear_last_error", rt.get_last_error)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("synchronize"))
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: log.append("pin_memory") or t.clone())
        return rt

    return install


# ---- 2. a failed cudaHostRegister must not leave its error for the next kernel launch ----------
def test_pin_fallback_clears_the_cuda_error_before_its_first_use(runtime):
    rt = runtime(register_error=CUDA_ERROR_MEMORY_ALLOCATION)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p, release = pinned_zeros(1000, torch.float32)
    assert p.shape == (1000,) and not p.any()  # torch's pinned copy
    assert rt.last_error == 0  # the first checked launch after the fallback finds no error
    assert rt.log == ["register", "clear", "pin_memory"]
    assert [str(w.message) for w in caught] == ["cudaHostRegister of 0.00 GB failed (CUDA error 2); falling back "
                                                "to torch's pinned allocator, which rounds each arena up to a "
                                                "power of two"]
    release()  # nothing registered: nothing to undo
    assert len(rt.log) == 3


def test_store_falls_back_without_registering_anything(runtime):
    rt = runtime(register_error=CUDA_ERROR_MEMORY_ALLOCATION)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = HostStore(model_layout(_spec(False)), torch.bfloat16, torch.bfloat16, pin=True)
    assert rt.log == ["register", "clear", "pin_memory"] * 3  # working, grad, embed_grad
    assert rt.last_error == 0
    store.close()  # nothing was registered in place: nothing to wait for or unregister
    assert len(rt.log) == 9


def test_pin_registers_page_aligned_zeros_once_and_releases_once(runtime):
    rt = runtime()
    t, release = pinned_zeros(1000, torch.float32)
    assert t.shape == (1000,) and t.dtype == torch.float32 and not t.any() and t.data_ptr() % 4096 == 0
    assert rt.log == ["register"]
    release()
    release()  # at most once, whoever calls it (close, then the finalizer)
    assert rt.log == ["register", "synchronize", "unregister"]
    t += 1  # still ordinary host memory after its release


def test_an_arena_freed_without_close_is_unregistered_when_its_last_view_dies(runtime):
    """A store dropped without close (an exception, a test's failed assert) must not leave its
    registrations behind: the next allocation at those addresses would fail to register (CUDA error
    712) and copies through them would fail ('invalid argument'), as the first GPU run showed."""
    rt = runtime()
    store = HostStore(model_layout(_spec(False)), torch.bfloat16, torch.bfloat16, pin=True)
    view = store.working_of(1)
    rt.log.clear()
    del store
    gc.collect()
    assert rt.log == ["synchronize", "unregister"] * 2  # grad and embed_grad; `working` lives in `view`
    del view
    gc.collect()
    assert rt.log == ["synchronize", "unregister"] * 3



def _mapped(ptr: int) -> bool:
    """Whether address `ptr` lies in one of this process's mappings (/proc/self/maps)."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


def test_the_finalizer_unregisters_before_the_pages_are_unmapped(runtime):
    """The registration must end while the memory is still mapped: unregistering after the munmap
    leaves a window in which another thread's mmap can be given those addresses (and its
    cudaHostRegister fail, CUDA error 712), and a copy still in flight would outlive its mapping."""
    rt = runtime()
    mapped = []
    unregister = rt.cudaHostUnregister
    rt.cudaHostUnregister = lambda ptr: (mapped.append(_mapped(ptr)), unregister(ptr))[1]
    t, _ = pinned_zeros(1 << 20, torch.float32)
    view = t[10:20]
    del t
    gc.collect()
    assert mapped == []  # a view keeps the arena registered
    del view
    gc.collect()
    assert mapped == [True]


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_a_pinned_quantized_store_allocates_its_packed_arena_once(runtime, monkeypatch, quant):
    """A quantized base's packed arena (~40 GB for a 72B NF4 base on a 64 GB host) is allocated pinned
    from the start, never as ordinary zeros first and then again as the pinned arena."""
    rt = runtime()
    sizes = []
    zeros = torch.zeros

    def spy(*args, **kw):
        sizes.append(args[0] if args and isinstance(args[0], int) else None)
        return zeros(*args, **kw)

    monkeypatch.setattr(torch, "zeros", spy)
    store = HostStore(model_layout(_spec(False)), torch.float32, torch.float32, pin=True, trainable=False, quant=quant)
    assert store.packed.numel() > 0 and store.packed.numel() not in sizes
    assert rt.log == ["register"] * 2  # working (embedding and head) and packed

def test_failed_unregister_clears_the_cuda_error(runtime):
    rt = runtime(unregister_error=CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _unregister(torch.zeros(10).data_ptr())
    assert rt.last_error == 0 and rt.log == ["synchronize", "unregister", "clear"]
    assert [str(w.message) for w in caught] == ["cudaHostUnregister failed (CUDA error 713)"]


def test_clear_last_error_without_a_cuda_runtime_returns_none(monkeypatch):
    monkeypatch.setattr(megastream.cuda, "_lib", None)
    monkeypatch.setattr(megastream.cuda, "find_libcudart", lambda: None)
    assert megastream.cuda.clear_last_error() is None


def test_clear_last_error_calls_cudaGetLastError(monkeypatch):
    errors = [700]
    lib = SimpleNamespace(cudaGetLastError=lambda: errors.pop() if errors else 0)
    monkeypatch.setattr(megastream.cuda, "_lib", lib)
    assert megastream.cuda.clear_last_error() == 700
    assert megastream.cuda.clear_last_error() == 0


def test_find_libcudart_reads_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 11 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f02-7f03 rw-p 00000000 00:00 0 \n"
        "7f04-7f05 r-xp 00000000 08:01 12 /venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib/libcudart.so.13\n")
    assert megastream.cuda.find_libcudart(str(maps)) == \
        "/venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib/libcudart.so.13"
    maps.write_text("7f04-7f05 r-xp 00000000 08:01 12 /opt/my dir/torch/lib/libcudart-9335f6a2.so.12\n")
    assert megastream.cuda.find_libcudart(str(maps)) == "/opt/my dir/torch/lib/libcudart-9335f6a2.so.12"
    maps.write_text("7f04-7f05 r-xp 00000000 08:01 12 /opt/lib/libcudart_static_helper.so\n")
    assert megastream.cuda.find_libcudart(str(maps)) is None
    assert megastream.cuda.find_libcudart(str(tmp_path / "absent")) is None


# ---- 3. pinned memory is unregistered only after the copies using it have landed ---------------
class FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def synchronize(self):
        self.log.append(f"sync {self.name}")


def test_engine_close_drains_the_copy_streams_before_unregistering(monkeypatch):
    store, engine = _engine(_spec(False))
    log = []
    s = engine.streams
    s.cuda = True  # as on a GPU: four streams, copies in flight until synchronised
    s.compute, s.h2d, s.d2h, s.offload = (FakeStream(n, log) for n in ("compute", "h2d", "d2h", "offload"))
    engine.ckpts._arena, engine.ckpts._release = torch.zeros(16), lambda: log.append("unregister")  # registered
    engine.close()
    assert log[-1] == "unregister"
    assert sorted(log[:-1]) == ["sync compute", "sync d2h", "sync h2d", "sync offload"]


def test_store_close_synchronises_before_unregistering(runtime):
    rt = runtime()
    store = HostStore(model_layout(_spec(False)), torch.bfloat16, torch.bfloat16, pin=True)
    assert rt.log == ["register"] * 3
    rt.log.clear()
    store.close()
    assert rt.log == ["synchronize", "unregister"] * 3


# ---- 5. NVML: the device torch uses, found by UUID, never by its CUDA index --------------------
GPU_UUIDS = ["GPU-0a1b2c3d-0000-1111-2222-333344445555", "GPU-11111111-2222-3333-4444-555566667777",
             "GPU-7f9c0a1e-8b2d-4c3e-9f40-a1b2c3d4e5f6", "GPU-deadbeef-0000-0000-0000-000000000000"]


class FakeUuid:
    """torch's _CUuuid: str() gives the UUID without NVML's 'GPU-' prefix."""

    def __init__(self, s):
        self.s = s

    def __str__(self):
        return self.s


@pytest.fixture
def nvml(monkeypatch):
    """A machine with four GPUs and CUDA_VISIBLE_DEVICES=2: torch's cuda:0 is NVML's device 2.
    The PCI bus id lookup fails (as it does where the bus id cannot be formed or matched)."""
    calls = []

    class NVMLError(Exception):
        pass

    def by_pci(bus):
        raise NVMLError("not found")

    m = types.ModuleType("pynvml")
    m.NVMLError = NVMLError
    m.nvmlInit = lambda: calls.append("init")
    m.nvmlShutdown = lambda: calls.append("shutdown")
    m.nvmlDeviceGetHandleByPciBusId = by_pci
    m.nvmlDeviceGetCount = lambda: len(GPU_UUIDS)
    m.nvmlDeviceGetHandleByIndex = lambda i: f"handle{i}"
    m.nvmlDeviceGetUUID = lambda h: GPU_UUIDS[int(h[6:])]
    monkeypatch.setitem(sys.modules, "pynvml", m)
    visible = {0: GPU_UUIDS[2]}  # CUDA index -> the GPU it is
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(
        uuid=FakeUuid(visible[torch.device(d).index][4:]), pci_domain_id=0, pci_bus_id=0x41, pci_device_id=0))
    m.calls = calls
    return m


def test_nvml_handle_matches_the_cuda_device_by_uuid(nvml):
    assert telemetry._nvml_handle(torch.device("cuda", 0)) == "handle2"  # not handle0
    assert nvml.calls == ["init"]  # left open for Monitor.sample; Monitor.close shuts it down


def test_nvml_uuids_compare_across_formats(nvml):
    nvml.nvmlDeviceGetUUID = lambda h: GPU_UUIDS[int(h[6:])].upper().encode()  # older bindings: bytes
    assert telemetry._nvml_handle(torch.device("cuda", 0)) == "handle2"
    assert telemetry.uuid_hex("GPU-7F9C0A1E-8b2d-4c3e-9f40-a1b2c3d4e5f6") == "7f9c0a1e8b2d4c3e9f40a1b2c3d4e5f6"


def test_nvml_handle_is_none_when_no_gpu_matches(nvml):
    nvml.nvmlDeviceGetUUID = lambda h: "GPU-ffffffff-ffff-ffff-ffff-ffffffffffff"
    assert telemetry._nvml_handle(torch.device("cuda", 0)) is None
    assert nvml.calls == ["init", "shutdown"]


def test_nvml_prefers_the_pci_bus_id(nvml):
    nvml.nvmlDeviceGetHandleByPciBusId = lambda bus: f"pci {bus}"
    assert telemetry._nvml_handle(torch.device("cuda", 0)) == "pci 00000000:41:00.0"
