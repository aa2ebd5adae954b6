"""A run folder's layout, in one place: nothing else names its files, parses checkpoint names or reads
metrics.jsonl by hand.

    RUN/config.yaml                  the run's config (threed/config.py)
    RUN/checkpoints/<stage>/step-NNNNNN.pt
                                     each stage's checkpoints, in a folder named after the stage
    RUN/metrics.jsonl                one record per logged step ({"step", "stage", losses...}), one
                                     {"stage_done": true} record as each stage but the last ends, and the
                                     closing {"done": true} record
    RUN/mesh.json                    one entry per exported mesh file
    RUN/mesh.<fmt>, mesh-<stage>.<fmt>
                                     the final mesh, and the kept mesh of each earlier stage

Steps on metrics.jsonl's axis run on across stages (a later stage's step 0 is the sum of the earlier
stages' steps); a checkpoint's own step counts from its stage's start.

Run folders of threed 0.1 (`checkpoints/step-*.pt` for the NeRF stage, `checkpoints/fine/` for the mesh stage,
`mesh-coarse.*` for the NeRF stage's mesh) are moved into this layout by `RunDir.migrate`, which resume and
export call first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from threed.errors import UserError
from threed.io import append_jsonl, atomic_write_text

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
MESH_METADATA = "mesh.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_RE = re.compile(r"^step-(\d+)\.pt$")
FINAL_MESH = "mesh"  # file stem of the run's final mesh
LEGACY_DIRS = {"nerf": "", "mesh": "fine"}  # threed 0.1's checkpoint folders of each stage, under checkpoints/


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}.pt"


def checkpoint_step(path: Path | str) -> int:
    """The step a checkpoint holds, from its file name (no need to load it); 0 for another name."""
    match = CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else 0


def checkpoints_in(folder: Path | str) -> list[Path]:
    """The step-*.pt files in `folder`, oldest first."""
    paths = [p for p in Path(folder).glob("step-*.pt") if CHECKPOINT_RE.match(p.name)]
    return sorted(paths, key=checkpoint_step)


def load_checkpoint(path: Path, device: str | None = "cpu") -> dict:
    """A checkpoint's contents; a truncated or foreign file is a one-line error naming it."""
    import torch

    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which one
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): delete it to fall back to an older "
                        f"one") from None


def stage_mesh_stem(stage: str) -> str:
    """File stem of the mesh kept from an earlier stage (`mesh-nerf`)."""
    return f"{FINAL_MESH}-{stage}"


