"""What a running job reports about the machine: host RSS (psutil), GPU memory (torch's allocator)
and GPU utilisation (NVML), sampled once per step; and optional TensorBoard scalars."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from megastream.machine import peak_rss, rss


class Monitor:
    def __init__(self, device: torch.device):
        self.device = device
        self._nvml = None
        if device.type == "cuda":
            self._nvml = _nvml_handle(device)

    def sample(self) -> dict:
        """Per-step readings (GB = 1e9 bytes). The GPU peak is reset after each sample, so it is the
        step's own peak."""
        now = rss()
        out = {"host_rss_gb": now / 1e9, "host_peak_rss_gb": max(now, peak_rss()) / 1e9}  # the kernel's high-water
        # mark can trail the current RSS by a few pages
        if self.device.type == "cuda":
            out["gpu_mem_gb"] = torch.cuda.memory_allocated(self.device) / 1e9
            out["gpu_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
            out["gpu_reserved_gb"] = torch.cuda.memory_reserved(self.device) / 1e9
            torch.cuda.reset_peak_memory_stats(self.device)
            if self._nvml is not None:
                import pynvml

                try:
                    out["gpu_util"] = float(pynvml.nvmlDeviceGetUtilizationRates(self._nvml).gpu)
                    out["gpu_used_gb"] = pynvml.nvmlDeviceGetMemoryInfo(self._nvml).used / 1e9  # all processes
                except pynvml.NVMLError:
                    pass
        return out

    def close(self) -> None:
        if self._nvml is not None:
            import pynvml

            pynvml.nvmlShutdown()
            self._nvml = None


def _nvml_handle(device: torch.device):
    """The NVML handle of the GPU torch calls `device`, matched by PCI bus id, else by UUID: NVML
    numbers every GPU of the machine, CUDA only the visible ones (CUDA_VISIBLE_DEVICES) in its own
    order, so a CUDA index is no NVML index. None when NVML is unavailable or no GPU matches."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        props = torch.cuda.get_device_properties(device)
    except Exception:
        props = None
    handle = None
    if props is not None:
        handle = _by_pci_bus_id(pynvml, props)
        if handle is None:
            handle = _by_uuid(pynvml, props)
    if handle is None:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()  # Monitor.close shuts down only when a handle was found
    return handle


def _by_pci_bus_id(pynvml, props):
    try:
        bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return pynvml.nvmlDeviceGetHandleByPciBusId(bus)
    except Exception:
        return None


def uuid_hex(uuid) -> str:
    """A GPU UUID as 32 lowercase hex digits. NVML writes 'GPU-7f9c0a1e-...' (str, or bytes in
    older bindings); torch's device properties' uuid prints as '7f9c0a1e-...'."""
    s = (uuid.decode() if isinstance(uuid, bytes) else str(uuid)).strip().lower()
    if s.startswith("gpu-"):
        s = s[4:]
    return s.replace("-", "")


def _by_uuid(pynvml, props):
    try:
        want = uuid_hex(props.uuid)
        if not want:
            return None
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)  # an NVML index: every GPU of the machine
            if uuid_hex(pynvml.nvmlDeviceGetUUID(h)) == want:
                return h
    except Exception:
        pass
    return None


class Scalars:
    """TensorBoard scalars under output.dir/tensorboard (output.tensorboard: true)."""

    def __init__(self, out: Path, enabled: bool, log=print):
        self.writer = None
        if not enabled:
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("megastream: warning: output.tensorboard is on but the `tensorboard` package is not installed "
                "(pip install tensorboard); metrics.jsonl is still written")
            return
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def write(self, rec: dict) -> None:
        if self.writer is None:
            return
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, rec["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
