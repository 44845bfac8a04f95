"""Peak memory of one phase of a process (training, or a benchmark's timed steps).

CUDA: `torch.cuda.max_memory_allocated` over the phase (the peak statistics reset when it
starts), so it holds the weights, gradients, optimizer state and activations.

CPU: the same sum, counted in two parts: the bytes of the trained model (its parameters and
buffers, and any tensors the step holds besides) plus the process's peak resident memory over
the phase above its resident memory when the phase started (the heap's free pages handed back
to the kernel first, so that reused memory is seen). The peak is the kernel's VmHWM,
reset at the start through /proc/self/clear_refs (Linux); where that is not possible, the
lifetime ru_maxrss stands in, an overestimate, and the method string says so. What happened
before the phase (imports, building the whole model before its frozen part is dropped, reading
a split) is not counted, which is what makes two methods' peaks comparable in one process.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
from pathlib import Path

import torch


def _status_mib(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _maxrss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mib("VmHWM") is not None
    except OSError:
        return False


def _release_free_memory() -> None:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim), so that what the phase
    allocates grows the resident set instead of reusing pages freed before it (the frozen half
    of a model dropped after loading, say) and going unseen."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def tensor_mib(module: torch.nn.Module, extra: dict | None = None) -> float:
    """MiB of a module's parameters and buffers (each tensor once), plus `extra` tensors."""
    seen, total = set(), 0
    tensors = [*module.parameters(), *module.buffers(), *((extra or {}).values())]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**20


class MemoryMeter:
    """Peak memory of what runs between `start()` and `peak()`; `phase` names it in the method
    string ("the steps", "training")."""

    def __init__(self, device: torch.device, phase: str = "the steps"):
        self.device, self.phase, self.hwm, self.base, self.seen = device, phase, False, 0.0, 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _release_free_memory()
            self.base = _status_mib("VmRSS") or _maxrss_mib()
            self.hwm = _reset_peak_rss()

    def pause(self) -> None:
        """Keep the peak so far; what runs until `resume()` (a checkpoint write) is not counted on
        the CPU, where the kernel's mark would otherwise take it in (on CUDA it allocates nothing)."""
        if self.device.type != "cuda" and self.hwm:
            self.seen = max(self.seen, (_status_mib("VmHWM") or 0.0) - self.base)

    def resume(self) -> None:
        if self.device.type != "cuda" and self.hwm:
            _reset_peak_rss()

    def peak(self, weights_mib: float) -> dict:
        """{"peak_memory_mib", "memory_method", "weights_mib"[, "step_growth_mib"]}; `weights_mib`:
        the trained model's bytes (`tensor_mib`), counted on the CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {"peak_memory_mib": torch.cuda.max_memory_allocated(self.device) / 2**20,
                    "memory_method": f"torch.cuda.max_memory_allocated over {self.phase} (reset before): weights, "
                                     "gradients, optimizer state, activations", "weights_mib": weights_mib}
        grown = max(self.seen, ((_status_mib("VmHWM") or 0.0) if self.hwm else _maxrss_mib()) - self.base)
        how = (f"CPU: the model's weights and buffers (counted) + the process's peak RSS growth over {self.phase} "
               + ("(VmHWM reset before)" if self.hwm else "(ru_maxrss, lifetime peak: an overestimate)")
               + ": gradients, optimizer state, activations")
        return {"peak_memory_mib": weights_mib + max(0.0, grown), "memory_method": how, "weights_mib": weights_mib,
                "step_growth_mib": grown}
