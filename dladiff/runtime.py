"""Device choice, mixed precision and progress display."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

import torch
from tqdm.auto import tqdm

from dladiff.errors import DladiffError

log = logging.getLogger("dladiff")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def select_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU with a warning; ``cuda`` without CUDA is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("no CUDA GPU found: running on the CPU, which is very slow for real Stable Diffusion models")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DladiffError(f"device '{name}' was asked for but this machine has no usable CUDA GPU; use --device cpu or auto")
        index = torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            raise DladiffError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise DladiffError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N")


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on CUDA; fp32 (no autocast) on the CPU or when asked."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=DTYPES[precision])


def frozen_dtype(device: torch.device, precision: str) -> torch.dtype:
    """Storage dtype of models that are never trained (θs, VAE, text encoder)."""
    return DTYPES[precision] if device.type == "cuda" else torch.float32


def quiet_libraries() -> None:
    """Turn off diffusers' and transformers' own progress bars (dladiff shows its own).

    Called by the model loaders, where those libraries are imported anyway, so that commands that
    load no diffusion model (``--help``, ``--layers 2``, ``verify``) never import them.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def progress(total: int, desc: str, quiet: bool):
    """A tqdm bar (on stderr), silent when ``quiet``."""
    return tqdm(total=total, desc=desc, disable=quiet, dynamic_ncols=True, leave=False)


class StopRequest:
    """A flag set by the first Ctrl-C; long loops check it at safe points and checkpoint.

    A second Ctrl-C raises ``KeyboardInterrupt`` at once.
    """

    def __init__(self):
        self.requested = False

    def request(self) -> None:
        self.requested = True

    @contextlib.contextmanager
    def handle_sigint(self):
        """Install the two-stage Ctrl-C handler (main thread only) for the duration of the block."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            log.warning("Ctrl-C: finishing the current layer-1 epoch or layer-2 photo and saving a checkpoint "
                        "(Ctrl-C again to abort now)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


class Interrupted(DladiffError):
    """A run stopped at the user's request after saving a resumable checkpoint."""
