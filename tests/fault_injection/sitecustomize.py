"""Fault injection for the bench's crash tests: Python imports this at start-up (sitecustomize) in processes
whose PYTHONPATH holds this folder; it acts only in a bench entry's child (`python -m threed.bench.child`)
and only when THREED_TEST_FAULTS names an existing JSON file:

    {"prompt": P, "step": S, "how": "exit" | "kill" | "interrupt", "once": MARKER or null}

When about to train step S+1, the entry training prompt P dies (exit: os._exit(1); kill: SIGKILL, as the
out-of-memory killer would send), or sends SIGINT to its parent, as a Ctrl-C in the terminal would, and
then waits (up to a minute) inside that step for the parent to stop it, as a long step would: a tiny entry
would otherwise finish its last steps before the parent reacts, and the test would race it. With "once",
only while the file MARKER does not exist (it is created first), so a retry or a re-run succeeds.
"""

import os
import sys

if "threed.bench.child" in getattr(sys, "orig_argv", []) and os.path.isfile(os.environ.get("THREED_TEST_FAULTS", "")):
    import json
    import signal
    import time

    with open(os.environ["THREED_TEST_FAULTS"]) as f:
        _fault = json.load(f)

    from threed import trainer as _trainer

    _train_step = _trainer.Trainer.train_step

    def _faulty_train_step(self):
        if self.cfg.prompt == _fault["prompt"] and self.step == _fault["step"]:
            marker = _fault.get("once")
            if not marker or not os.path.exists(marker):
                if marker:
                    open(marker, "w").close()
                if _fault["how"] == "interrupt":
                    os.kill(os.getppid(), signal.SIGINT)
                    time.sleep(60)  # the parent's SIGINT raises KeyboardInterrupt here
                    return _train_step(self)
                if _fault["how"] == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                os._exit(1)
        return _train_step(self)

    _trainer.Trainer.train_step = _faulty_train_step
