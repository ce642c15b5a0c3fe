"""What layer 2 loads once before any work: the face detector, the weighted encoders, the native judges, the landmark sources."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

from dladiff.config import Layer2Config
from dladiff.faces.detect import FaceDetector, make_detector
from dladiff.faces.encoders import (
    IdentityEncoder,
    load_encoder,
    resolve_encoder_weights,
)
from dladiff.faces.landmarks import make_sources
from dladiff.faces.verdicts import Judge, native_judge

log = logging.getLogger("dladiff")


@dataclass
class Layer2Models:
    """The detector and the weighted encoders, loaded once before any work (missing files fail early)."""

    detector: FaceDetector
    encoders: dict[str, IdentityEncoder]
    weights: dict[str, float]
    judges: dict[str, Judge] = dataclasses.field(default_factory=dict)  # native pipelines of the encoders that have one
    seconds: dict[str, float] = dataclasses.field(default_factory=lambda: defaultdict(float))  # wall time per phase
    cpu_seconds: dict[str, float] = dataclasses.field(default_factory=lambda: defaultdict(float))  # process CPU time per phase
    sources: list = dataclasses.field(default_factory=list)  # extra landmark sources (alignment diversity)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Add the block's wall and CPU time to ``seconds[name]``, ``cpu_seconds[name]`` (detection, alignment, pgd, ...)."""
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start
            self.cpu_seconds[name] += time.process_time() - cpu


def prepare_layer2(cfg: Layer2Config) -> Layer2Models:
    """Load the face detector and the encoders named by the config (or the default ones)."""
    weights = resolve_encoder_weights(cfg.encoders, cfg.model_root)
    log.info("layer 2 encoders: %s", ", ".join(f"{name} (weight {w:g})" for name, w in weights.items()))
    encoders = {name: load_encoder(name, cfg.model_root) for name in weights}
    detector = make_detector(cfg.detector, cfg.model_root, cfg.det_size)
    judges = {}
    if cfg.native_verdicts:
        judges = {name: judge for name in weights if (judge := native_judge(name, cfg.model_root, cfg.det_size))}
    log.info("layer 2 face detector: %s; native verdicts by: %s", detector.name, ", ".join(judges) or "none")
    sources = make_sources(cfg.landmark_sources, cfg.model_root, cfg.det_size, skip=detector.name)
    return Layer2Models(detector, encoders, weights, judges, sources=sources)
