"""LoRA adapter files: read with diffusers' own LoRA loading, fused as diffusers fuses.

An adapter is a `.safetensors` file in the repository's adapter folder (`ADAPTERS_DIR` inside
the pipeline model's folder). It is read with the pipeline class's `lora_state_dict` (which
also converts kohya and older diffusers layouts), then per component as diffusers'
`load_lora_weights` does: the component's keys, `convert_unet_state_dict_to_peft` (UNet) or
`convert_state_dict_to_peft` (text encoders), and the `LoraConfig` diffusers would build
(`_create_lora_config`: rank and alpha per module, from the ranks, kohya alphas or the file's
metadata). No key is mapped by hand.

A weight variant of a component for an adapter set is the base weight plus, per targeted
module and adapter, `scale * (alpha / r) * (B @ A)` (`alpha / sqrt(r)` with rsLoRA): what
PEFT's `merge` adds under `set_adapters(..., adapter_weights=[...])` + `fuse_lora()`.

Imports torch and diffusers: the runner models import this module only when an adapter is
asked for.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdserve_pipeline.onnx_runtime import AdapterError as AdapterError  # declared torch-free

ADAPTERS_DIR = "adapters"  # in the pipeline model's folder, beside its version folders
ADAPTER_SUFFIX = ".safetensors"
REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # pickle: can run code on load
# The components a LoRA file may target, per architecture (diffusers' prefixes).
LORA_COMPONENTS: dict[str, tuple[str, ...]] = {
    "sd15": ("unet", "text_encoder"),
    "sdxl": ("unet", "text_encoder", "text_encoder_2"),
}


@dataclass(frozen=True)
class ModuleLora:
    """The low-rank pair of one targeted module.

    Args:
        down: `lora_A` weight, (r, in) or (r, in, kh, kw).
        up: `lora_B` weight, (out, r) or (out, r, 1, 1).
        scaling: `alpha / r` (`alpha / sqrt(r)` with rsLoRA), as PEFT scales it.
    """

    down: torch.Tensor = field(repr=False)
    up: torch.Tensor = field(repr=False)
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """`(B @ A) * scaling` in the base weight's layout (PEFT's `get_delta_weight`)."""
        down, up = self.down.float(), self.up.float()
        if down.ndim == 2:
            return (up @ down) * self.scaling
        if down.shape[2:] == (1, 1) and up.shape[2:] == (1, 1):
            product = up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)
            return product.unsqueeze(2).unsqueeze(3) * self.scaling
        # a k x k conv down and a 1 x 1 conv up, as PEFT computes it
        product = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        return product * self.scaling


@dataclass(frozen=True)
class Adapter:
    """A parsed adapter file.

    Args:
        name: the file's stem, as requests name it.
        architecture: `sd15` or `sdxl`.
        modules: component → module name (as in the diffusers model) → its low-rank pair.
        stamp: (size, mtime_ns) of the file when read; a changed file is read again.
    """

    name: str
    architecture: str
    modules: Mapping[str, Mapping[str, ModuleLora]] = field(repr=False)
    stamp: tuple[int, int] = (0, 0)

    @property
    def targets(self) -> tuple[str, ...]:
        """The components it changes."""
        return tuple(c for c, mods in self.modules.items() if mods)

    @property
    def rank(self) -> int:
        """Its largest rank."""
        return max((m.rank for mods in self.modules.values() for m in mods.values()), default=0)

    def describe(self) -> dict[str, Any]:
        """What `sdserve-client adapters` lists."""
        return {
            "name": self.name,
            "architecture": self.architecture,
            "rank": self.rank,
            "targets": {c: len(mods) for c, mods in self.modules.items() if mods},
        }


def pipeline_class(architecture: str) -> Any:
    """The diffusers pipeline whose `lora_state_dict` reads this architecture's files."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if architecture == "sdxl":
        return StableDiffusionXLPipeline
    if architecture == "sd15":
        return StableDiffusionPipeline
    raise AdapterError(f"architecture {architecture!r} has no LoRA support")


