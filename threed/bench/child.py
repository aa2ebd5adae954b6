"""One benchmark entry in its own process: what the child runs, and how its parent starts and watches it.

`threed bench` trains every (prompt, method, seed) in a child process, `python -m threed.bench.child`, so
that the peak memory recorded in the run's final metrics record is that run's own (the child's resident
set size, or its CUDA allocator's peak), and a crash of one entry (a segfault, the out-of-memory killer)
ends only that entry. The serial bench and each Ray task (threed/bench/ray.py) call the same `run_entry`,
so both record the same statuses.

The child writes its outcome to a small JSON file; a child that dies without writing it crashed. Ctrl-C
reaches the child only through its parent, once: the child saves a checkpoint and exits 130, as
`threed run` does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

# A crashed child (or one that raised an unexpected exception) is retried this many times, then recorded
# as failed; the serial bench and Ray (max_retries) both use it.
RETRIES = 1
STOP_TIMEOUT_S = 300.0  # how long a stopping child may take to write its checkpoint before it is killed
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
MODULE = "threed.bench.child"  # what the child runs (tests/fault_injection/sitecustomize.py looks for it)

Tick = Callable[[], None]


# -- the child ------------------------------------------------------------------------------------

def _watch_parent(parent: int) -> None:
    """Stop (saving a checkpoint) when the parent dies: a retry elsewhere must not race an orphan."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGINT)
            return


def main(argv: list[str]) -> int:
    """`python -m threed.bench.child CONFIG RUN_DIR RESULT`: see `train`."""
    import faulthandler

    faulthandler.enable()  # a segfault leaves a traceback in the entry's log
    # Ctrl-C (forwarded by the parent) must raise KeyboardInterrupt, so the trainer saves a checkpoint, even
    # where the parent blocks or ignores SIGINT and this process inherited that (Ray's workers do).
    if hasattr(signal, "pthread_sigmask"):  # POSIX
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    return train(*argv)


def train(config_path: str, run_dir: str, result_path: str) -> int:
    """Train the run in `run_dir` (resuming from its last checkpoint if it has one) with the config saved in
    `config_path`; write {"status", "error", "retry"} to `result_path`; return the exit code."""

    def finish(status: str, error: str = "", retry: bool = False, code: int = 0) -> int:
        from threed.io import atomic_write_text

        atomic_write_text(result_path, json.dumps({"status": status, "error": error, "retry": retry}))
        return code

    try:
        from threed import pipeline
        from threed.config import build_config, load_yaml
        from threed.errors import UserError, first_line
        from threed.rundir import RunDir
        from threed.trainer import Diverged, Interrupted

        cfg = build_config(base=load_yaml(Path(config_path)))
        resume = RunDir(run_dir).has_checkpoint()
        print(f"bench entry: {'resuming' if resume else 'training'} {cfg.method} ({cfg.guidance.type}) "
              f"'{cfg.prompt}' seed {cfg.seed} in {run_dir}", flush=True)
        pipeline.run(cfg, Path(run_dir), resume=resume, progress=False)
    except KeyboardInterrupt:  # before training started (Interrupted covers training)
        return finish("interrupted", "interrupted", code=EXIT_INTERRUPTED)
    except Interrupted as e:
        print(f"bench entry: {e}", flush=True)
        return finish("interrupted", str(e), code=EXIT_INTERRUPTED)
    except Diverged as e:
        return finish("diverged", str(e), code=EXIT_DIVERGED)
    except UserError as e:  # e.g. an unreadable reference mesh: retrying cannot help
        return finish("failed", str(e), code=2)
    except Exception as e:  # e.g. CUDA out of memory: a result of this entry, not of the benchmark
        traceback.print_exc()
        return finish("failed", f"{type(e).__name__}: {first_line(e)}", retry=True, code=1)
    return finish("done")


# -- the parent -----------------------------------------------------------------------------------

def _stop(proc: subprocess.Popen) -> None:
    """Ask the child to stop as Ctrl-C would (it saves a checkpoint), wait, kill it if it hangs."""
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while True:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            return
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return
        except KeyboardInterrupt:  # a second Ctrl-C: it is already stopping
            continue


def spawn(argv: list[str], log_path: Path, cwd: str | None, tick: Tick | None) -> int:
    """Run `python -m threed.bench.child ARGV` with its output in `log_path`; its exit status (negative: the
    signal that killed it). The child imports the same threed as this process and has a session of its own,
    so a Ctrl-C in the terminal reaches it only through `_stop`."""
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding threed/
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", MODULE, *argv], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
        try:
            while proc.poll() is None:
                if tick is not None:
                    tick()
                try:
                    proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:
            _stop(proc)
            raise
    return proc.returncode


def crash_message(code: int, log_path: Path) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = " (e.g. the out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"crashed: killed by {name}{why}; log: {log_path}"
    return f"crashed: exited with code {code} without a result; log: {log_path}"


def run_entry(config: dict, run_dir: str | Path, log_path: str | Path, cwd: str | None = None,
              tick: Tick | None = None) -> dict:
    """Train one entry in a child process; {"status": done|failed|diverged, "error", "retry"}. `retry` is
    true when the child crashed or raised an unexpected exception (worth one more try), false for a
    diverged run or bad input. Raises KeyboardInterrupt when the entry was interrupted (its checkpoint
    kept); the child is stopped if this process is interrupted."""
    import yaml

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:  # also tells the bench that the entry started
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}\n")
    with tempfile.TemporaryDirectory(prefix="threed-entry-") as tmp:
        config_path, result_path = Path(tmp) / "config.yaml", Path(tmp) / "result.json"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        code = spawn([str(config_path), str(run_dir), str(result_path)], log_path,
                     cwd if cwd and os.path.isdir(cwd) else None, tick)
        result = None
        if result_path.exists():
            try:
                result = json.loads(result_path.read_text())
            except json.JSONDecodeError:
                result = None
    if result is None:
        return {"status": "failed", "error": crash_message(code, log_path), "retry": True}
    if result["status"] == "interrupted":
        raise KeyboardInterrupt(result["error"])
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
