"""The simulated service clock: accelerated, persistent, and still while the planner solves."""
import time

import pytest

from ditplan.planner.service.clock import SimClock, WallClock


def test_sim_clock_runs_at_its_speed_and_stands_still_while_held():
    clock = SimClock(start=100.0, speed=50.0)
    t0 = clock.now()
    time.sleep(0.02)
    assert clock.now() - t0 == pytest.approx(1.0, abs=0.6)  # 20 ms of wall time at 50x
    with clock.hold():
        held = clock.now()
        time.sleep(0.05)  # 2.5 simulated seconds if the clock ran
        assert clock.now() == held
    after = clock.now()
    assert held <= after < held + 0.5  # resumes where it stopped, no jump
    assert clock.wall_delay(after + 5.0) == pytest.approx(0.1, abs=0.02)


def test_wall_clock_never_holds():
    clock = WallClock()
    with clock.hold():
        t = clock.now()
        time.sleep(0.01)
        assert clock.now() > t
