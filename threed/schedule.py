"""One schedule type for any scalar setting: t-range ends, loss weights, learning rates.

In a preset a schedule is written as a plain number (constant) or as threestudio's list

    [start_step, start_value, end_value, end_step]              linear from start to end
    [start_step, start_value, end_value, end_step, cosine]      half-cosine ease from start to end
    [start_step, start_value, end_value, end_step, exponential] log-linear (3DGS's position learning rate)
    [start_step, start_value, end_value, end_step, exponential_complement]
                                                  1 - value log-linear (Dream Fields' opacity target, as a
                                                  transmittance target: 1 - opacity)
    [s0, v0, v1, s1, v2, s2, ...]                                piecewise linear through (s0, v0), (s1, v1), ...

The value is `start_value` up to `start_step`, `end_value` from `end_step` on, and in between moves
linearly (or along a half cosine, or geometrically: the value itself, or its complement 1 - value). The
longer form is threestudio's too (its `C()` reads six or more numbers so; Stable Zero123's normal-smoothness
weights [100, 7.0, 5.0, 150, 10.0, 200]: 7 until step 100, down to 5 at 150, up to 10 at 200): the first
segment is the 4-number form, each further (value, step) pair goes on from the previous end.
`end_step == start_step + 1` makes a step change, e.g. ProlificDreamer's t_max dropping from 0.98 to 0.5 at
step 5000: [5000, 0.98, 0.5, 5001].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from threed.errors import UserError

Kind = Literal["linear", "cosine", "exponential", "exponential_complement"]
KINDS = ("linear", "cosine", "exponential", "exponential_complement")


@dataclass(frozen=True)
class Schedule:
    start_step: int
    start: float
    end: float
    end_step: int
    kind: Kind = "linear"
    more: tuple[tuple[float, int], ...] = ()  # (value, step) points after (end, end_step), linear between

    @classmethod
    def constant(cls, value: float) -> Schedule:
        return cls(0, float(value), float(value), 0)

    @property
    def is_constant(self) -> bool:
        return self.start == self.end and all(v == self.start for v, _ in self.more)

    def __call__(self, step: int) -> float:
        if step <= self.start_step or self.is_constant:
            return self.start
        if step >= self.end_step and self.more:
            value, at = self.end, self.end_step
            for end, end_step in self.more:
                if step < end_step:
                    return value + (step - at) / (end_step - at) * (end - value)
                value, at = end, end_step
            return value
        if step >= self.end_step:
            return self.end
        frac = (step - self.start_step) / (self.end_step - self.start_step)
        if self.kind == "cosine":
            frac = 0.5 - 0.5 * math.cos(math.pi * frac)
        if self.kind == "exponential":
            return math.exp(math.log(self.start) * (1 - frac) + math.log(self.end) * frac)
        if self.kind == "exponential_complement":  # 1 - value geometric: Dream Fields' anneal_exponentially
            return 1.0 - math.exp(math.log(1.0 - self.start) * (1 - frac) + math.log(1.0 - self.end) * frac)
        return self.start + frac * (self.end - self.start)

    def bounds(self) -> tuple[float, float]:
        """(smallest, largest) value the schedule takes."""
        values = [self.start, self.end, *(v for v, _ in self.more)]
        return min(values), max(values)

    def to_plain(self) -> float | list:
        """The preset form: a number when constant, else the list."""
        if self.is_constant:
            return self.start
        out: list = [self.start_step, self.start, self.end, self.end_step]
        out += [x for value, step in self.more for x in (value, step)]
        return out + [self.kind] if self.kind != "linear" else out

    @classmethod
    def parse(cls, value: Any, key: str) -> Schedule:
        """A number, a Schedule, or the list form; a UserError naming `key` otherwise."""
        if isinstance(value, Schedule):
            return value
        hint = (f"bad value {value!r} for '{key}': expected a number or "
                f"[start_step, start, end, end_step(, cosine, exponential or exponential_complement)]")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise UserError(hint) from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls.constant(float(value))
        if isinstance(value, (list, tuple)) and len(value) >= 6 and len(value) % 2 == 0:
            return cls._parse_piecewise(list(value), key)
        if not isinstance(value, (list, tuple)) or len(value) not in (4, 5):
            raise UserError(hint)
        kind = value[4] if len(value) == 5 else "linear"
        numbers = value[:4]
        if kind not in KINDS or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers):
            raise UserError(hint)
        start_step, start, end, end_step = numbers
        if kind == "exponential" and min(start, end) <= 0:
            raise UserError(f"bad value {list(value)!r} for '{key}': an exponential schedule's values must be > 0")
        if kind == "exponential_complement" and max(start, end) >= 1:
            raise UserError(f"bad value {list(value)!r} for '{key}': an exponential_complement schedule's values "
                            f"must be < 1")
        if int(start_step) != start_step or int(end_step) != end_step or start_step < 0:
            raise UserError(f"bad value {list(value)!r} for '{key}': the steps must be whole numbers >= 0")
        if end_step <= start_step and start != end:
            raise UserError(f"bad value {list(value)!r} for '{key}': end_step must be after start_step")
        return cls(int(start_step), float(start), float(end), int(end_step), kind)

    @classmethod
    def _parse_piecewise(cls, value: list, key: str) -> Schedule:
        """[s0, v0, v1, s1, v2, s2, ...]: linear through (s0, v0), (s1, v1), (s2, v2), ... (threestudio's C())."""
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise UserError(f"bad value {value!r} for '{key}': expected numbers [s0, v0, v1, s1, v2, s2, ...]")
        first = cls.parse(value[:4], key)
        pairs = [(float(value[i]), value[i + 1]) for i in range(4, len(value), 2)]
        steps = [first.end_step] + [s for _, s in pairs]
        if any(int(s) != s for s in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
            raise UserError(f"bad value {value!r} for '{key}': the steps s1, s2, ... must be whole numbers, each after "
                            f"the one before")
        return cls(first.start_step, first.start, first.end, first.end_step, "linear",
                   tuple((v, int(s)) for v, s in pairs))


def _progressive(render: Any, step: int) -> tuple[int, int, int] | None:
    """The `render.progressive` entry in force at `step` (the last whose step has come), or None."""
    current = None
    for entry in render.progressive:
        if step >= entry[0]:
            current = entry
    return current


def render_size(render: Any, step: int) -> tuple[int, int]:
    """(width, height) of the training renders at `step`, from a RenderConfig: threestudio's progressive
    batches where `render.progressive` lists them ((from step, square size, batch), e.g. Stable Zero123's 64, 128
    and 256 from steps 0, 200 and 300), else `hires_width` x `hires_height` from `hires_step` on (ProlificDreamer),
    else `width` x `height`."""
    entry = _progressive(render, step)
    if entry is not None:
        return entry[1], entry[1]
    if 0 <= render.hires_step <= step:
        return render.hires_width, render.hires_height
    return render.width, render.height


def render_batch(render: Any, step: int) -> int:
    """The training batch at `step`, from a RenderConfig: `render.progressive`'s where it has an entry in force,
    else `render.batch_size`."""
    entry = _progressive(render, step)
    return entry[2] if entry is not None else render.batch_size


def progressive_checks(render: Any) -> list[tuple[bool, str, str]]:
    """(ok, key, why) for threed.config.validate: `render.progressive`'s steps increasing from 0, sizes and batches
    positive."""
    steps = [e[0] for e in render.progressive]
    return [(all(e[1] > 0 and e[2] >= 1 for e in render.progressive), "render.progressive",
             "needs a size > 0 and a batch >= 1 in each (from step, size, batch)"),
            (not steps or (steps[0] == 0 and steps == sorted(set(steps))), "render.progressive",
             "must start at step 0 with increasing steps")]
