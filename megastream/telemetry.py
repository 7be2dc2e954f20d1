"""What a running job reports about the machine: host RSS (psutil), GPU memory (torch's allocator)
and GPU utilisation (NVML), sampled once per step; and optional TensorBoard scalars."""

from __future__ import annotations

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
    """The NVML handle of the GPU torch calls `device` (matched by PCI bus id, since
    CUDA_VISIBLE_DEVICES renumbers devices); None when NVML is unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        p = torch.cuda.get_device_properties(device)
        bus = f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
        return pynvml.nvmlDeviceGetHandleByPciBusId(bus)
    except Exception:
        try:
            return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:
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
