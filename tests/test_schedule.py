"""Schedules: a constant or [start_step, start, end, end_step(, cosine)], evaluated at its ends and midpoint."""

import math

import pytest

from threed.errors import UserError
from threed.schedule import Schedule


def test_linear_schedule_ends_and_midpoint():
    s = Schedule.parse([100, 0.98, 0.5, 300], "guidance.t_max")
    assert s(0) == 0.98 and s(100) == 0.98
    assert s(200) == pytest.approx(0.74)
    assert s(300) == 0.5 and s(10**6) == 0.5


def test_cosine_schedule_eases_in_and_out():
    s = Schedule.parse([0, 1.0, 0.0, 100, "cosine"], "optim.lr")
    assert s(0) == 1.0 and s(100) == 0.0
    assert s(50) == pytest.approx(0.5)
    assert s(25) == pytest.approx(0.5 + 0.5 * math.cos(math.pi / 4))  # slower than linear (0.75) near the start


def test_exponential_schedule_is_log_linear():
    """3DGS's position learning rate (get_expon_lr_func without its delay): exp of the linear blend of logs."""
    s = Schedule.parse([0, 0.01, 0.0002, 300, "exponential"], "gaussians.lr_position")
    assert s(0) == pytest.approx(0.01) and s(300) == pytest.approx(0.0002) and s(10**6) == pytest.approx(0.0002)
    assert s(150) == pytest.approx(math.sqrt(0.01 * 0.0002))
    assert s(60) == pytest.approx(math.exp(math.log(0.01) * 0.8 + math.log(0.0002) * 0.2))
    assert s.to_plain() == [0, 0.01, 0.0002, 300, "exponential"]
    with pytest.raises(UserError, match="> 0"):
        Schedule.parse([0, 0.01, 0.0, 300, "exponential"], "k")


def test_step_change_and_constant():
    s = Schedule.parse([5000, 0.98, 0.5, 5001], "guidance.t_max")
    assert s(5000) == 0.98 and s(5001) == 0.5
    c = Schedule.parse(0.25, "loss.opacity")
    assert c.is_constant and c(0) == c(10**9) == 0.25 and c.to_plain() == 0.25
    assert Schedule.parse("1e-3", "optim.lr")(7) == 0.001  # YAML 1.1 reads 1e-3 as a string


def test_round_trip_through_the_preset_form():
    for plain in ([0, 1.0, 2.0, 10], [3, 0.5, 0.1, 7, "cosine"], 0.5):
        assert Schedule.parse(plain, "k").to_plain() == plain


@pytest.mark.parametrize("value, words", [
    ([0, 1.0, 2.0], ["k", "start_step"]),
    ([10, 1.0, 2.0, 5], ["end_step must be after start_step"]),
    ([0, 1.0, 2.0, 5, "exp"], ["cosine"]),
    ([0.5, 1.0, 2.0, 5], ["whole numbers"]),
    ("fast", ["k", "number"]),
    (True, ["k"]),
])
def test_bad_schedules_are_user_errors(value, words):
    with pytest.raises(UserError) as e:
        Schedule.parse(value, "k")
    for w in words:
        assert w in str(e.value)


def test_exponential_complement_is_dream_fields_opacity_target():
    """Dream Fields anneals its target opacity geometrically, 0.5 -> 0.1 over 500 steps (schedule.py,
    anneal_exponentially), times 1.2 at its training cameras (lib.py, acct_scaling), and the loss clips the mean
    transmittance at 1 - that: threed's transmittance target [0, 0.4, 0.88, 500, exponential_complement]. By hand:
    step 250, 1 - 1.2 * sqrt(0.5 * 0.1) = 0.73167; step 100, 1 - 1.2 * 0.5^0.8 * 0.1^0.2 = 0.56513."""
    s = Schedule.parse([0, 0.4, 0.88, 500, "exponential_complement"], "loss.transmittance_target")
    assert s(0) == pytest.approx(0.4) and s(500) == pytest.approx(0.88) and s(10**6) == pytest.approx(0.88)
    assert s(250) == pytest.approx(0.73167, abs=1e-5)
    assert s(100) == pytest.approx(0.56513, abs=1e-5)
    for step in (0, 37, 250, 499, 500):
        dream_fields = 1 - 1.2 * math.exp(math.log(0.5) * (1 - step / 500) + math.log(0.1) * step / 500)
        assert s(step) == pytest.approx(dream_fields, abs=1e-12)
    assert s(250) > Schedule.parse([0, 0.4, 0.88, 500], "k")(250) + 0.09  # linear: 0.64
    assert s.to_plain() == [0, 0.4, 0.88, 500, "exponential_complement"]
    with pytest.raises(UserError, match="< 1"):
        Schedule.parse([0, 0.4, 1.0, 500, "exponential_complement"], "k")
