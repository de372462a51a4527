"""Stop requests and the non-finite watch, on their own."""

import signal

import pytest
import torch

from ddpm.training.stopping import NonFiniteWatch, StopRequests, TrainingStopped, ignore_stop_signals


def test_a_signal_becomes_a_request_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequests() as stop:
        assert stop.signum is None and stop.name == ""
        signal.raise_signal(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_signal_is_delivered_to_the_previous_handler():
    received = []
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # not one of ours; check the mechanism
    try:
        original = signal.signal(signal.SIGINT, lambda s, f: received.append(s))
        with StopRequests() as stop:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        assert stop.signum == signal.SIGINT and received == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, original)
        signal.signal(signal.SIGUSR1, previous)


def test_a_notice_never_stops_at_once_and_goes_on_to_the_previous_handler_after_the_stop():
    received = []

    def submitits(signum, frame):  # say
        received.append((signum, frame))

    original = signal.signal(signal.SIGUSR2, submitits)
    try:
        with StopRequests() as stop:
            signal.raise_signal(signal.SIGUSR2)
            signal.raise_signal(signal.SIGUSR2)
            signal.raise_signal(signal.SIGTERM)  # the first SIGTERM after a notice is a request too
            assert received == []  # held until the checkpoint is written
        assert stop.signum == stop.notice == signal.SIGUSR2 and stop.name == "SIGUSR2"
        assert signal.getsignal(signal.SIGUSR2) is submitits  # restored
        stop.pass_notice_on()
        assert received == [(signal.SIGUSR2, None)]
    finally:
        signal.signal(signal.SIGUSR2, original)


def test_a_notice_without_a_previous_handler_is_a_plain_stop_request():
    original = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        with StopRequests() as stop:
            signal.raise_signal(signal.SIGUSR2)
        assert stop.signum == signal.SIGUSR2 and stop.notice is None and stop.pass_notice_on is None
    finally:
        signal.signal(signal.SIGUSR2, original)


def test_a_second_sigterm_after_a_notice_stops_at_once():
    received = []
    original = signal.signal(signal.SIGTERM, lambda s, f: received.append(s))
    try:
        with StopRequests() as stop:
            signal.raise_signal(signal.SIGUSR2)
            signal.raise_signal(signal.SIGTERM)
            assert received == []
            signal.raise_signal(signal.SIGTERM)
            assert received == [signal.SIGTERM]  # delivered to the previous handler at once
        assert stop.signum == signal.SIGUSR2
    finally:
        signal.signal(signal.SIGTERM, original)


def test_loader_workers_ignore_the_stop_signals():
    saved = {s: signal.getsignal(s) for s in StopRequests.SIGNALS}
    try:
        ignore_stop_signals()
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in StopRequests.SIGNALS)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def advice() -> str:
    return "what to do"


def test_stop_mode_remembers_the_first_bad_step_until_checked():
    watch = NonFiniteWatch(skip=False, max_in_a_row=10, device=torch.device("cpu"))
    ok, bad = torch.tensor(True), torch.tensor(False)
    for step, finite in enumerate([ok, ok, bad, bad, ok], start=1):
        watch.record(step, finite)
    with pytest.raises(TrainingStopped, match="non-finite loss or gradient at step 3; what to do"):
        watch.check(advice)


def test_skip_mode_counts_and_gives_up_at_the_check_after_max_in_a_row():
    watch = NonFiniteWatch(skip=True, max_in_a_row=2, device=torch.device("cpu"))
    ok, bad = torch.tensor(True), torch.tensor(False)
    for step, finite in enumerate([bad, ok, bad], start=1):
        watch.record(step, finite)
    assert watch.skipped == 2 and int(watch.in_a_row) == 1
    watch.check(advice)  # no two in a row yet
    for step in (4, 5, 6):  # the row reaches 2 at step 4; the check comes later and names that step
        watch.record(step, bad)
    assert watch.skipped == 5
    with pytest.raises(TrainingStopped, match="2 steps in a row up to step 4 .*what to do"):
        watch.check(advice)
