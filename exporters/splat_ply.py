"""3D Gaussians as the standard 3DGS .ply that splat viewers open (the layout of Kerbl et al.'s code).

One binary little-endian `vertex` element, float32 properties in this order:
    x, y, z, nx, ny, nz (zeros), f_dc_0..2, f_rest_0..(3 (d+1)^2 - 4), opacity, scale_0..2, rot_0..3
with the values as the optimiser holds them: f_dc the degree-0 spherical-harmonic coefficients (colour =
0.5 + 0.2821 f_dc), f_rest the higher degrees channel-major (all of red's, then green's, then blue's),
opacity a logit, scales natural logarithms, rot a quaternion (w, x, y, z), not necessarily normalised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exporters.atomic import atomic_write_bytes


def write_splat_ply(path: Path | str, means: np.ndarray, log_scales: np.ndarray, quaternions: np.ndarray,
                    logit_opacities: np.ndarray, f_dc: np.ndarray, f_rest: np.ndarray | None = None) -> Path:
    """Write N Gaussians: means (N, 3), log_scales (N, 3), quaternions (N, 4) w first, logit_opacities (N,),
    f_dc (N, 3), optional f_rest (N, K, 3) higher-degree coefficients. Returns `path`."""
    n = len(means)
    f_rest = np.zeros((n, 0, 3), np.float32) if f_rest is None else np.asarray(f_rest, np.float32)
    columns = {"x": means[:, 0], "y": means[:, 1], "z": means[:, 2]}
    columns.update({f"n{c}": np.zeros(n, np.float32) for c in "xyz"})
    columns.update({f"f_dc_{i}": f_dc[:, i] for i in range(3)})
    rest = f_rest.transpose(0, 2, 1).reshape(n, -1)  # channel-major, as 3DGS writes it
    columns.update({f"f_rest_{i}": rest[:, i] for i in range(rest.shape[1])})
    columns["opacity"] = np.asarray(logit_opacities).reshape(n)
    columns.update({f"scale_{i}": log_scales[:, i] for i in range(3)})
    columns.update({f"rot_{i}": quaternions[:, i] for i in range(4)})
    vertex = np.empty(n, dtype=[(name, "<f4") for name in columns])
    for name, values in columns.items():
        vertex[name] = values
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property float {name}" for name in columns]
    header.append("end_header")
    data = ("\n".join(header) + "\n").encode("ascii") + vertex.tobytes()
    atomic_write_bytes(Path(path), data)
    return Path(path)


def read_splat_ply(path: Path | str) -> dict[str, np.ndarray]:
    """The arrays `write_splat_ply` takes, from a 3DGS .ply (binary little-endian, float properties)."""
    raw = Path(path).read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    lines = raw[:end].decode("ascii").splitlines()
    if lines[0] != "ply" or "binary_little_endian" not in lines[1]:
        raise ValueError(f"{path} is not a binary little-endian PLY")
    n = next(int(line.split()[2]) for line in lines if line.startswith("element vertex"))
    names = [line.split()[2] for line in lines if line.startswith("property float")]
    vertex = np.frombuffer(raw, dtype=[(name, "<f4") for name in names], count=n, offset=end)
    rest = sorted((name for name in names if name.startswith("f_rest_")), key=lambda s: int(s.split("_")[-1]))
    stack = lambda keys: np.stack([vertex[k] for k in keys], axis=-1).astype(np.float32)  # noqa: E731
    f_rest = stack(rest).reshape(n, 3, -1).transpose(0, 2, 1) if rest else np.zeros((n, 0, 3), np.float32)
    return {"means": stack(["x", "y", "z"]), "log_scales": stack([f"scale_{i}" for i in range(3)]),
            "quaternions": stack([f"rot_{i}" for i in range(4)]), "logit_opacities": vertex["opacity"].astype(np.float32),
            "f_dc": stack([f"f_dc_{i}" for i in range(3)]), "f_rest": f_rest}
