"""Shape metrics between a predicted and a reference surface, from points sampled on both.

Conventions (all distances Euclidean, in scene units unless marked relative):
- Chamfer-L1 = 0.5 * (mean over a of min over b |a - b| + mean over b of min over a |b - a|), the
  symmetric mean of nearest-neighbour distances (not squared), so it reads as "average surface
  error" in the scene's units.
- F-score at tau: precision = fraction of predicted points within tau of the reference points,
  recall = fraction of reference points within tau of the predicted points, F = 2PR / (P + R).
- Relative values divide by the reference's bounding-box diagonal, so shapes of any size compare.
- Normal consistency = 0.5 * (mean over a of |n_a . n_b(a)| + mean over b of |n_b . n_a(b)|), with b(a) the
  nearest sample of the other surface and n the unit normal of the face a sample lies on: 1 when the
  surfaces turn alike everywhere (a prediction as smooth as the reference), lower for facets, lumps
  ("orange peel") or folds that Chamfer barely sees. |cos|, so a flipped winding is not counted as rough.
Sampled surfaces carry a small positive bias (the nearest sample is farther than the nearest surface
point); it shrinks as the sample count grows.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import trimesh
from scipy.spatial import cKDTree

REPORTED = ("chamfer_l1", "chamfer_l1_rel", "fscore_1pct", "normal_consistency")  # in a run's closing record


def sample_surface(mesh: trimesh.Trimesh, n: int, seed: int) -> np.ndarray:
    """`n` points (n, 3) uniform over the surface area, reproducible for a given `seed`.

    Faces are chosen with probability proportional to area, then a uniform point in the triangle
    (the square-root barycentric trick).
    """
    return sample_surface_normals(mesh, n, seed)[0]


def sample_surface_normals(mesh: trimesh.Trimesh, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`sample_surface`'s points (n, 3) and the unit normal (n, 3) of the face each lies on (from the
    winding; zero-area faces are never drawn, so every normal is defined)."""
    if len(mesh.faces) == 0:
        raise ValueError("cannot sample the surface of a mesh without faces")
    rng = np.random.default_rng(seed)
    tri = np.asarray(mesh.triangles, dtype=np.float64)
    area = np.asarray(mesh.area_faces, dtype=np.float64)
    if area.sum() <= 0:
        raise ValueError("cannot sample the surface of a mesh with zero area")
    face = rng.choice(len(area), size=n, p=area / area.sum())
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    w = np.stack([1.0 - s, s * (1.0 - r2), s * r2], axis=-1)
    t = tri[face]
    cross = np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])
    normals = cross / np.maximum(np.linalg.norm(cross, axis=1, keepdims=True), 1e-300)
    return (t * w[:, :, None]).sum(axis=1), normals


