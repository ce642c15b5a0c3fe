"""Finding the attacks' adapter weights: a local file or folder, or a hub id in the local cache.

A hub id missing from the cache is fetched only when the hub is reachable (as ``dladiff.diffusion.loading``
does for Stable Diffusion); otherwise :class:`ModelUnavailableError` names the file and the command
that downloads it, and the attack is skipped with that reason.
"""

from __future__ import annotations

from pathlib import Path

from dladiff.errors import ModelUnavailableError


def adapter_file(adapter: str, filename: str, what: str) -> Path:
    """``filename`` inside ``adapter`` (a local folder, or a hub repository id)."""
    path = Path(adapter).expanduser()
    if path.is_dir():
        if (path / filename).is_file():
            return path / filename
        raise ModelUnavailableError(f"{what}: {path / filename} not found; put {filename} of the adapter there")
    if path.is_absolute() or adapter.startswith((".", "~")):
        raise ModelUnavailableError(f"{what}: no folder {path}; it should hold {filename}")
    from huggingface_hub import hf_hub_download

    for offline in (True, False):
        try:
            return Path(hf_hub_download(adapter, filename, local_files_only=offline))
        except Exception:
            continue
    raise ModelUnavailableError(
        f"{what}: {filename} of {adapter} is not in the local Hugging Face cache and cannot be downloaded here; "
        f"run `huggingface-cli download {adapter} {filename}` on a machine with internet (then copy the cache), "
        f"or set the adapter to a local folder holding {filename}"
    )


def adapter_folder(adapter: str, subfolder: str, what: str) -> Path:
    """``subfolder`` (a diffusers model with ``config.json``) inside ``adapter`` (local folder or hub id)."""
    config = adapter_file(adapter, f"{subfolder}/config.json", what)
    folder = config.parent
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            try:
                adapter_file(adapter, f"{subfolder}/{name}", what)
                break
            except ModelUnavailableError:
                continue
        else:
            raise ModelUnavailableError(f"{what}: {folder} has config.json but no weights (diffusion_pytorch_model.safetensors)")
    return folder


def local_model_folder(model_id: str, what: str) -> Path:
    """A local diffusers folder, or the cached snapshot of a hub id (never downloaded here)."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:
        raise ModelUnavailableError(
            f"{what}: {model_id} is neither a local folder nor in the Hugging Face cache; run "
            f"`huggingface-cli download {model_id}` where you have internet, or give a local folder"
        ) from None
