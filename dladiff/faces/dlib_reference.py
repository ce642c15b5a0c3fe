"""dlib's own C++ face pipeline (detector, 68-point landmarks, descriptor) as an independent judge.

Layer 2 optimizes through our PyTorch port of dlib's ResNet and our alignment; this class uses
none of that, so the distances it reports are what a third party running dlib would measure.
"""

from __future__ import annotations

import numpy as np

from dladiff.faces.dlib_resnet import DLIB_VERIFICATION_THRESHOLD
from dladiff.faces.model_packs import dlib_model_path

MIN_SCORE = 0.2
"""Clean-photo HOG detections below this score are not counted as faces (the test photos' one
false positive scores 0.12; see DlibDetector). Protected photos are searched at dlib's default 0."""


class DlibReference:
    """Faces and 128-d descriptors exactly as ``dlib.face_recognition_model_v1`` computes them."""

    threshold = DLIB_VERIFICATION_THRESHOLD

    def __init__(self, upsample: int = 1):
        import dlib

        self.upsample = upsample
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(dlib_model_path("shape_predictor_68_face_landmarks.dat")))
        self.model = dlib.face_recognition_model_v1(str(dlib_model_path("dlib_face_recognition_resnet_model_v1.dat")))

    def faces(self, image: np.ndarray, min_score: float = MIN_SCORE) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(centre (2,), descriptor (128,))`` of every face scoring ``min_score`` or more."""
        image = np.ascontiguousarray(image)
        rects, _, _ = self.detector.run(image, self.upsample, min_score)
        out = []
        for rect in rects:
            centre = np.array([(rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2])
            descriptor = np.array(self.model.compute_face_descriptor(image, self.predictor(image, rect)))
            out.append((centre, descriptor))
        return out

    def distances(self, clean: np.ndarray, protected: np.ndarray, max_shift: float = 40.0) -> list[float | None]:
        """Per face of ``clean``: descriptor distance to the same face in ``protected`` (None if not found).

        Above 0.6 dlib judges the two as different people.
        """
        found = self.faces(protected, min_score=0.0)
        result = []
        for centre, descriptor in self.faces(clean):
            near = [d for c, d in found if np.linalg.norm(c - centre) < max_shift]
            result.append(float(np.linalg.norm(near[0] - descriptor)) if near else None)
        return result