def _nearest(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from each point of `a` to its nearest point of `b`."""
    return _nearest_index(a, b)[0]


def _nearest_index(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each point of `a` to its nearest point of `b`, and that point's index in `b`."""
    dist, index = cKDTree(np.asarray(b, dtype=np.float64)).query(np.asarray(a, dtype=np.float64), k=1)
    return dist, index


def chamfer_l1(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Chamfer-L1 (mean nearest-neighbour Euclidean distance, averaged both ways)."""
    return float(0.5 * (_nearest(a, b).mean() + _nearest(b, a).mean()))


def fscore(a: np.ndarray, b: np.ndarray, tau: float) -> float:
    """F-score at distance `tau` of prediction `a` against reference `b` (1 = every point within tau)."""
    precision = float((_nearest(a, b) <= tau).mean())
    recall = float((_nearest(b, a) <= tau).mean())
    if precision + recall == 0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


def normal_consistency(a: np.ndarray, normals_a: np.ndarray, b: np.ndarray, normals_b: np.ndarray) -> float:
    """Mean |cos| between each point's normal and its nearest neighbour's on the other set, both ways
    (see the module docstring); normals are unit length."""
    _, ab = _nearest_index(a, b)
    _, ba = _nearest_index(b, a)
    return _normal_consistency(normals_a, normals_b, ab, ba)


def _normal_consistency(normals_a: np.ndarray, normals_b: np.ndarray, ab: np.ndarray, ba: np.ndarray) -> float:
    cos_ab = np.abs((normals_a * normals_b[ab]).sum(axis=1))
    cos_ba = np.abs((normals_b * normals_a[ba]).sum(axis=1))
    return float(0.5 * (cos_ab.mean() + cos_ba.mean()))


def mesh_distance(pred: trimesh.Trimesh, ref: trimesh.Trimesh, n: int = 20000, seed: int = 0) -> dict[str, float]:
    """Chamfer-L1 (absolute and relative to the reference's bbox diagonal), F-scores at 1% and 2% of that
    diagonal and normal consistency, from `n` area-uniform samples on each surface."""
    a, normals_a = sample_surface_normals(pred, n, seed)
    b, normals_b = sample_surface_normals(ref, n, seed + 1)
    diagonal = float(np.linalg.norm(ref.bounds[1] - ref.bounds[0]))
    (d_ab, ab), (d_ba, ba) = _nearest_index(a, b), _nearest_index(b, a)
    chamfer = float(0.5 * (d_ab.mean() + d_ba.mean()))

    def f_at(tau: float) -> float:
        p, r = float((d_ab <= tau).mean()), float((d_ba <= tau).mean())
        return 0.0 if p + r == 0 else 2.0 * p * r / (p + r)

    return {
        "chamfer_l1": chamfer,
        "chamfer_l1_rel": chamfer / diagonal,
        "fscore_1pct": f_at(0.01 * diagonal),
        "fscore_2pct": f_at(0.02 * diagonal),
        "normal_consistency": _normal_consistency(normals_a, normals_b, ab, ba),
    }


def vertex_rgb(mesh: trimesh.Trimesh) -> np.ndarray:
    """(V, 3) colours in [0, 1] of a mesh's vertices: its vertex colours, or its texture read at each vertex's
    UV. (Load a vertex-coloured OBJ with `skip_materials=True`: its material has no image to read.)"""
    visual = mesh.visual.to_color() if mesh.visual.kind == "texture" else mesh.visual
    return np.asarray(visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0


def color_error(pred: trimesh.Trimesh, ref: trimesh.Trimesh) -> float:
    """Mean absolute RGB difference in [0, 1] between each predicted vertex's colour and the colour of the
    reference vertex nearest to it: how well a recovered appearance matches a reference with known colours
    (the oracle's), where the shapes agree."""
    _, nearest = cKDTree(np.asarray(ref.vertices, dtype=np.float64)).query(np.asarray(pred.vertices), k=1)
    return float(np.abs(vertex_rgb(pred) - vertex_rgb(ref)[nearest]).mean())


def load_mesh(path: Path | str) -> trimesh.Trimesh:
    """`trimesh.load(path, force="mesh")`, cached by path and modification time (treat it as read-only): a
    run's closing record and its closing summary read the same files. Raises what trimesh and the file system
    raise for a missing or unreadable file."""
    path = Path(path)
    return _load_mesh(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load_mesh(path: str, mtime: int) -> trimesh.Trimesh:
    return trimesh.load(path, force="mesh")


def file_distance(mesh_path: Path | str, reference: Path | str) -> dict[str, float]:
    """`mesh_distance` between two mesh files (`load_mesh`), cached likewise: the closing record and the
    closing summary ask for the same numbers."""
    mesh_path, reference = Path(mesh_path), Path(reference)
    return dict(_file_distance(str(mesh_path), mesh_path.stat().st_mtime_ns, str(reference),
                               reference.stat().st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _file_distance(mesh_path: str, mesh_mtime: int, reference: str, reference_mtime: int) -> tuple:
    return tuple(mesh_distance(_load_mesh(mesh_path, mesh_mtime), _load_mesh(reference, reference_mtime)).items())


def reference_metrics(meshes: dict[str, Path | str | None], reference: Path | str) -> dict[str, float]:
    """For a run's closing record: `REPORTED` of each mesh file against the reference, keyed with the
    mesh's prefix (`{"nerf_": mesh-nerf.obj, "mesh_": mesh.obj}`; "" for a single-stage run); NaN for a
    mesh that is missing, empty or unreadable, so a record never lacks a key another run has."""
    out: dict[str, float] = {}
    for prefix, path in meshes.items():
        try:
            values = file_distance(path, reference) if path is not None else {}
        except (OSError, ValueError, IndexError):  # a missing file; an empty mesh loads as nothing
            values = {}
        out.update({f"{prefix}{k}": round(float(values.get(k, float("nan"))), 6) for k in REPORTED})
    return out
