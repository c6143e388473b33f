"""The one progress reporter: rate, time left, when a report is due, and durations."""
import math

import pytest

from ncsn_tf.progress import Progress, duration


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_duration():
    assert duration(0) == "0:00:00" and duration(3725.4) == "1:02:05"
    assert duration(None) == duration(float("nan")) == duration(math.inf) == "?"


def test_rate_eta_and_reports_every_so_often():
    clock = Clock()
    progress = Progress(total=100, every_s=10, clock=clock)
    assert math.isnan(progress.eta) and not progress.due()
    clock.now += 5
    progress.advance(25)
    assert progress.rate == pytest.approx(5.0) and progress.eta == pytest.approx(15.0)
    assert not progress.due() and progress.due(final=True)
    clock.now += 10
    assert progress.due() and not progress.due()  # the next one is 10 s later
    progress.advance(75)
    assert progress.finished and progress.due() and progress.eta == 0.0
    open_ended = Progress(clock=clock)
    open_ended.advance(3)
    assert math.isnan(open_ended.eta) and not open_ended.finished
