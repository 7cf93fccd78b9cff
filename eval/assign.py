"""Face-to-person assignment: the Hungarian algorithm on embedding distance, restricted to
the pairs a render's regions allow."""

from __future__ import annotations

import numpy as np

__all__ = ["assign_faces", "distance_matrix"]

# Larger than any sum of real costs (unit vectors are at most 2 apart), so the solver first
# maximises the number of allowed pairs and only then minimises their distance.
_FORBIDDEN = 1e6


def distance_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) L2 distances between rows of `a` and rows of `b`."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)


def _rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(len(x), -1) if x.size else x.reshape(len(x), 0)


def assign_faces(
    face_embeddings: np.ndarray,
    reference_embeddings: np.ndarray,
    allowed: np.ndarray | None = None,
) -> list[int | None]:
    """For each person (row of `reference_embeddings`, (P, D)), the index of its face among
    `face_embeddings` ((F, D)), or None.

    Minimises the total L2 distance over the largest set of allowed (face, person) pairs;
    `allowed` ((F, P) bool) marks which face may stand for which person (None: all). A
    disallowed pair is never returned, and each face serves at most one person.
    """
    from scipy.optimize import linear_sum_assignment

    faces, refs = _rows(face_embeddings), _rows(reference_embeddings)
    n_faces, n_people = len(faces), len(refs)
    if n_faces and n_people and faces.shape[1] != refs.shape[1]:
        raise ValueError(f"face embeddings are {faces.shape[1]}-d but references are {refs.shape[1]}-d")
    if allowed is None:
        allowed = np.ones((n_faces, n_people), dtype=bool)
    allowed = np.asarray(allowed, dtype=bool)
    if allowed.shape != (n_faces, n_people):
        raise ValueError(f"allowed must have shape {(n_faces, n_people)}, got {allowed.shape}")
    result: list[int | None] = [None] * n_people
    if n_faces == 0 or n_people == 0:
        return result
    cost = np.where(allowed, distance_matrix(faces, refs), _FORBIDDEN)
    rows, cols = linear_sum_assignment(cost)
    for f, p in zip(rows, cols):
        if allowed[f, p]:
            result[p] = int(f)
    return result
