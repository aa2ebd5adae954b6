"""A tetrahedral grid of a box: a cube lattice with every cube split into 6 tetrahedra (Kuhn triangulation).

Each cube's 6 tetrahedra are the monotone paths from its lowest corner to its highest one: step along
axis a0, then a1, then a2, for the 6 orders (a0, a1, a2) of (x, y, z); they all share the main diagonal.
Every cube is split the same way, so a square face is cut along the diagonal from its lowest to its highest
corner in both cubes that share it: the tetrahedra meet face to face (a conforming mesh), vertices are
shared, and every edge joins a vertex v to v + o for one of the 7 non-zero offsets o in {0, 1}^3.

Because of this regularity nothing of the size of the tetrahedron count is stored: a tetrahedron's
vertices and edges follow from its index by arithmetic, and per-vertex values (kept as an (X, Y, Z)
lattice) are compared across all edges or tetrahedra at once by slicing the lattice. The unique edges are
numbered once and for all by `(offset code - 1) * V + lower vertex`, so finding shared vertices never
needs a sort. `tets()` and `edges()` build explicit index arrays for inspection and tests.

Ids: vertex (i, j, k) of the lattice -> (i * Y + j) * Z + k (x slowest, like `threed.mesh.density_grid`);
tetrahedron -> perm * cells + (i * ny + j) * nz + k; offset code -> ox + 2 oy + 4 oz;
edge -> (code - 1) * V + lower vertex.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

# The 6 axis orders; tetrahedron `perm` of a cube visits corners 0, e_a0, e_a0 + e_a1, (1, 1, 1).
PERMS: tuple[tuple[int, int, int], ...] = tuple(itertools.permutations(range(3)))
# The 6 edges of a tetrahedron as pairs of its local corners (0..3).
LOCAL_EDGES: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def _corners(perm: Sequence[int]) -> np.ndarray:
    """(4, 3) corner offsets of the tetrahedron `perm` inside its unit cube."""
    corners = np.zeros((4, 3), dtype=np.int64)
    for step, axis in enumerate(perm):
        corners[step + 1:, axis] = 1
    return corners


CORNERS = np.stack([_corners(p) for p in PERMS])  # (6, 4, 3)
# Sign of each tetrahedron's volume with its corners in path order: +1 for even orders, -1 for odd ones.
PERM_SIGN = np.sign(np.linalg.det((CORNERS[:, 1:] - CORNERS[:, :1]).astype(np.float64))).astype(np.int64)
# Offset code of each local edge (corner n - corner m is a 0/1 vector because paths are monotone).
EDGE_CODES = np.array([[int((CORNERS[p, n] - CORNERS[p, m]) @ (1, 2, 4)) for m, n in LOCAL_EDGES]
                       for p in range(6)])  # (6, 6), values 1..7
OFFSETS = np.array([[(c >> a) & 1 for a in range(3)] for c in range(1, 8)])  # (7, 3): code c is row c - 1


class TetGrid:
    """Kuhn tetrahedral grid of `cells` = (nx, ny, nz) cubes of side `cell_size` starting at `origin`.

    Holds only numbers; tensors are made on the device of the values passed in (small lookup tables are
    cached per device).
    """

    def __init__(self, cells: int | Sequence[int], origin: Sequence[float] = (-1.0, -1.0, -1.0),
                 cell_size: float = 2.0 / 128):
        cells = (int(cells),) * 3 if isinstance(cells, (int, np.integer)) else tuple(int(c) for c in cells)
        if len(cells) != 3 or min(cells) < 1:
            raise ValueError(f"a tetrahedral grid needs 3 positive cell counts, got {cells}")
        if not cell_size > 0:
            raise ValueError(f"cell size must be positive, got {cell_size}")
        self.cells: tuple[int, int, int] = cells  # type: ignore[assignment]
        self.origin: tuple[float, float, float] = tuple(float(o) for o in origin)  # type: ignore[assignment]
        self.cell_size = float(cell_size)
        self.shape: tuple[int, int, int] = tuple(c + 1 for c in cells)  # type: ignore[assignment]
        X, Y, Z = self.shape
        self.strides = (Y * Z, Z, 1)
        self.num_vertices = X * Y * Z
        self.num_cells = cells[0] * cells[1] * cells[2]
        self.num_tets = 6 * self.num_cells
        self.num_edges = int(sum(np.prod([s - o for s, o in zip(self.shape, off)]) for off in OFFSETS))
        self._tables: dict[str, dict[str, Tensor]] = {}

    @classmethod
    def cube(cls, resolution: int, bound: float = 1.0) -> "TetGrid":
        """`resolution` cells per axis over [-bound, bound]^3."""
        return cls(resolution, (-bound,) * 3, 2.0 * bound / resolution)

    @classmethod
    def fit(cls, box_min: Sequence[float], box_max: Sequence[float], resolution: int) -> "TetGrid":
        """Cubic cells covering the box, `resolution` of them along its longest side (centred on the box)."""
        lo, hi = np.asarray(box_min, np.float64), np.asarray(box_max, np.float64)
        extent = hi - lo
        if not (extent > 0).all():
            raise ValueError(f"empty box {lo.tolist()} .. {hi.tolist()}")
        h = float(extent.max()) / resolution
        cells = np.maximum(np.ceil(extent / h - 1e-6), 1).astype(np.int64)
        origin = (lo + hi) / 2 - cells * h / 2
        return cls(tuple(cells.tolist()), tuple(origin.tolist()), h)

    def __repr__(self) -> str:
        return f"TetGrid(cells={self.cells}, origin={self.origin}, cell_size={self.cell_size:.6g})"

    # ---- lookup tables -------------------------------------------------------------------------------

    def table(self, name: str, device: torch.device | str) -> Tensor:
        """Small int64 tables on `device`, built once per device:
        corner_ids (6, 4): vertex-id offset of each corner of tetrahedron `perm` from its cube's lowest corner;
        edge_codes (6, 6): offset code of each local edge; edge_from (6, 6): id offset of each local edge's
        lower corner; code_step (7,): vertex-id step of each offset code (index code - 1)."""
        key = str(torch.device(device))
        if key not in self._tables:
            strides = np.asarray(self.strides)
            corner_ids = CORNERS @ strides
            edge_from = np.array([[corner_ids[p, m] for m, _ in LOCAL_EDGES] for p in range(6)])
            tables = {"corner_ids": corner_ids, "edge_codes": EDGE_CODES, "edge_from": edge_from,
                      "code_step": OFFSETS @ strides}
            self._tables[key] = {k: torch.as_tensor(v, dtype=torch.int64, device=device) for k, v in tables.items()}
        return self._tables[key][name]

    # ---- vertices ------------------------------------------------------------------------------------

    def lattice(self, values: Tensor) -> Tensor:
        """(V, ...) per-vertex values viewed as the (X, Y, Z, ...) lattice."""
        return values.view(*self.shape, *values.shape[1:])

    def positions(self, ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """(n, 3) undeformed positions of the vertices `ids`."""
        X, Y, Z = self.shape
        h, (ox, oy, oz) = self.cell_size, self.origin
        return torch.stack([(ids // (Y * Z)).to(dtype) * h + ox, ((ids // Z) % Y).to(dtype) * h + oy,
                            (ids % Z).to(dtype) * h + oz], dim=-1)

    def vertices(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        """(V, 3) undeformed positions of all vertices, in id order."""
        axes = [torch.arange(n, device=device, dtype=dtype) * self.cell_size + o
                for n, o in zip(self.shape, self.origin)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)

    def boundary(self, device: torch.device | str = "cpu") -> Tensor:
        """(V,) bool: vertices on the box's faces."""
        mask = torch.ones(self.shape, dtype=torch.bool, device=device)
        mask[1:-1, 1:-1, 1:-1] = False
        return mask.reshape(-1)

    # ---- edges ---------------------------------------------------------------------------------------

    def edge_pairs(self, lattice: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
        """For each offset code c = 1..7: (c, values at the edges' lower ends, values at their upper ends),
        both views of the (X, Y, Z, ...) `lattice` with the same shape. Every grid edge appears exactly once."""
        X, Y, Z = self.shape
        for code, (ox, oy, oz) in enumerate(OFFSETS.tolist(), start=1):
            yield code, lattice[:X - ox, :Y - oy, :Z - oz], lattice[ox:, oy:, oz:]

    def crossing_edges(self, inside: Tensor) -> Tensor:
        """(7 * V,) bool over edge ids: True where the edge's ends disagree on the (X, Y, Z) bool `inside`.
        Ids that name no edge (leaving the box) are False."""
        X, Y, Z = self.shape
        out = torch.zeros(7, X, Y, Z, dtype=torch.bool, device=inside.device)
        for code, a, b in self.edge_pairs(inside):
            ox, oy, oz = OFFSETS[code - 1]
            torch.bitwise_xor(a, b, out=out[code - 1, :X - ox, :Y - oy, :Z - oz])
        return out.view(-1)

    def edge_endpoints(self, edge_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Vertex ids (lower end, upper end) of edges given by id."""
        lower = edge_ids % self.num_vertices
        return lower, lower + self.table("code_step", edge_ids.device)[edge_ids // self.num_vertices]

    # ---- tetrahedra ----------------------------------------------------------------------------------

    def tet_codes(self, inside: Tensor) -> Tensor:
        """(6 * cells,) uint8 in tetrahedron-id order: bit m set when local corner m is `inside`.
        `inside` is the (X, Y, Z) bool lattice."""
        nx, ny, nz = self.cells
        ones = inside.to(torch.uint8)
        bits = [ones << m for m in range(4)]  # bit m for a corner in path position m

        def window(m: int, corner: Sequence[int]) -> Tensor:
            return bits[m][corner[0]:corner[0] + nx, corner[1]:corner[1] + ny, corner[2]:corner[2] + nz]

        # Corners 0 (lowest) and 3 (highest) are the same for all six tetrahedra of a cube.
        ends = window(0, (0, 0, 0)) | window(3, (1, 1, 1))
        codes = torch.empty(6, nx, ny, nz, dtype=torch.uint8, device=inside.device)
        for p in range(6):
            torch.bitwise_or(ends, window(1, CORNERS[p, 1].tolist()), out=codes[p])
            codes[p] |= window(2, CORNERS[p, 2].tolist())
        return codes.view(-1)

    def tet_vertices(self, tet_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(n, 4) vertex ids of tetrahedra given by id (corners in path order) and (n,) their perm index."""
        perm, cell = tet_ids // self.num_cells, tet_ids % self.num_cells
        nx, ny, nz = self.cells
        i, j, k = cell // (ny * nz), (cell // nz) % ny, cell % nz
        base = i * self.strides[0] + j * self.strides[1] + k
        return base[:, None] + self.table("corner_ids", tet_ids.device)[perm], perm

    def tet_edges(self, tet_vertices: Tensor, perm: Tensor) -> Tensor:
        """(n, 6) edge ids of tetrahedra (local edge order LOCAL_EDGES), from `tet_vertices`' output."""
        lower = tet_vertices[:, 0:1] + self.table("edge_from", tet_vertices.device)[perm]
        return (self.table("edge_codes", tet_vertices.device)[perm] - 1) * self.num_vertices + lower

    # ---- explicit arrays (inspection, tests) ---------------------------------------------------------

    def tets(self, device: torch.device | str = "cpu", positive: bool = True) -> Tensor:
        """(T, 4) vertex ids of every tetrahedron; with `positive`, odd ones have two corners swapped so
        that every tetrahedron has positive volume."""
        ids = torch.arange(self.num_tets, device=device)
        tets, perm = self.tet_vertices(ids)
        if positive:
            odd = torch.as_tensor(PERM_SIGN < 0, device=device)[perm]
            tets[odd] = tets[odd][:, [0, 1, 3, 2]]
        return tets

    def edges(self, device: torch.device | str = "cpu") -> Tensor:
        """(E, 2) vertex ids of every edge, lower end first, in id order."""
        X, Y, Z = self.shape
        present = torch.zeros(7, X, Y, Z, dtype=torch.bool, device=device)
        for code, (ox, oy, oz) in enumerate(OFFSETS.tolist(), start=1):
            present[code - 1, :X - ox, :Y - oy, :Z - oz] = True
        ids = present.view(-1).nonzero().squeeze(1)
        return torch.stack(self.edge_endpoints(ids), dim=1)

