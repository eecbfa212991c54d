"""The adapter sets the pipeline's running requests hold, so the component runners keep their
weight variants for the whole run, not only during a call.

A request holds its sets (component → set, `GenerationLoop.adapter_calls`) from the start of
its plan (its text-encoder calls) until its denoising is done (`finish_plan` decodes on the
base VAE), or until it fails. Each adapter call carries the sets held for its component
(`onnx_runtime.HELD_PARAMETER` over BLS), and the runner's variant cache evicts those last
(`variants.VariantSessions`). A request dropped without either (the batcher answering a
cancelled request) lets go when its job is freed: the registry keeps holds by weak reference.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping

from sdserve_pipeline.onnx_runtime import AdapterSet


class Hold:
    """One request's sets (component → set), until `AdapterHolds.release`."""

    __slots__ = ("__weakref__", "calls", "released")

    def __init__(self, calls: Mapping[str, AdapterSet]) -> None:
        self.calls = dict(calls)
        self.released = False


class AdapterHolds:
    """The holds of the requests running in one pipeline (thread-safe)."""

    def __init__(self) -> None:
        self._holds: weakref.WeakSet[Hold] = weakref.WeakSet()
        self._lock = threading.Lock()

    def hold(self, calls: Mapping[str, AdapterSet]) -> Hold | None:
        """Hold a request's sets; None when it has none. Keep the hold as long as the
        request runs (a hold no longer referenced is released)."""
        if not any(calls.values()):
            return None
        hold = Hold(calls)
        with self._lock:
            self._holds.add(hold)
        return hold

    def release(self, hold: Hold | None) -> None:
        if hold is None:
            return
        with self._lock:
            hold.released = True
            self._holds.discard(hold)

    def held(self, component: str) -> tuple[AdapterSet, ...]:
        """The distinct non-empty sets held for `component`, in a stable order."""
        with self._lock:
            sets = {h.calls.get(component, ()) for h in self._holds if not h.released}
        return tuple(sorted(s for s in sets if s))
