"""Batched component calls for several requests at once.

Generation code is written for one request, as a plan: a generator that yields the
component calls it needs (`outputs = yield Call("vae_encoder", (image,))`) and returns its
result. `Executor.run_plans` drives several plans together: the calls they ask for at the
same time that share a component and trailing shapes become one call, split at the
component's most rows per call, whose outputs are split back by rows. It knows nothing of
what the plans compute.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

# A component: positional tensors in its ComponentSpec's input order → outputs in its order.
Runner = Callable[..., tuple[torch.Tensor, ...]]

T = TypeVar("T")


class Cancelled(Exception):
    """The request was cancelled: its plan is not resumed."""


@dataclass(frozen=True)
class Call:
    """A component call a plan asks for.

    Args:
        component: the component's name (an attribute of the executor's `components`).
        inputs: in the component's spec order, batch first.
        adapters: the LoRA (adapter, scale) set whose weights the call runs on; empty: the
            base weights. Calls with different sets are separate component calls.
    """

    component: str
    inputs: tuple[torch.Tensor, ...]
    adapters: tuple[tuple[str, float], ...] = ()

    @property
    def rows(self) -> int:
        return int(self.inputs[0].shape[0])

    def batch_key(self) -> tuple[Any, ...]:
        """Calls with equal keys can be concatenated along the batch axis."""
        return (self.component, self.adapters, *(tuple(x.shape[1:]) for x in self.inputs))


# One request's work up to a result: yields `Call`s, receives their outputs, returns T.
Plan = Generator[Call, tuple[torch.Tensor, ...], T]


class Executor:
    """Runs plans on components, merging their calls.

    Args:
        components: an object whose attributes are the `Runner`s, named as `Call.component`.
        max_rows: component name → most rows of one call (absent or 0: no limit).
        held: component → the adapter sets its variant cache should keep (those running
            requests hold, `adapter_holds.AdapterHolds.held`); passed as `held=` with every
            call on an adapter set. None: not passed.
    """

    def __init__(
        self,
        components: object,
        max_rows: Mapping[str, int] | None = None,
        held: Callable[[str], tuple[tuple[tuple[str, float], ...], ...]] | None = None,
    ) -> None:
        self.components = components
        self.max_rows = dict(max_rows or {})
        self.held = held

    def run(self, plan: Plan[T]) -> T:
        """Drive one plan: its result, or the exception that ended it raised."""
        outcome = self.run_plans([plan])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def run_plans(self, plans: Sequence[Plan[T]]) -> list[T | Exception]:
        """Drive plans together, merging the calls they ask for at the same time.

        Each plan's own code, random draws included, runs in its own order, so its result
        is the one it gets alone. Returns each plan's result or the exception that ended it;
        a failed call fails only the plans in it.
        """
        results: dict[int, T | Exception] = {}
        asked: dict[int, Call] = {}

        def resume(i: int, outputs: tuple[torch.Tensor, ...] | None) -> None:
            try:
                asked[i] = plans[i].send(outputs)  # type: ignore[arg-type]  # None starts it
            except StopIteration as stop:
                results[i] = stop.value
            except Exception as err:  # noqa: BLE001 (this plan fails, not the rest)
                results[i] = err

        for i in range(len(plans)):
            resume(i, None)
        while asked:
            calls, asked = asked, {}
            for chunk in self._batches(calls):
                try:
                    outputs = self._call([calls[i] for i in chunk])
                except Exception as err:  # noqa: BLE001 (the chunk's plans fail, not all)
                    for i in chunk:
                        plans[i].close()
                        results[i] = err
                    continue
                for i, piece in zip(chunk, outputs, strict=True):
                    resume(i, piece)
        return [results[i] for i in range(len(plans))]

    def _batches(self, calls: dict[int, Call]) -> list[list[int]]:
        """Keys of `calls` grouped into batched calls: same `batch_key`, in order, each at
        most the component's `max_rows` rows."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, call in calls.items():
            groups.setdefault(call.batch_key(), []).append(i)
        return [
            chunk
            for group in groups.values()
            for chunk in chunks(
                group, lambda i: calls[i].rows, self.max_rows.get(calls[group[0]].component, 0)
            )
        ]

    def _call(self, calls: list[Call]) -> list[tuple[torch.Tensor, ...]]:
        """One component call for several `Call`s: inputs concatenated, outputs split."""
        run: Runner = getattr(self.components, calls[0].component)
        adapters = calls[0].adapters  # one set per batch (`batch_key`)
        kwargs: dict[str, Any] = {}
        if adapters:
            kwargs["adapters"] = adapters
            if self.held is not None:
                kwargs["held"] = self.held(calls[0].component)
        if len(calls) == 1:
            return [tuple(run(*calls[0].inputs, **kwargs))]
        inputs = zip(*(c.inputs for c in calls), strict=True)
        outputs = run(*(torch.cat(parts) for parts in inputs), **kwargs)
        pieces = [torch.split(output, [c.rows for c in calls]) for output in outputs]
        return [tuple(piece[j] for piece in pieces) for j in range(len(calls))]


def with_adapters(
    plan: Plan[T], by_component: Mapping[str, tuple[tuple[str, float], ...]]
) -> Plan[T]:
    """`plan` with its calls of each component in `by_component` run on that adapter set."""
    if not any(by_component.values()):
        return (yield from plan)
    outputs: tuple[torch.Tensor, ...] | None = None
    while True:
        try:
            call = plan.send(outputs)  # type: ignore[arg-type]  # None starts it
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        adapters = by_component.get(call.component, ())
        if adapters:
            call = replace(call, adapters=adapters)
        outputs = yield call


def chunks(items: list[T], rows_of: Callable[[T], int], max_rows: int) -> list[list[T]]:
    """Consecutive runs of items whose rows add up to at most `max_rows` (0: one run).

    An item larger than `max_rows` on its own still runs, alone.
    """
    if max_rows <= 0:
        return [items]
    runs: list[list[T]] = []
    rows = 0
    for item in items:
        item_rows = rows_of(item)
        if runs and rows + item_rows <= max_rows:
            runs[-1].append(item)
            rows += item_rows
        else:
            runs.append([item])
            rows = item_rows
    return runs
