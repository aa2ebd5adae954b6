"""Progress bars for steps that can take more than a few seconds (tqdm, on stderr).

`enabled`: True shows the bar, False hides it, None shows it only when stderr is a terminal (so a
caller that was not told either way stays quiet in logs and tests).
"""

from __future__ import annotations


def bar(desc: str, total: int | None = None, enabled: bool | None = None, unit: str = "it",
        unit_scale: bool = False):
    """A tqdm bar; one line that stays when the step is done, so a log shows what took how long."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, dynamic_ncols=True,
                disable=None if enabled is None else not enabled)
