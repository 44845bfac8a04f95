"""Where tensors live and in which precision they compute: the one place that decides it.

Every stage builds one `Placement` from its `--device` (and `--precision`) and moves through it
everything it will compute with: modules, the text tokens it keeps on the device, batches,
random generators, the autocast context. A module that is not moved through `Placement.modules`
is a bug this module can name (`misplaced`), and the tests look for exactly that on the `meta`
device, so a CPU-only CI catches a buffer left behind on the CPU.

    place = Placement.resolve("auto")             # CUDA when present, bf16 autocast there
    shallow, deep = place.modules(shallow, deep)  # moved, then checked: nothing left behind
    with place.autocast():
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from skipcache.errors import ConfigError
from skipcache.runtime import resolve_device

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Placement:
    """A device and the dtype autocast computes in there (None: plain fp32).

    Weights always stay in fp32 (master weights); `compute_dtype` only selects autocast.
    """

    device: torch.device
    compute_dtype: torch.dtype | None = None

    @classmethod
    def resolve(cls, device: str | torch.device = "auto", precision: str = "auto") -> Placement:
        """`precision`: `auto` (bf16 autocast on CUDA, fp32 elsewhere), `fp32` or `bf16`."""
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        if precision == "auto":
            dtype = torch.bfloat16 if dev.type == "cuda" else None
        else:
            dtype = torch.bfloat16 if precision == "bf16" else None
        return cls(dev, dtype)

    @property
    def precision(self) -> str:
        return "bf16" if self.compute_dtype == torch.bfloat16 else "fp32"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def modules(self, *modules: nn.Module):
        """Move every module (parameters and buffers) to the device; returns them (one or a tuple).

        Raises RuntimeError naming any tensor still elsewhere afterwards.
        """
        for m in modules:
            m.to(self.device)
        wrong = misplaced(self.device, *modules)
        if wrong:
            raise RuntimeError(f"not on {self.device} after placement: {', '.join(wrong[:5])}")
        return modules[0] if len(modules) == 1 else modules

    def tensor(self, t: torch.Tensor, *, non_blocking: bool = False) -> torch.Tensor:
        return t.to(self.device, non_blocking=non_blocking)

    def generator(self, seed: int) -> torch.Generator | None:
        """A seeded generator on the device (None on `meta`, which has none; callers then draw unseeded)."""
        if self.device.type == "meta":
            return None
        return torch.Generator(device=self.device).manual_seed(seed)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype is None or self.device.type == "meta":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict:
        return {"device": str(self.device), "precision": self.precision}


def named_tensors(*modules: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of the modules, including non-persistent buffers."""
    for i, m in enumerate(modules):
        for name, t in m.named_parameters(remove_duplicate=False):
            yield f"[{i}].{name}", t
        for name, t in m.named_buffers(remove_duplicate=False):
            yield f"[{i}].{name}", t


def misplaced(device: torch.device, *modules: nn.Module) -> list[str]:
    """Names of the parameters and buffers of `modules` that are not on `device`."""
    want = torch.device(device)
    return [name for name, t in named_tensors(*modules)
            if t.device.type != want.type or (want.index is not None and t.device.index != want.index)]


def batch_to(batch: dict, placement: Placement, *, non_blocking: bool = False) -> dict:
    """Move the tensors of a batch dict to the device; other values pass through."""
    return {k: placement.tensor(v, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def prefetch_to_device(batches, placement: Placement):
    """Yield the batches on the device, the next one already copied while this one computes.

    On CUDA the next batch is pinned and copied on a side stream; the compute stream waits for
    that copy only when it takes the batch. Elsewhere the batches are moved as they come.
    """
    if not placement.is_cuda:
        for batch in batches:
            yield batch_to(batch, placement)
        return
    stream = torch.cuda.Stream(device=placement.device)

    def load(batch: dict) -> dict:
        with torch.cuda.stream(stream):
            return {k: v.pin_memory().to(placement.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                    for k, v in batch.items()}

    it = iter(batches)
    ahead = next(it, None)
    ahead = load(ahead) if ahead is not None else None
    while ahead is not None:
        current = ahead
        torch.cuda.current_stream(placement.device).wait_stream(stream)
        for v in current.values():
            if isinstance(v, torch.Tensor):
                v.record_stream(torch.cuda.current_stream(placement.device))
        nxt = next(it, None)
        ahead = load(nxt) if nxt is not None else None
        yield current
