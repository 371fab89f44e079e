"""Reading SAE checkpoints in every layout docs/method.md §7 lists, into one canonical state dict, and a digest of its
tensors.

Layouts: a folder with `cfg.json` + `sae.safetensors` (ours and SAEmnesia's); a parent folder plus a hookpoint
name; a legacy folder with `cfg.json` + `state_dict.pth` (SAeUron's trainer), whose tensors are renamed here.
Writing produces exactly what the published loader accepts: `cfg.json` holding the `SaeConfig` fields plus
`d_in` (it pops `d_in` and passes the rest to its config class, so no extra key may appear) and a strict
safetensors state dict.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from saemnesia.io import atomic_write_text

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
LEGACY_WEIGHTS_FILE = "state_dict.pth"
TENSOR_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
#: cfg.json key aliases written by older trainers (OpenAI's `sparse_autoencoder` naming).
CONFIG_ALIASES = {"d_model": "d_in", "n_dirs_local": "num_latents"}

#: Legacy tensor name → our name, and whether the tensor is stored transposed (`decoder.weight` is `[d, L]`).
LEGACY_NAMES = {"pre_bias": ("b_dec", False), "latent_bias": ("encoder.bias", False),
                "encoder.weight": ("encoder.weight", False), "decoder.weight": ("W_dec", True)}
#: Bookkeeping tensors of the legacy trainer that are not part of the model.
LEGACY_IGNORED = {"stats_last_nonzero"}


def write_checkpoint(folder: Path, config: dict, state: dict[str, Tensor]) -> None:
    """Write `sae.safetensors` then `cfg.json` into `folder`, each atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{WEIGHTS_FILE}.tmp"
    save_file({name: state[name].detach().contiguous().cpu() for name in TENSOR_NAMES}, str(temporary))
    os.replace(temporary, folder / WEIGHTS_FILE)
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2))


def read_checkpoint(path: Path, hookpoint: str | None = None) -> tuple[dict, dict[str, Tensor]]:
    """Return `(config, state_dict)` with canonical key and tensor names, or fail with one sentence naming the file.

    `config` always holds `d_in` and an explicit `num_latents`; unknown keys are left for the caller to drop.
    """
    folder = _checkpoint_folder(path, hookpoint)
    raw_cfg = _read_config(folder / CONFIG_FILE)
    if (folder / WEIGHTS_FILE).is_file():
        state = load_file(str(folder / WEIGHTS_FILE))
    elif (folder / LEGACY_WEIGHTS_FILE).is_file():
        state = _rename_legacy(folder / LEGACY_WEIGHTS_FILE)
    else:
        raise FileNotFoundError(f"SAE checkpoint folder {folder} has no weights: expected {WEIGHTS_FILE} "
                                f"or {LEGACY_WEIGHTS_FILE}.")

    if set(state) != set(TENSOR_NAMES):
        raise ValueError(f"SAE weights in {folder} hold tensors {sorted(state)}; expected {sorted(TENSOR_NAMES)}.")
    num_latents, d_in = state["encoder.weight"].shape
    if raw_cfg.get("d_in", d_in) != d_in or raw_cfg.get("num_latents", 0) not in (0, num_latents):
        raise ValueError(f"{folder / CONFIG_FILE} says d_in={raw_cfg.get('d_in')}, num_latents="
                         f"{raw_cfg.get('num_latents')} but the weights are [{num_latents}, {d_in}].")
    # Explicit from here on, whatever the expansion factor says.
    return {**raw_cfg, "d_in": d_in, "num_latents": num_latents}, state


def _checkpoint_folder(path: Path, hookpoint: str | None) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"SAE checkpoint {path} does not exist.")
    if path.is_file():  # a weights file given directly: its folder is the checkpoint
        path = path.parent
    if hookpoint is not None and (path / CONFIG_FILE).is_file() and not (path / hookpoint).is_dir():
        return path  # the SAE folder itself: the hookpoint only names it inside a parent folder
    if hookpoint is not None:
        if not (path / hookpoint).is_dir():
            raise FileNotFoundError(f"SAE checkpoint folder {path} has no hookpoint folder {hookpoint!r}; "
                                    f"found {_hookpoint_folders(path)}.")
        return path / hookpoint
    inside = _hookpoint_folders(path) if not (path / CONFIG_FILE).is_file() else []
    if len(inside) > 1:
        raise FileNotFoundError(f"{path} holds several SAEs {inside}: pass a hookpoint name.")
    return path / inside[0] if inside else path  # a parent of one SAE folder (what SaeExport writes) names it


def _hookpoint_folders(path: Path) -> list[str]:
    return sorted(child.name for child in path.iterdir() if (child / CONFIG_FILE).is_file())


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"SAE checkpoint config {path} is missing.")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"SAE checkpoint config {path} is not valid JSON ({error}).") from error
    for alias, name in CONFIG_ALIASES.items():
        if alias in raw and name not in raw:
            raw[name] = raw.pop(alias)
    return raw


def _rename_legacy(path: Path) -> dict[str, Tensor]:
    stored = torch.load(path, map_location="cpu", weights_only=True)
    stored = stored.get("state_dict", stored)
    state = {}
    for name, tensor in stored.items():
        if name in LEGACY_IGNORED:
            continue
        if name not in LEGACY_NAMES:
            raise ValueError(f"Legacy SAE weights {path} hold an unknown tensor {name!r}; expected "
                             f"{sorted(LEGACY_NAMES) + sorted(LEGACY_IGNORED)}.")
        new_name, transposed = LEGACY_NAMES[name]
        state[new_name] = tensor.T.contiguous() if transposed else tensor
    return state


def state_digest(state: dict[str, Tensor]) -> str:
    """A short hash of a checkpoint's tensors as stored: statistics record the digest of the SAE they were computed
    with, so erasing with another SAE of the same size is refused instead of silently selecting wrong latents."""
    digest = hashlib.blake2b(digest_size=8)
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
