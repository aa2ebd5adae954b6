"""`threed bench --ray`: every (prompt, method, seed) entry is a Ray task; Ray's scheduler places them.

Each task asks for one GPU where the cluster has GPUs, else `--ray-cpus` CPUs, and runs the same child
process as the serial bench (threed/bench/child.py), so both write the same run directories and record
the same statuses. An entry whose child crashes (or raises an unexpected exception), or whose worker dies,
is retried once by Ray (`max_retries`, `retry_exceptions`), then recorded as failed with its error.
Ctrl-C cancels what is queued and stops what runs (the children save their checkpoints).

The bench folder (--out) must be on a filesystem every node mounts at the same path, and every node needs
threed and the model weights; a task that cannot see the folder says so. Ray is imported only here.

The runner knows nothing of the bench's entries but what it is given: each entry's task (plain data for the
child) and the line to print when it ends come from the caller (threed/bench/__init__.py).
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TypeVar

from threed.errors import UserError, first_line

TOKEN_FILE = ".bench-token"  # written by the driver, read by each task: is --out shared with this node?

E = TypeVar("E")  # one entry of the bench, opaque here


class Watcher(Protocol):
    """What the runner tells as tasks run and end (threed.bench.progress.Progress)."""

    def write(self, line: str) -> None: ...

    def finish(self, entry: Any, status: dict) -> None: ...

    def poll(self, candidates: list | None = None) -> None: ...


class EntryCrashed(Exception):
    """A task's child crashed or raised an unexpected exception: Ray retries the task."""

    def __init__(self, status: dict):
        super().__init__(status)
        self.status = status

    def __str__(self) -> str:
        return str(self.status.get("error", ""))


def run_task(task: dict, token_path: str, token: str) -> dict:
    """The body of a Ray task (on a worker): one entry in a child process, as the serial bench runs it."""
    from threed.bench.child import run_entry

    try:
        seen = Path(token_path).read_text()
    except OSError:
        seen = ""
    if seen != token:
        folder = Path(token_path).parent
        return {"status": "failed", "error": f"{folder} is not visible on {socket.gethostname()}: put --out on a "
                                             f"filesystem every Ray node mounts at the same path"}
    status = run_entry(task["config"], task["run_dir"], task["log_path"], task["cwd"])
    if status.pop("retry", False):
        raise EntryCrashed(status)
    return status


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray, which is not installed: pip install 'threed[ray]'") from None
    return ray


class Cluster:
    """A connection to a Ray cluster, and the bench's entries run on it."""

    def __init__(self, address: str, started: bool):
        self.ray = _import_ray()
        self.address, self.started = address, started
        resources = self.ray.cluster_resources()
        self.cpus, self.gpus_total = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        self.gpus = self.gpus_total > 0
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        self.nodes = len(nodes)
        self.max_node_cpus = max((float(n["Resources"].get("CPU", 0)) for n in nodes), default=0.0)

    def describe(self) -> dict[str, Any]:
        return {"address": self.address, "nodes": self.nodes, "cpus": self.cpus, "gpus": self.gpus_total}

    def check(self, plan: Sequence, device: str | None, cpus: float) -> None:
        """Settings under which no task could ever start are errors, not a hang."""
        if cpus <= 0:
            raise UserError(f"--ray-cpus {cpus:g} must be positive")
        if cpus > self.max_node_cpus:
            raise UserError(f"--ray-cpus {cpus:g} is more than any node of the Ray cluster has "
                            f"({self.max_node_cpus:g}): pass a smaller --ray-cpus")
        if (device or "").startswith("cuda") and not self.gpus:
            raise UserError("--device cuda, but the Ray cluster has no GPU: drop --device or add GPU nodes")

    def train(self, todo: Sequence[E], progress: Watcher, cpus: float, out: Path, task: Callable[[E], dict],
              line: Callable[[E, dict], str]) -> None:
        """Run `todo` as Ray tasks, `task(entry)` being what an entry's child gets; statuses go to `progress`
        as tasks finish, with the line `line(entry, status)`. Ctrl-C cancels the queued tasks, lets the
        running ones save their checkpoints, and raises KeyboardInterrupt."""
        from threed.bench.child import RETRIES
        from threed.io import atomic_write_text

        ray = self.ray
        token = secrets.token_hex(8)
        atomic_write_text(out / TOKEN_FILE, token)
        resources = {"num_cpus": cpus, "num_gpus": 1 if self.gpus else 0}
        remote = ray.remote(run_task).options(max_retries=RETRIES, retry_exceptions=[EntryCrashed], **resources)
        slots = int(self.gpus_total if self.gpus else self.cpus // cpus)
        progress.write(f"bench: Ray cluster at {self.address}: {self.nodes} node(s), {self.cpus:g} CPUs, "
                       f"{self.gpus_total:g} GPUs; each entry takes {'1 GPU' if self.gpus else f'{cpus:g} CPU'}, "
                       f"so up to {slots} at a time; {len(todo)} entries queued")
        token_path = str((out / TOKEN_FILE).absolute())
        refs = {remote.remote(task(e), token_path, token): e for e in todo}
        waiting = list(refs)
        try:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1, timeout=1.0)
                for ref in ready:
                    entry, status = refs[ref], self.result(ref)
                    progress.finish(entry, status)
                    progress.write(line(entry, status))
                progress.poll([refs[r] for r in waiting])
        except KeyboardInterrupt:
            progress.write(f"bench: interrupted: cancelling {len(waiting)} entries; running ones save a checkpoint")
            for ref in waiting:
                ray.cancel(ref)
            deadline = time.monotonic() + 300.0
            while waiting and time.monotonic() < deadline:
                try:
                    ready, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=1.0)
                except KeyboardInterrupt:
                    continue
                for ref in ready:
                    status = self.result(ref)
                    if status["status"] == "done":
                        progress.finish(refs[ref], status)
            raise

    def result(self, ref) -> dict:
        """A task's status; a task that failed after its retry becomes a failed entry with the error."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return {"status": "cancelled", "error": "cancelled"}
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, EntryCrashed):
                return dict(cause.status)
            if isinstance(cause, KeyboardInterrupt):
                return {"status": "cancelled", "error": "interrupted"}
            return {"status": "failed", "error": f"{type(cause or e).__name__}: {first_line(cause or e)}"}
        except ray.exceptions.RayError as e:  # the worker or its node died, twice
            return {"status": "failed", "error": f"the Ray worker died ({type(e).__name__}: {first_line(e)})"}

    def close(self) -> None:
        """Disconnect, once, if this bench connected: a local Ray it started stops, a cluster runs on."""
        if self.started:
            self.started = False
            self.ray.shutdown()


def connect(address: str) -> Cluster:
    """auto: the cluster RAY_ADDRESS names or `ray start` started on this machine, else a new local one;
    local: a new local one; anything else: that cluster's address (host:port or ray://host:port). A Ray
    already initialised in this process (the Python API) is used as it is."""
    ray = _import_ray()
    if ray.is_initialized():
        return Cluster("this process's Ray", started=False)
    kwargs: dict[str, Any] = {"address": {"auto": None, "local": "local"}.get(address, address)}
    if address == "local":
        kwargs["include_dashboard"] = False
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot connect to the Ray cluster at {address} ({first_line(e)}): start one with "
                        f"`ray start --head`, or pass --ray local") from None
    return Cluster(os.environ.get("RAY_ADDRESS") or address, started=True)
