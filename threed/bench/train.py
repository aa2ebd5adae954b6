"""Training the bench's entries: which are done already (skipped) and which to train, the task a child
process gets, one line per entry as it starts and ends, and the serial runner (each entry in a child
process, one after another; `--ray` runs the same tasks on a cluster, threed/bench/ray.py)."""

from __future__ import annotations

import os
from typing import Callable

from threed.bench.plan import Entry
from threed.bench.progress import Progress
from threed.config import build_config, flatten, load_yaml, to_dict
from threed.errors import UserError
from threed.rundir import RunDir


def check_same_run(entry: Entry) -> None:
    """A run directory from an earlier bench must have been made with the same config."""
    saved_path = RunDir(entry.run_dir).config_path
    if not saved_path.exists():
        return
    saved, wanted = flatten(to_dict(build_config(base=load_yaml(saved_path)))), flatten(to_dict(entry.cfg))
    ignored = {"device"}  # where it runs does not change what it computes
    diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k) and k not in ignored)
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in diff[:3])
        raise UserError(f"{entry.run_dir} was made with other settings ({shown}); re-run with the same options "
                        f"or pass another --out")


def tag(entry: Entry, plan: list[Entry]) -> str:
    return f"bench: [{plan.index(entry) + 1}/{len(plan)}] {entry.label} '{entry.subject}' seed {entry.seed}"


def status_line(entry: Entry, plan: list[Entry], status: dict) -> str:
    if status["status"] == "done":
        return f"{tag(entry, plan)}: done"
    return f"{tag(entry, plan)}: {status['status']}: {status['error']}"


def pending(plan: list[Entry], progress_write: Callable[[str], None]) -> tuple[dict[str, dict], list[Entry]]:
    """Entries already done (skipped) and those to train; a run directory made with other settings is an
    error before anything starts."""
    for entry in plan:
        check_same_run(entry)
    statuses: dict[str, dict] = {}
    todo = []
    for entry in plan:
        if RunDir(entry.run_dir).closing_record() is not None:
            statuses[entry.name] = {"status": "done", "error": ""}
            progress_write(f"{tag(entry, plan)}: done already, skipped")
        else:
            todo.append(entry)
    return statuses, todo


def entry_task(entry: Entry) -> dict:
    """What a child needs to train an entry (plain data: it travels to Ray workers)."""
    return {"config": to_dict(entry.cfg), "run_dir": str(entry.run_dir.absolute()),
            "log_path": str(entry.log_path.absolute()), "cwd": os.getcwd()}


def train_serial(plan: list[Entry], todo: list[Entry], progress: Progress) -> None:
    """Each entry in a child process, one after another; a crash is retried once (as Ray would)."""
    # Imported here, not above: threed/bench/__init__.py imports this module, and a child started as
    # `python -m threed.bench.child` must not find its own module imported by its package first (runpy warns).
    from threed.bench.child import RETRIES, run_entry

    for entry in todo:
        resume = RunDir(entry.run_dir).has_checkpoint()
        progress.write(f"{tag(entry, plan)}: {'resuming' if resume else 'training'} in {entry.run_dir}")
        progress.start(entry)
        task = entry_task(entry)
        for attempt in range(1 + RETRIES):
            status = run_entry(task["config"], task["run_dir"], task["log_path"], task["cwd"], tick=progress.poll)
            if not status.pop("retry", False) or attempt == RETRIES:
                break
            progress.write(f"{tag(entry, plan)}: {status['error']}; retrying")
        progress.finish(entry, status)
        progress.write(status_line(entry, plan, status))
