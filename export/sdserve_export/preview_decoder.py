"""The optional preview decoder of an export (`--preview-decoder DIR`): a tiny VAE.

DIR is a diffusers `AutoencoderTiny` saved with `save_pretrained` (TAESD for SD 1.5,
`madebyollin/taesd`; TAESDXL for SDXL, `madebyollin/taesdxl`: the operator downloads it). It
is read from disk only, and refused before anything is exported when it is not an
`AutoencoderTiny` or when its latents are not the checkpoint's. Exported like every other
component (`onnx_export.preview_decoder_target`, checked against PyTorch), it decodes the
previews of streamed requests instead of the linear latent → RGB projection.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from diffusers import AutoencoderTiny

OPTION = "--preview-decoder"
MODEL_CLASS = "AutoencoderTiny"
CONFIG_JSON = "config.json"


class PreviewDecoderError(ValueError):
    """The folder given as the preview decoder cannot serve this checkpoint's previews."""


def load_preview_decoder(
    folder: str | Path, sizes: Mapping[str, int], allow_pickle: bool = False
) -> AutoencoderTiny:
    """Load a tiny VAE from a local folder and check it fits the checkpoint.

    Args:
        folder: an `AutoencoderTiny` saved with `save_pretrained` (its `config.json` and
            weights), on disk: never a hub id.
        sizes: the checkpoint's fixed dims (`checkpoint_sizes`): its `latent_channels` (4 for
            SD 1.5 and SDXL) and `image_channels`.
        allow_pickle: also accept `.bin` weights (see `repository.load_pipeline`).

    Raises:
        PreviewDecoderError: not a folder holding an `AutoencoderTiny`, or its latent or image
            channels are not the checkpoint's; the message names `--preview-decoder`.
    """
    folder = Path(folder)
    config_file = folder / CONFIG_JSON
    if not config_file.is_file():
        raise PreviewDecoderError(
            f"{OPTION} {folder}: not a folder holding a diffusers {MODEL_CLASS} (no "
            f"{CONFIG_JSON}); save TAESD (madebyollin/taesd, or madebyollin/taesdxl for "
            "SDXL) there with save_pretrained"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise PreviewDecoderError(f"{OPTION} {folder}: {CONFIG_JSON} unreadable ({err})") from None
    found = config.get("_class_name") if isinstance(config, dict) else None
    if found != MODEL_CLASS:
        raise PreviewDecoderError(
            f"{OPTION} {folder}: a {found or 'model of no known class'}, not a diffusers "
            f"{MODEL_CLASS} (TAESD / TAESDXL)"
        )
    _check_channels(folder, config, "latent_channels", sizes["latent_channels"], "latents")
    _check_channels(folder, config, "out_channels", sizes["image_channels"], "images")
    use_safetensors = None if allow_pickle else True
    try:
        model = AutoencoderTiny.from_pretrained(
            folder, local_files_only=True, use_safetensors=use_safetensors
        )
    except (OSError, ValueError) as err:
        raise PreviewDecoderError(f"{OPTION} {folder}: {err}") from None
    return model.eval()


def _check_channels(
    folder: Path, config: Mapping[str, object], key: str, expected: int, what: str
) -> None:
    defaults = {"latent_channels": 4, "out_channels": 3}  # AutoencoderTiny's
    value = config.get(key, defaults[key])
    if value != expected:
        raise PreviewDecoderError(
            f"{OPTION} {folder}: its {key} is {value}, but the checkpoint's {what} have "
            f"{expected} channels; use the tiny VAE of the checkpoint's family (TAESD for SD "
            "1.5, TAESDXL for SDXL)"
        )
