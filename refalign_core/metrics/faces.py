"""Face mode of the identity check: dlib's HOG detector, 5-point alignment and 128-d ResNet embedding, with the
real model files that the PyPI package `face-recognition-models` ships (loaded by path)."""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RefAlignInputError

SAME_PERSON_DISTANCE = 0.6  # dlib's documented threshold for its face embedding


def face_models_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RefAlignInputError("face mode needs the PyPI packages dlib-bin and face-recognition-models")
    return Path(spec.submodule_search_locations[0]) / "models"


@dataclass
class Face:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels
    score: float
    embedding: np.ndarray  # [128]


class FaceEmbedder:
    def __init__(self, models_dir: str | Path | None = None, upsample: int = 1):
        try:
            import dlib
        except ImportError as e:
            raise RefAlignInputError("face mode needs the PyPI package dlib-bin") from e
        models = Path(models_dir) if models_dir else face_models_dir()
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self.encoder = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
        self.upsample = upsample

    def all_faces(self, image: np.ndarray) -> list[Face]:
        """image `[H, W, 3]` uint8 RGB -> every detected face, aligned on 5 landmarks and embedded."""
        image = np.ascontiguousarray(image)
        rects, scores, _ = self.detector.run(image, self.upsample, 0.0)
        return [Face((r.left(), r.top(), r.right(), r.bottom()), float(s),
                     np.array(self.encoder.compute_face_descriptor(image, self.landmarks(image, r))))
                for r, s in zip(rects, scores)]

    def largest_face(self, image: np.ndarray) -> Face | None:
        """The largest detected face (ties: the most confident), or None."""
        faces = self.all_faces(image)
        if not faces:
            return None
        return max(faces, key=lambda f: ((f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), f.score))


def face_distance(a: Face, b: Face) -> float:
    return float(np.linalg.norm(a.embedding - b.embedding))
