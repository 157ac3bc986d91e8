"""Live tensor memory, counted op by op: the CPU stand-in for torch.cuda.max_memory_allocated.

    with PeakMemoryTracker() as mem:
        loss = model(**batch).loss; loss.backward(); optimizer.step()
    mem.peak_bytes   # most bytes held at once by tensors created inside the block

Every tensor that an ATen op returns inside the block is looked at once per storage
(views share their base's storage); its bytes count from its creation until Python frees
the storage (a weakref finalizer). So the count is what a caching allocator would have
to hand out, without its rounding or fragmentation, on any device, for real tensors and
for FakeTensorMode's fake ones alike (the estimator measures activations that way, see
moe/plan/memory_plan.py). Tensors created before the block are not counted: enter it before the
model is materialised to count the weights too. Storages created outside an ATen op
(torch.from_numpy, pinned host buffers) are not seen.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 1024**3


class PeakMemoryTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages created while it is active (see module doc).

    `device`: count only storages on this device type ("cpu", "cuda", "meta"); None: every
    device but "meta" (meta tensors hold no memory; DeepSpeed makes one per parameter).
    """

    def __init__(self, device: str | None = None):
        super().__init__()
        self.device = device
        self.live_bytes = 0
        self.peak_bytes = 0
        self._sizes: dict[int, int] = {}  # id(storage) -> bytes counted for it
        self._refs: dict[int, weakref.ref] = {}

    def reset_peak(self) -> None:
        """Start a new peak from what is live now (e.g. after the model is built)."""
        self.peak_bytes = self.live_bytes

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / GIB

    def _freed(self, key: int) -> None:
        self.live_bytes -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type != (self.device or t.device.type) or (self.device is None and t.is_meta):
            return
        storage = t.untyped_storage()
        key = id(storage)
        nbytes = storage.nbytes()
        old = self._sizes.get(key)
        if old is not None and self._refs[key]() is storage:
            if nbytes != old:  # resized in place (resize_, set_)
                self._sizes[key] = nbytes
                self.live_bytes += nbytes - old
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            return
        if old is not None:  # an id reused after a free whose finalizer has not run yet
            self._freed(key)
        self._sizes[key] = nbytes
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._freed(key))
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # An output on an input's storage (a view, an in-place op) allocated nothing new;
        # it may be a tensor from before the block, which must stay uncounted.
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = id(t.untyped_storage())
                if key not in inputs or key in self._sizes:
                    self._track(t)
        return out