def read_adapter(
    path: Path, architecture: str, weight_names: Mapping[str, Iterable[str]] | None = None
) -> Adapter:
    """Reads and checks one adapter file.

    Args:
        path: a `.safetensors` file.
        architecture: the served checkpoint's (`sd15`, `sdxl`).
        weight_names: component → the parameter names the server can patch (its weight map);
            when given, every targeted module must have its `weight` there.

    Raises:
        AdapterError: not safetensors, unreadable, no LoRA keys, a component of another
            architecture, or modules the served model does not have.
    """
    if path.suffix != ADAPTER_SUFFIX:
        raise AdapterError(f"{path.name}: only {ADAPTER_SUFFIX} adapters are read (not pickle)")
    stat = path.stat()
    try:
        state_dict, network_alphas, metadata = pipeline_class(architecture).lora_state_dict(
            str(path), return_lora_metadata=True
        )
    except Exception as err:  # noqa: BLE001 (corrupt or foreign file: its reason)
        raise AdapterError(f"{path.name}: not a readable LoRA file ({err})") from None
    components = LORA_COMPONENTS[architecture]
    foreign = sorted({k.split(".")[0] for k in state_dict} - set(components))
    if foreign:
        raise AdapterError(
            f"{path.name}: keys for {', '.join(foreign)}, which a {architecture} checkpoint does "
            f"not have (components: {', '.join(components)}); an adapter of another architecture?"
        )
    modules = {
        c: _component_loras(state_dict, network_alphas, metadata, c, path.name) for c in components
    }
    adapter = Adapter(path.stem, architecture, modules, (stat.st_size, stat.st_mtime_ns))
    if not adapter.targets:
        raise AdapterError(f"{path.name}: no LoRA weights in it")
    if weight_names is not None:
        check_targets(adapter, weight_names)
    return adapter


def check_targets(adapter: Adapter, weight_names: Mapping[str, Iterable[str]]) -> None:
    """Every module the adapter targets must be a weight the server can patch, of the shape
    its low-rank pair makes.

    Raises:
        AdapterError: naming the first modules that match nothing.
    """
    for component in adapter.targets:
        if component not in weight_names:
            continue  # checked by whoever serves that component
        known = set(weight_names[component])
        missing = sorted(m for m in adapter.modules[component] if f"{m}.weight" not in known)
        if missing:
            shown = ", ".join(missing[:3]) + (
                f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            )
            raise AdapterError(
                f"{adapter.name}: {len(missing)} {component} modules match nothing in the served "
                f"model ({shown}); an adapter for another architecture or model size?"
            )


def _component_loras(
    state_dict: Mapping[str, torch.Tensor],
    network_alphas: Mapping[str, float] | None,
    metadata: Mapping[str, Any] | None,
    prefix: str,
    file_name: str,
) -> dict[str, ModuleLora]:
    """One component's modules, converted and configured as diffusers' loader does."""
    from diffusers.utils import peft_utils, state_dict_utils

    convert: Any = state_dict_utils  # diffusers' own key conversions (untyped)
    create_config: Any = peft_utils._create_lora_config  # the LoraConfig its loader builds

    keys = {
        k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")
    }
    if not keys:
        return {}
    meta = None
    if metadata:
        meta = {
            k.removeprefix(f"{prefix}."): v
            for k, v in metadata.items()
            if k.startswith(f"{prefix}.")
        }
        meta = meta or None
    alphas = None
    if network_alphas:
        alphas = {
            k.removeprefix(f"{prefix}."): v
            for k, v in network_alphas.items()
            if k.split(".")[0] == prefix
        }
    rank: dict[str, int] = {}
    if prefix == "unet":
        if "lora_A" not in next(iter(keys)):
            keys = convert.convert_unet_state_dict_to_peft(keys)
        for key, value in keys.items():
            if "lora_B" in key and value.ndim > 1:
                rank[f"^{key}"] = int(value.shape[1])
        config = create_config(keys, alphas, meta, rank, is_unet=True)
    else:
        keys = convert.convert_state_dict_to_peft(convert.convert_state_dict_to_diffusers(keys))
        # Modules are named without `text_model.`, as transformers >= 5.6 flattened
        # CLIPTextModel (diffusers drops it then); the weight maps name them alike
        # (`sdserve_export.weight_slots`), also for CLIPTextModelWithProjection.
        keys = {k.removeprefix("text_model."): v for k, v in keys.items()}
        for key, value in keys.items():
            if key.endswith(".lora_B.weight"):
                rank[key] = int(value.shape[1])
        config = create_config(keys, alphas, meta, rank, is_unet=False)
    if config.use_dora or config.lora_bias:
        raise AdapterError(f"{file_name}: DoRA and LoRA biases are not supported")
    return _pairs(keys, config, file_name, prefix)


def _pairs(
    keys: Mapping[str, torch.Tensor], config: Any, file_name: str, prefix: str
) -> dict[str, ModuleLora]:
    from peft.utils.other import get_pattern_key

    modules: dict[str, ModuleLora] = {}
    names = sorted({k.split(".lora_")[0] for k in keys})
    for name in names:
        down, up = keys.get(f"{name}.lora_A.weight"), keys.get(f"{name}.lora_B.weight")
        if down is None or up is None:
            raise AdapterError(f"{file_name}: {prefix}.{name} lacks its lora_A/lora_B pair")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha
        )
        if int(down.shape[0]) != int(r) or int(up.shape[1]) != int(r):
            raise AdapterError(f"{file_name}: {prefix}.{name} has rank {down.shape[0]}, config {r}")
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        modules[name] = ModuleLora(down.detach(), up.detach(), float(scaling))
    return modules


