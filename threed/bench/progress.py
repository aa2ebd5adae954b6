"""The bench's progress bar: one bar for the whole bench, counted in optimisation steps of every stage of
every entry (so its ETA weighs long runs and two-stage methods right), with the entries done / running /
failed beside it. Running entries' steps come from their metrics.jsonl, whose step axis runs on across
stages, so a mesh stage's steps count after its NeRF stage's."""

from __future__ import annotations

import time

from tqdm import tqdm

from threed.bench.plan import Entry
from threed.rundir import RunDir


def say(line: str, quiet: bool) -> None:
    """A line above the bars (or plain, with --quiet, where no bar is drawn)."""
    if quiet:
        print(line, flush=True)
    else:
        tqdm.write(line)


class Progress:
    """The bar, and what it knows of each entry: the steps it reached and whether it is running."""

    POLL_S = 1.0

    def __init__(self, plan: list[Entry], statuses: dict[str, dict], quiet: bool):
        self.plan, self.quiet = plan, quiet
        self.reached: dict[str, int] = {}
        for e in plan:  # an unfinished entry resumes near the last step it logged
            done = e.name in statuses
            self.reached[e.name] = e.total_steps if done else min(RunDir(e.run_dir).last_logged_step(), e.total_steps)
        self.statuses = statuses
        self.running: dict[str, Entry] = {}
        self.started = time.time()
        self.last_poll = 0.0
        self.bar = tqdm(total=self.total, initial=sum(self.reached.values()), unit="step", desc="bench",
                        disable=quiet, dynamic_ncols=True, smoothing=0.05)
        self._postfix()

    @property
    def total(self) -> int:
        """The bench's budget: every stage's steps of every entry."""
        return sum(e.total_steps for e in self.plan)

    def _postfix(self) -> None:
        done = sum(s["status"] == "done" for s in self.statuses.values())
        failed = len(self.statuses) - done
        self.bar.set_postfix_str(f"entries: {done} done, {len(self.running)} running, {failed} failed, "
                                 f"{len(self.plan)} in all", refresh=True)

    def write(self, line: str) -> None:
        say(line, self.quiet)

    def start(self, entry: Entry) -> None:
        self.running[entry.name] = entry
        self._postfix()

    def finish(self, entry: Entry, status: dict) -> None:
        self.running.pop(entry.name, None)
        self.statuses[entry.name] = status
        self.reached[entry.name] = entry.total_steps
        self._update()

    def poll(self, candidates: list[Entry] | None = None) -> None:
        """Read the steps of running entries; `candidates` (Ray: every entry not finished) count as running
        once their log file was written by this bench."""
        now = time.monotonic()
        if now - self.last_poll < self.POLL_S:
            return
        self.last_poll = now
        if candidates is not None:
            for e in candidates:
                try:
                    if e.name not in self.running and e.log_path.stat().st_mtime >= self.started:
                        self.running[e.name] = e
                except OSError:
                    pass
        for e in self.running.values():
            logged = RunDir(e.run_dir).last_logged_step()
            self.reached[e.name] = max(self.reached[e.name], min(logged, e.total_steps))
        self._update()

    def _update(self) -> None:
        self.bar.n = sum(self.reached.values())
        self._postfix()

    def close(self) -> None:
        self.bar.close()
