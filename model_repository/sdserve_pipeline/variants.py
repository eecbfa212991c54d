"""Weight variants of one component: an ONNX Runtime session per LoRA adapter set.

A variant is a new session on the same ONNX file whose patched initializers are overridden
(`SessionOptions.add_initializer`) with base + the set's fused deltas
(`adapters.fused_weights`); the base session and the file are never modified, so the base
and every variant give the same results however often sets are switched.

Variants are kept in an LRU bounded by a byte budget. Each call names, besides its own set,
the sets the pipeline's running requests hold (`adapter_holds`): a running request calls its
variant again at its next step, so evicting it between steps would cost a rebuild mid-request.
To make room for a new variant the cache evicts, least recently used first:

1. variants neither in a call nor held;
2. nothing more while it stays within one variant over the budget (logged): the running
   requests' variants stay;
3. past that, held variants not in a call (logged: a request will rebuild its own; the
   budget is too small for the distinct sets running at once).

So the cache holds at most one variant more than its budget, and a call fails
(`VariantBudgetError`) only when every cached variant is in a call at that moment.

Each session holds its own copy of the graph's weights, so a variant costs about the ONNX
file's weight bytes (`variant_bytes`).

A checkpoint that shares this component's graph (`shared_graph`) is a variant too: the
session with every initializer overridden by the checkpoint's weights file, keyed by the
checkpoint and its file's stamp, in the same LRU and budget. LoRA adapters are not fused onto
such a checkpoint's weights (a call naming both is refused).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sdserve_pipeline.onnx_runtime import AdapterError, AdapterSet
from sdserve_pipeline.shared_graph import WeightsResolver
from sdserve_pipeline.weight_map import WeightSlot

# Makes a session of the component's ONNX file with these initializers overridden.
SessionMaker = Callable[[dict[str, npt.NDArray[Any]]], Any]


LOG = logging.getLogger(__name__)


class VariantBudgetError(RuntimeError):
    """The variant cache cannot hold a variant (budget too small, or all in calls)."""


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
    adapters: list[list[Any]] = field(default_factory=list)  # [[name, scale], ...]
    checkpoint: str = ""  # a shared-graph checkpoint's weights ("": this model's own)


class VariantSessions:
    """The sessions of one component, per adapter set.

    Args:
        component: `unet`, `text_encoder` or `text_encoder_2` (its LoRA keys' prefix).
        base: the base session (the empty set's).
        onnx_file: the component's ONNX file.
        weight_map: parameter name → initializer (`weight_map.load_weight_map`); None with
            `catalog` None: no adapters.
        catalog: the adapter folder (`adapters.AdapterCatalog`); None: no adapters served
            (shared-graph checkpoints only).
        make_session: builds a session with overridden initializers.
        budget_bytes: most bytes of cached variants.
        weights: where shared-graph checkpoints keep this component's weights; None: none
            served.
    """

    def __init__(
        self,
        component: str,
        base: Any,
        onnx_file: Path,
        weight_map: dict[str, WeightSlot] | None,
        catalog: Any,
        make_session: SessionMaker,
        budget_bytes: int,
        weights: WeightsResolver | None = None,
    ) -> None:
        self.component = component
        self.base = base
        self.onnx_file = onnx_file
        self.weight_map = weight_map
        self.catalog = catalog
        self.make_session = make_session
        self.budget_bytes = budget_bytes
        self.weights = weights
        self.size = variant_bytes(onnx_file)
        if catalog is not None and budget_bytes < self.size:
            raise VariantBudgetError(
                f"{component}: adapter cache budget {budget_bytes / 2**20:.0f} MB is smaller than "
                f"one weight variant ({self.size / 2**20:.0f} MB); raise adapter_cache_mb"
            )
        self._cache: OrderedDict[tuple[Any, ...], _Variant] = OrderedDict()
        self._lock = threading.Lock()
        self.built = 0  # variants built so far (tests, metrics)
        self.evicted_held = 0  # variants evicted while a running request held them

    @property
    def serves_adapters(self) -> bool:
        return self.catalog is not None

    @property
    def cached(self) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._cache)

    def describe(self) -> list[dict[str, Any]]:
        """The cached variants, for the checkpoint listing: `adapters` ([[name, scale], ...])
        and `size_mb` each, and `checkpoint` for a shared-graph checkpoint's weights
        (`checkpoints.write_variants`)."""
        with self._lock:
            return [
                {"adapters": variant.adapters, "size_mb": round(variant.size / 2**20, 1)}
                | ({"checkpoint": variant.checkpoint} if variant.checkpoint else {})
                for variant in self._cache.values()
            ]

    @contextmanager
    def session(
        self, adapters: AdapterSet, held: Sequence[AdapterSet] = (), checkpoint: str = ""
    ) -> Iterator[Any]:
        """The session for `adapters` (on `checkpoint`'s weights), not evictable while the
        block runs.

        Args:
            adapters: the call's set.
            held: the sets the pipeline's running requests hold: their variants are evicted
                last (see the module's docstring).
            checkpoint: a checkpoint sharing this graph whose weights to run on
                (`shared_graph`); "": this model's own.

        Raises:
            AdapterError: an adapter that is not (or no longer) usable; any adapter with a
                checkpoint, or without a catalog.
            CheckpointWeightsError: a checkpoint whose weights cannot be used.
            VariantBudgetError: no room for the variant, every cached one being in a call.
        """
        if checkpoint:
            variant = self._checkpoint_variant(checkpoint, adapters)
        elif self.catalog is None:
            if adapters:
                raise AdapterError("this component serves no adapters")
            variant = None
        else:
            found = self.catalog.scan()
            chosen = self._chosen(adapters, found)
            if chosen:
                key = self._key(chosen)
                held_keys = self._held_keys(held, found) - {key}
                variant = self._take(
                    key, lambda: self._overrides(chosen), held_keys, self.size,
                    adapters=[[a.name, scale] for a, scale in chosen],
                )  # fmt: skip
            else:
                variant = None
        if variant is None:
            yield self.base
            return
        try:
            yield variant.session
        finally:
            with self._lock:
                variant.users -= 1

    def _checkpoint_variant(self, checkpoint: str, adapters: AdapterSet) -> _Variant:
        """The variant of a shared-graph checkpoint: every initializer overridden."""
        from sdserve_pipeline.shared_graph import CheckpointWeightsError

        if self.weights is None:
            raise CheckpointWeightsError("this component serves no other checkpoint's weights")
        if adapters:
            raise AdapterError(
                f"LoRA adapters are not served on checkpoint {checkpoint!r}, which shares "
                "another checkpoint's graph"
            )
        path, stamp = self.weights.resolve(checkpoint)
        key = (("checkpoint", checkpoint, stamp),)
        return self._take(
            key, lambda: read_initializers(path), set(), variant_bytes(path),
            checkpoint=checkpoint,
        )  # fmt: skip

    def _chosen(self, adapters: AdapterSet, found: Any) -> list[tuple[Any, float]]:
        """The set's adapters (from the catalog's `found` scan) that change this component."""
        adapters_found = self.catalog.get([name for name, _ in adapters], found)
        return [
            (a, float(scale))
            for a, (_, scale) in zip(adapters_found, adapters, strict=True)
            if self.component in a.targets and scale != 0.0
        ]

    @staticmethod
    def _key(chosen: Sequence[tuple[Any, float]]) -> tuple[Any, ...]:
        return tuple((a.name, a.stamp, scale) for a, scale in chosen)

    def _held_keys(self, held: Sequence[AdapterSet], found: Any) -> set[tuple[Any, ...]]:
        """The cache keys of the held sets (a set no longer usable holds nothing)."""
        keys = set()
        for adapters in held:
            try:
                chosen = self._chosen(adapters, found)
            except AdapterError:
                continue
            if chosen:
                keys.add(self._key(chosen))
        return keys

    def _take(
        self,
        key: tuple[Any, ...],
        make_overrides: Callable[[], dict[str, npt.NDArray[Any]]],
        held: set[tuple[Any, ...]],
        size: int,
        adapters: list[list[Any]] | None = None,
        checkpoint: str = "",
    ) -> _Variant:
        """The cached variant `key`, built from `make_overrides` (`size` bytes) if not cached;
        `held` keys are evicted last."""
        with self._lock:
            variant = self._cache.get(key)
            if variant is not None:
                self._cache.move_to_end(key)
                variant.users += 1
                return variant
        overrides = make_overrides()  # outside the lock: seconds for a large model
        session = self.make_session(overrides)
        with self._lock:
            variant = self._cache.get(key)
            if variant is None:
                self._make_room(held, size)
                variant = _Variant(session, overrides, size, 0, adapters or [], checkpoint)
                self._cache[key] = variant
                self.built += 1
            self._cache.move_to_end(key)
            variant.users += 1
            return variant

    def _make_room(self, held: set[tuple[Any, ...]], size: int) -> None:
        """Evict variants, least recently used first, so that one more fits (module
        docstring): those neither in a call nor `held` down to the budget; then, past one
        variant over it, held ones not in a call.

        Raises:
            VariantBudgetError: every cached variant is in a call.
        """
        used = sum(v.size for v in self._cache.values())
        used = self._evict(
            used, size, self.budget_bytes, lambda key, v: not v.users and key not in held
        )
        if used + size <= self.budget_bytes:
            return
        over = self.budget_bytes + size  # at most one variant over the budget
        used = self._evict(used, size, over, lambda key, v: not v.users, held)
        if used + size > over:
            raise VariantBudgetError(
                f"{self.component}: no room for another weight variant in "
                f"{self.budget_bytes / 2**20:.0f} MB (+ one over), every cached one is in a call"
            )
        LOG.warning(
            "%s: adapter cache one variant over its %.0f MB budget rather than evict one that "
            "a running request holds or a call uses; raise adapter_cache_mb",
            self.component, self.budget_bytes / 2**20,
        )  # fmt: skip

    def _evict(
        self, used: int, size: int, limit: int, evictable: Callable[[Any, _Variant], bool],
        held: set[tuple[Any, ...]] | None = None,
    ) -> int:  # fmt: skip
        """Evict `evictable` variants, least recently used first, until one more of `size`
        bytes fits in `limit` (a `held` one evicted is logged); returns the bytes still used."""
        for key, variant in list(self._cache.items()):
            if used + size <= limit:
                break
            if evictable(key, variant):
                del self._cache[key]
                used -= variant.size
                if held and key in held:
                    self.evicted_held += 1
                    LOG.warning(
                        "%s: evicted the variant of %s, which a running request holds (it "
                        "will be rebuilt): raise adapter_cache_mb for the %d sets running",
                        self.component, [name for name, _ in variant.adapters], len(held) + 1,
                    )  # fmt: skip
        return used

    def _overrides(self, chosen: Sequence[tuple[Any, float]]) -> dict[str, npt.NDArray[Any]]:
        """Initializer name → fused value, in the initializer's layout and dtype."""
        import torch

        from sdserve_pipeline.adapters import fused_weights

        weight_map = self.weight_map or {}  # a catalog comes with its weight map
        names = {f"{m}.weight" for adapter, _ in chosen for m in adapter.modules[self.component]}
        stored = read_initializers(self.onnx_file, [weight_map[n].initializer for n in names])
        base = {}
        for name in names:
            slot = weight_map[name]
            value = torch.from_numpy(np.array(stored[slot.initializer], dtype=np.float32))
            base[name] = value.T if slot.transposed else value
        fused = fused_weights(chosen, self.component, base)
        overrides = {}
        for name, value in fused.items():
            slot = weight_map[name]
            array = (value.T if slot.transposed else value).contiguous().numpy()
            overrides[slot.initializer] = np.ascontiguousarray(
                array.astype(stored[slot.initializer].dtype)
            )
        return overrides


def read_initializers(
    onnx_file: Path, names: Sequence[str] | None = None
) -> dict[str, npt.NDArray[Any]]:
    """The values of some initializers of an ONNX file (None: all), external data read."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_file), load_external_data=True)
    wanted = None if names is None else set(names)
    return {
        t.name: numpy_helper.to_array(t)
        for t in model.graph.initializer
        if wanted is None or t.name in wanted
    }
