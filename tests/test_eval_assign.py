"""eval.assign: Hungarian face-to-person assignment, checked against brute force and under permutation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eval.assign import assign_faces, distance_matrix


def _unit_rows(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(faces, refs, allowed):
    """Best (most pairs, then least distance) assignment by trying every injection."""
    dist = distance_matrix(faces, refs)
    n_f, n_p = dist.shape
    best, best_key = [None] * n_p, (0, 0.0)
    for k in range(min(n_f, n_p), 0, -1):
        for people in itertools.combinations(range(n_p), k):
            for faces_perm in itertools.permutations(range(n_f), k):
                if all(allowed[f, p] for f, p in zip(faces_perm, people)):
                    cost = sum(dist[f, p] for f, p in zip(faces_perm, people))
                    key = (k, -cost)
                    if key > best_key:
                        best_key = key
                        best = [None] * n_p
                        for f, p in zip(faces_perm, people):
                            best[p] = f
        if best_key[0] == k:
            return best
    return best


def test_nearest_faces_are_assigned():
    refs = np.eye(3)[:2]  # two people
    faces = np.array([[0.1, 1.0, 0.0], [1.0, 0.05, 0.0], [0.0, 0.0, 1.0]])
    faces /= np.linalg.norm(faces, axis=1, keepdims=True)
    assert assign_faces(faces, refs) == [1, 0]


def test_disallowed_pairs_are_never_assigned():
    refs = np.eye(2)
    faces = np.eye(2)
    # face 0 is person 0's perfect match but lies outside that person's region
    allowed = np.array([[False, True], [True, True]])
    result = assign_faces(faces, refs, allowed)
    assert result == [1, 0]
    assert all(allowed[f, p] for p, f in enumerate(result) if f is not None)
    # nobody may have face 0 or 1: both people are missing
    assert assign_faces(faces, refs, np.zeros((2, 2), bool)) == [None, None]


def test_empty_inputs_and_more_people_than_faces():
    refs = np.eye(3)
    assert assign_faces(np.zeros((0, 3)), refs) == [None, None, None]
    assert assign_faces(np.eye(3)[:1], np.zeros((0, 3))) == []
    result = assign_faces(np.eye(3)[2:3], refs)
    assert result == [None, None, 0]


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match="allowed must have shape"):
        assign_faces(np.eye(2), np.eye(2), np.ones((3, 2), bool))
    with pytest.raises(ValueError, match="4-d but references are 2-d"):
        assign_faces(np.ones((1, 4)), np.eye(2))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_faces=st.integers(0, 5),
    n_people=st.integers(1, 4),
    data=st.data(),
)
def test_permuting_faces_permutes_the_assignment(seed, n_faces, n_people, data):
    rng = np.random.default_rng(seed)
    faces, refs = _unit_rows(rng, n_faces), _unit_rows(rng, n_people)
    allowed = np.array(data.draw(st.lists(st.lists(st.booleans(), min_size=n_people, max_size=n_people),
                                          min_size=n_faces, max_size=n_faces)), dtype=bool).reshape(n_faces, n_people)
    perm = rng.permutation(n_faces)  # new position i holds old face perm[i]
    before = assign_faces(faces, refs, allowed)
    after = assign_faces(faces[perm], refs, allowed[perm])
    inverse = np.argsort(perm)  # old face f now sits at inverse[f]
    assert after == [None if f is None else int(inverse[f]) for f in before]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_faces=st.integers(0, 4), n_people=st.integers(1, 3),
       density=st.floats(0.2, 1.0))
def test_matches_brute_force(seed, n_faces, n_people, density):
    rng = np.random.default_rng(seed)
    faces, refs = _unit_rows(rng, n_faces), _unit_rows(rng, n_people)
    allowed = rng.random((n_faces, n_people)) < density
    assert assign_faces(faces, refs, allowed) == _brute_force(faces, refs, allowed)
