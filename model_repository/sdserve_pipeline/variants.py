"""Weight variants of one component: an ONNX Runtime session per LoRA adapter set.

A variant is a new session on the same ONNX file whose patched initializers are overridden
(`SessionOptions.add_initializer`) with base + the set's fused deltas
(`adapters.fused_weights`); the base session and the file are never modified, so the base
and every variant give the same results however often sets are switched. Variants are kept
in an LRU bounded by a byte budget; one in use by a call is never evicted.

Each session holds its own copy of the graph's weights, so a variant costs about the ONNX
file's weight bytes (`variant_bytes`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sdserve_pipeline.weight_map import WeightSlot

# (adapter name, scale) pairs, as a request names them
AdapterSet = tuple[tuple[str, float], ...]
# Makes a session of the component's ONNX file with these initializers overridden.
SessionMaker = Callable[[dict[str, npt.NDArray[Any]]], Any]


class VariantBudgetError(RuntimeError):
    """The variant cache cannot hold a variant (budget too small, or all in use)."""


def variant_bytes(onnx_file: Path) -> int:
    """Weight bytes one session of `onnx_file` holds: the file and its external data."""
    data = onnx_file.with_name(onnx_file.name + ".data")
    return onnx_file.stat().st_size + (data.stat().st_size if data.is_file() else 0)


@dataclass
class _Variant:
    session: Any
    overrides: dict[str, npt.NDArray[Any]] = field(repr=False)  # kept alive with the session
    size: int
    users: int = 0


class VariantSessions:
    """The sessions of one component, per adapter set.

    Args:
        component: `unet`, `text_encoder` or `text_encoder_2` (its LoRA keys' prefix).
        base: the base session (the empty set's).
        onnx_file: the component's ONNX file.
        weight_map: parameter name → initializer (`weight_map.load_weight_map`).
        catalog: the adapter folder (`adapters.AdapterCatalog`).
        make_session: builds a session with overridden initializers.
        budget_bytes: most bytes of cached variants.
    """

    def __init__(
        self,
        component: str,
        base: Any,
        onnx_file: Path,
        weight_map: dict[str, WeightSlot],
        catalog: Any,
        make_session: SessionMaker,
        budget_bytes: int,
    ) -> None:
        self.component = component
        self.base = base
        self.onnx_file = onnx_file
        self.weight_map = weight_map
        self.catalog = catalog
        self.make_session = make_session
        self.budget_bytes = budget_bytes
        self.size = variant_bytes(onnx_file)
        if budget_bytes < self.size:
            raise VariantBudgetError(
                f"{component}: adapter cache budget {budget_bytes / 2**20:.0f} MB is smaller than "
                f"one weight variant ({self.size / 2**20:.0f} MB); raise adapter_cache_mb"
            )
        self._cache: OrderedDict[tuple[Any, ...], _Variant] = OrderedDict()
        self._lock = threading.Lock()
        self.built = 0  # variants built so far (tests, metrics)

    @property
    def cached(self) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._cache)

    @contextmanager
    def session(self, adapters: AdapterSet) -> Iterator[Any]:
        """The session for `adapters`, held (not evictable) while the block runs.

        Raises:
            AdapterError: an adapter that is not (or no longer) usable.
            VariantBudgetError: no room for the variant, every cached one being in use.
        """
        found = self.catalog.get([name for name, _ in adapters])
        chosen = [
            (a, float(scale))
            for a, (_, scale) in zip(found, adapters, strict=True)
            if self.component in a.targets and scale != 0.0
        ]
        if not chosen:
            yield self.base
            return
        key = tuple((a.name, a.stamp, scale) for a, scale in chosen)
        variant = self._take(key, chosen)
        try:
            yield variant.session
        finally:
            with self._lock:
                variant.users -= 1

    def _take(self, key: tuple[Any, ...], chosen: Sequence[tuple[Any, float]]) -> _Variant:
        with self._lock:
            variant = self._cache.get(key)
            if variant is not None:
                self._cache.move_to_end(key)
                variant.users += 1
                return variant
        overrides = self._overrides(chosen)  # outside the lock: seconds for a large model
        session = self.make_session(overrides)
        with self._lock:
            variant = self._cache.get(key)
            if variant is None:
                self._make_room(self.size)
                variant = _Variant(session, overrides, self.size)
                self._cache[key] = variant
                self.built += 1
            self._cache.move_to_end(key)
            variant.users += 1
            return variant

    def _make_room(self, size: int) -> None:
        """Evict least recently used variants not in use until `size` more bytes fit."""
        used = sum(v.size for v in self._cache.values())
        for key in list(self._cache):
            if used + size <= self.budget_bytes:
                return
            if self._cache[key].users == 0:
                used -= self._cache.pop(key).size
        if used + size > self.budget_bytes:
            raise VariantBudgetError(
                f"{self.component}: no room for another weight variant in "
                f"{self.budget_bytes / 2**20:.0f} MB, every cached one is in use"
            )

    def _overrides(self, chosen: Sequence[tuple[Any, float]]) -> dict[str, npt.NDArray[Any]]:
        """Initializer name → fused value, in the initializer's layout and dtype."""
        import torch

        from sdserve_pipeline.adapters import fused_weights

        names = {f"{m}.weight" for adapter, _ in chosen for m in adapter.modules[self.component]}
        stored = read_initializers(self.onnx_file, [self.weight_map[n].initializer for n in names])
        base = {}
        for name in names:
            slot = self.weight_map[name]
            value = torch.from_numpy(np.array(stored[slot.initializer], dtype=np.float32))
            base[name] = value.T if slot.transposed else value
        fused = fused_weights(chosen, self.component, base)
        overrides = {}
        for name, value in fused.items():
            slot = self.weight_map[name]
            array = (value.T if slot.transposed else value).contiguous().numpy()
            overrides[slot.initializer] = np.ascontiguousarray(
                array.astype(stored[slot.initializer].dtype)
            )
        return overrides


def read_initializers(onnx_file: Path, names: Sequence[str]) -> dict[str, npt.NDArray[Any]]:
    """The values of some initializers of an ONNX file (external data read)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_file), load_external_data=True)
    wanted = set(names)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in wanted}
