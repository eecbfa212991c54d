"""Where the processes of one server share what they record: the checkpoint registry
(`checkpoints`) and each runner's LoRA weight variants, read by the checkpoint listing.

Light on purpose (no torch): the component runner models import it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STATE_DIR_ENV = "SDSERVE_STATE_DIR"


def state_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where the pipelines of one server share their record (`STATE_DIR_ENV`, else a folder
    named after the server's process, the parent of every backend stub)."""
    folder = env.get(STATE_DIR_ENV) or os.path.join(
        tempfile.gettempdir(), f"sdserve-{os.getppid()}"
    )
    return Path(folder)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


VARIANTS_DIR = "variants"


def write_variants(folder: Path, model: str, variants: list[dict[str, Any]]) -> None:
    """Record component model `model`'s LoRA weight variants (this process's) for the
    listing: `adapters` ([[name, scale], ...]) and `size_mb` each."""
    path = folder / VARIANTS_DIR / f"{model}.{os.getpid()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".partial")
    scratch.write_text(json.dumps({"model": model, "pid": os.getpid(), "variants": variants}))
    scratch.replace(path)


def read_variants(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Model → the LoRA weight variants its live processes recorded (`write_variants`)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((folder / VARIANTS_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(int(record["pid"])):
            found.setdefault(record["model"], []).extend(record["variants"])
    return found