def fused_weights(
    adapters: Sequence[tuple[Adapter, float]],
    component: str,
    base: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The weights of `component` that an adapter set changes: parameter name → base +
    Σ scale · delta, added adapter after adapter in the set's order (as PEFT merges).

    Args:
        adapters: (adapter, scale) pairs.
        component: `unet`, `text_encoder` or `text_encoder_2`.
        base: parameter name (`<module>.weight`) → its base weight (fp32, not modified).
    """
    fused: dict[str, torch.Tensor] = {}
    for adapter, scale in adapters:
        for module, lora in adapter.modules.get(component, {}).items():
            name = f"{module}.weight"
            current = fused.get(name, base[name])
            delta = lora.delta().reshape(current.shape)
            fused[name] = current + delta * scale if scale != 1.0 else current + delta
    return fused


class AdapterCatalog:
    """The adapter folder of one pipeline, read again when it changes.

    A file added is listed at the next lookup; a file removed is gone from it; a changed
    file is read again. Files that cannot be used are kept as their error (listed, refused
    when asked for), so one bad file does not hide the others.

    Args:
        folder: the adapter folder (may not exist: no adapters).
        architecture: the served checkpoint's.
        weight_names: component → parameter names the server can patch; see `read_adapter`.
    """

    def __init__(
        self,
        folder: Path,
        architecture: str,
        weight_names: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self.folder = folder
        self.architecture = architecture
        self.weight_names = (
            None if weight_names is None else {c: frozenset(n) for c, n in weight_names.items()}
        )
        self._read: dict[str, tuple[tuple[int, int], Adapter | AdapterError]] = {}
        self._lock = threading.Lock()

    def scan(self) -> dict[str, Adapter | AdapterError]:
        """Name → adapter (or why it is refused), for every file in the folder now."""
        with self._lock:
            entries = _files(self.folder)
            for name in set(self._read) - set(entries):
                del self._read[name]
            for name, path in entries.items():
                try:
                    stat = path.stat()
                except OSError:
                    continue
                stamp = (stat.st_size, stat.st_mtime_ns)
                known = self._read.get(name)
                if known is None or known[0] != stamp:
                    self._read[name] = (stamp, self._load(path))
            return {name: value for name, (_, value) in sorted(self._read.items())}

    def _load(self, path: Path) -> Adapter | AdapterError:
        if path.suffix != ADAPTER_SUFFIX:
            return AdapterError(
                f"{path.name}: only {ADAPTER_SUFFIX} adapters are read (not pickle)"
            )
        try:
            return read_adapter(path, self.architecture, self.weight_names)
        except AdapterError as err:
            return err

    def get(
        self, names: Sequence[str], found: Mapping[str, Adapter | AdapterError] | None = None
    ) -> list[Adapter]:
        """The adapters named, current (in `found`, a `scan()` result, when given).

        Raises:
            AdapterError: a name that is not a usable adapter, listing those that are.
        """
        found = self.scan() if found is None else found
        adapters = []
        for name in names:
            value = found.get(name)
            if isinstance(value, Adapter):
                adapters.append(value)
                continue
            usable = [n for n, v in found.items() if isinstance(v, Adapter)]
            reason = f" ({value})" if value is not None else ""
            raise AdapterError(
                f"{name!r} is not an adapter of this model{reason}; available: "
                f"{', '.join(usable) or 'none'}"
            )
        return adapters


def describe_catalog(catalog: AdapterCatalog | None) -> list[dict[str, Any]]:
    """Every file of the folder: its `Adapter.describe()`, or its name and why it is refused
    (`sdserve_protocol.adapters`); empty when the pipeline serves no adapters."""
    if catalog is None:
        return []
    return [
        value.describe() if isinstance(value, Adapter) else {"name": name, "error": str(value)}
        for name, value in catalog.scan().items()
    ]


def _files(folder: Path) -> dict[str, Path]:
    """Adapter stem → file, for the adapter and refused (pickle) files in `folder`."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return {}
    files: dict[str, Path] = {}
    for entry in sorted(names):
        path = folder / entry
        if path.suffix in (ADAPTER_SUFFIX, *REFUSED_SUFFIXES) and path.is_file():
            files.setdefault(path.stem, path)
    return files
