"""Face embeddings of whole images: detect the largest face, align it to the encoder's template, encode.

Used by ISM (paper §5.2), ISM_pro / ISM_gen (Table 4) and by the zero-shot attacks, which read the
protected photo exactly like the real pipelines do: FaceID takes the L2-normalized buffalo_l
embedding, InstantID the raw antelopev2 embedding and the five keypoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dladiff.data import to_tensor
from dladiff.faces.detect import Face, FaceDetector
from dladiff.faces.encoders import embed_face


@dataclass
class FaceEmbedder:
    """A detector and an identity encoder used together on ``(H, W, 3) uint8`` RGB images."""

    detector: FaceDetector
    encoder: torch.nn.Module

    @property
    def name(self) -> str:
        return f"{self.detector.name}+{self.encoder.name}"

    def largest_face(self, image: np.ndarray) -> Face | None:
        faces = self.detector.detect(np.ascontiguousarray(image))
        return faces[0] if faces else None

    def embed_face(self, image: np.ndarray, face: Face) -> np.ndarray:
        """Raw embedding ``(D,)`` float64 of ``face`` in ``image`` ``(H, W, 3) uint8`` (aligned on its five landmarks)."""
        return embed_face(self.encoder, to_tensor(image), face.landmarks).double().cpu().numpy()

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        """Embedding of the largest face, or None when no face is found."""
        face = self.largest_face(image)
        return None if face is None else self.embed_face(image, face)


def make_detector_for(name: str, encoder_name: str, model_root: str, det_size: int) -> FaceDetector:
    """A detector by name; ``insightface`` takes the SCRFD of the encoder's own pack (buffalo_l / antelopev2)."""
    from dladiff.faces.detect import InsightFaceDetector, make_detector
    from dladiff.faces.encoders import ENCODERS

    spec = ENCODERS.get(encoder_name)
    if name == "insightface" and spec is not None and spec.pack is not None:
        return InsightFaceDetector(model_root, pack=spec.pack, det_size=det_size)
    return make_detector(name, model_root, det_size)


def load_face_embedder(detector: str, encoder: str, model_root: str, det_size: int) -> FaceEmbedder:
    """Detector + encoder by name; raises :class:`ModelUnavailableError` naming missing files."""
    from dladiff.faces.encoders import load_encoder

    return FaceEmbedder(make_detector_for(detector, encoder, model_root, det_size), load_encoder(encoder, model_root))


def unit(vector: np.ndarray) -> np.ndarray:
    """``vector / ‖vector‖`` (insightface's ``normed_embedding``)."""
    return vector / max(float(np.linalg.norm(vector)), 1e-12)