def _read_json_lines(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file; a line cut short by a crash, or not an object, is skipped."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


class RunDir:
    """One run folder. Cheap to make: it only holds the path."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- files --------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def mesh_metadata_path(self) -> Path:
        return self.path / MESH_METADATA

    def is_run(self) -> bool:
        return self.config_path.is_file()

    # -- checkpoints --------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        """Where `stage` keeps its checkpoints: RUN/checkpoints/<stage>."""
        return self.path / CHECKPOINTS / stage

    def checkpoints(self, stage: str) -> list[Path]:
        """The stage's checkpoints, oldest first; in a 0.1 folder not yet migrated, those of its old place
        (read-only use, e.g. refining another run's NeRF without moving its files)."""
        found = checkpoints_in(self.stage_dir(stage))
        if not found and stage in LEGACY_DIRS and not self.stage_dir(stage).exists():
            found = checkpoints_in(self.path / CHECKPOINTS / LEGACY_DIRS[stage])
        return found

    def latest_checkpoint(self, stage: str) -> Path | None:
        found = self.checkpoints(stage)
        return found[-1] if found else None

    def latest_step(self, stage: str) -> int:
        """The step of the stage's newest checkpoint (0: none)."""
        latest = self.latest_checkpoint(stage)
        return checkpoint_step(latest) if latest is not None else 0

    def has_checkpoint(self) -> bool:
        """Whether any stage has saved a checkpoint (something to resume; a 0.1 folder's count too)."""
        folder = self.path / CHECKPOINTS
        return folder.is_dir() and any(checkpoints_in(d) for d in [folder, *folder.iterdir()] if d.is_dir())

    # -- metrics ------------------------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        append_jsonl(self.metrics_path, record)

    def metrics(self) -> tuple[list[dict], dict | None]:
        """(logged step records, the closing "done" record or None); stage-end records are neither."""
        records: list[dict] = []
        done = None
        for rec in _read_json_lines(self.metrics_path):
            if rec.get("done"):
                done = rec
            elif isinstance(rec.get("step"), (int, float)) and not rec.get("stage_done"):
                records.append(rec)
        return records, done

    def stage_records(self) -> dict[str, dict]:
        """The newest "stage_done" record of each stage that ended before the run's last stage."""
        return {rec["stage"]: rec for rec in _read_json_lines(self.metrics_path)
                if rec.get("stage_done") and isinstance(rec.get("stage"), str)}

    def closing_record(self) -> dict | None:
        """The run's closing record, or None while it is unfinished."""
        return self.metrics()[1]

    def last_logged_step(self) -> int:
        """The step of metrics.jsonl's last record (0 if none), read from the file's tail: the progress of
        a run that another process is training."""
        try:
            with open(self.metrics_path, "rb") as f:
                size = f.seek(0, 2)
                f.seek(max(0, size - 4096))
                tail = f.read().decode("utf-8", errors="ignore")
        except OSError:
            return 0
        for line in reversed(tail.splitlines()):
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue
        return 0

    # -- meshes -------------------------------------------------------------------------------
    def mesh_file(self, stem: str) -> Path | None:
        """The run's mesh `<stem>` (FINAL_MESH or a stage's `stage_mesh_stem`): its OBJ, else PLY, else GLB;
        None if none was written."""
        return next((p for p in (self.path / f"{stem}.{ext}" for ext in ("obj", "ply", "glb")) if p.exists()), None)

    def mesh_entries(self) -> dict[str, dict]:
        """mesh.json's entries, keyed by file name ({} when absent or unreadable)."""
        try:
            meshes = json.loads(self.mesh_metadata_path.read_text()).get("meshes", {})
        except (OSError, ValueError, AttributeError):
            return {}
        return meshes if isinstance(meshes, dict) else {}

    def write_mesh_entries(self, entries: dict[str, dict]) -> Path:
        """Update mesh.json: one entry per mesh file, keyed by its file name.

        Why one entry per file: exports can write different meshes (another resolution, level or format) to
        the same run directory, so one record for "the mesh" could describe another mesh than mesh.glb. An
        export replaces the entries of exactly the files it wrote; entries of files that no longer exist are
        dropped; a mesh.json of the old single-record layout is discarded (it cannot say which file it meant).
        """
        meshes = {k: v for k, v in self.mesh_entries().items() if (self.path / k).is_file()}
        meshes.update(entries)
        atomic_write_text(self.mesh_metadata_path, json.dumps({"meshes": dict(sorted(meshes.items()))}, indent=1))
        return self.mesh_metadata_path

    # -- older layouts ------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        """Move a threed 0.1 run folder into this layout; returns what was moved (nothing for a current one).

        0.1 kept the NeRF stage's checkpoints in checkpoints/ itself, the mesh stage's in checkpoints/fine/,
        and the NeRF stage's mesh of a two-stage run as mesh-coarse.<fmt>."""
        moved: list[str] = []
        root = self.path / CHECKPOINTS
        old_nerf = checkpoints_in(root)
        if old_nerf:
            self.stage_dir("nerf").mkdir(parents=True, exist_ok=True)
            for p in old_nerf:
                p.replace(self.stage_dir("nerf") / p.name)
            moved.append(f"{CHECKPOINTS}/step-*.pt -> {CHECKPOINTS}/nerf/")
        old_mesh = root / "fine"
        if old_mesh.is_dir() and not self.stage_dir("mesh").exists():
            old_mesh.replace(self.stage_dir("mesh"))
            moved.append(f"{CHECKPOINTS}/fine/ -> {CHECKPOINTS}/mesh/")
        kept = stage_mesh_stem("nerf") + "."
        files = sorted(self.path.glob("mesh-coarse.*"))
        for old in files:
            new = self.path / old.name.replace("mesh-coarse.", kept, 1)
            if old.suffix in (".obj", ".mtl"):  # they name each other (mtllib, map_*): follow the rename
                lines = old.read_text(errors="replace").splitlines(keepends=True)
                atomic_write_text(new, "".join(line.replace("mesh-coarse.", kept) if line.startswith(("mtllib ", "map_"))
                                               else line for line in lines))
                old.unlink()
            else:
                old.replace(new)
        entries = self.mesh_entries()
        if any(k.startswith("mesh-coarse.") for k in entries):
            entries = {k.replace("mesh-coarse.", kept, 1): v for k, v in entries.items()}
            atomic_write_text(self.mesh_metadata_path, json.dumps({"meshes": dict(sorted(entries.items()))}, indent=1))
        elif not files:
            return moved
        moved.append("mesh-coarse.* -> mesh-nerf.*")
        return moved
