"""The 3DGS .ply writer (exporters/splat_ply.py): the standard layout, and a round trip within float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

from exporters.splat_ply import read_splat_ply, write_splat_ply

STANDARD = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(9)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def _gaussians(n: int, rest: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"means": rng.normal(size=(n, 3)), "log_scales": rng.normal(-4, 1, size=(n, 3)),
            "quaternions": rng.normal(size=(n, 4)), "logit_opacities": rng.normal(size=n),
            "f_dc": rng.normal(size=(n, 3)), "f_rest": rng.normal(size=(n, rest, 3))}


def test_round_trip_is_exact_in_float32(tmp_path: Path) -> None:
    g = _gaussians(257, 3)
    path = write_splat_ply(tmp_path / "g.ply", **g)
    back = read_splat_ply(path)
    for name, values in g.items():
        assert back[name].shape == values.shape, name
        assert np.array_equal(back[name], values.astype(np.float32)), name


def test_header_is_the_standard_3dgs_layout(tmp_path: Path) -> None:
    path = write_splat_ply(tmp_path / "g.ply", **_gaussians(5, 3))
    header = path.read_bytes().split(b"end_header\n")[0].decode().splitlines()
    assert header[:3] == ["ply", "format binary_little_endian 1.0", "element vertex 5"]
    assert [line.split()[2] for line in header[3:]] == STANDARD
    assert all(line.startswith("property float ") for line in header[3:])
    # f_rest is channel-major: all of red's coefficients, then green's, then blue's
    g = _gaussians(5, 3)
    back = np.frombuffer(path.read_bytes().split(b"end_header\n")[1], dtype=[(n, "<f4") for n in STANDARD])
    assert np.allclose(back["f_rest_1"], g["f_rest"][:, 1, 0]) and np.allclose(back["f_rest_3"], g["f_rest"][:, 0, 1])


def test_degree_zero_only_and_a_generic_ply_reader(tmp_path: Path) -> None:
    g = _gaussians(40, 0)
    del g["f_rest"]
    path = write_splat_ply(tmp_path / "g.ply", **g)
    assert read_splat_ply(path)["f_rest"].shape == (40, 0, 3)
    cloud = trimesh.load(path)  # any PLY reader sees a point cloud of the Gaussians' centres
    assert np.allclose(np.asarray(cloud.vertices), g["means"].astype(np.float32))
