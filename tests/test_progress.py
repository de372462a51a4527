import io
import re

from rich.console import Console

from ddpm.progress import ProgressReporter, format_duration


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    with ProgressReporter(200, console=Console(file=out, force_terminal=False)) as reporter:
        reporter.advance(1)
        reporter.log(100, 0.12345, 1234.5, 75)
        reporter.say("step 100: samples -> x.png")
    assert out.getvalue().splitlines() == [
        "step 100/200 | loss 0.1235 | 1,234 img/s | eta 1m15s",
        "step 100: samples -> x.png",
    ]


def test_progress_bar_on_a_terminal():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with ProgressReporter(200, console=console) as reporter:
        reporter.log(100, 0.5, 99.0, 10)
    text = out.getvalue()
    assert "step 100/200" in text and "loss 0.5000" in text and "99 img/s" in text and "eta" in text


def test_format_duration():
    assert format_duration(5) == "5s"
    assert format_duration(65) == "1m05s"
    assert format_duration(3725) == "1h02m05s"


STAMP = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} "


def test_lines_go_to_the_log_file_with_their_time_from_the_first(tmp_path):
    out, log = io.StringIO(), tmp_path / "train.log"
    with ProgressReporter(200, console=Console(file=out, force_terminal=False)) as reporter:
        reporter.say("header")  # before the run directory is ready: kept until record_to
        assert not log.exists()
        reporter.record_to(log)
        reporter.log(100, 0.5, 10.0, 5)
        reporter.record("ddpm-train: error: only in the log")
    lines = log.read_text().splitlines()
    assert all(re.match(STAMP, line) for line in lines), lines
    assert [line[20:] for line in lines] == [
        "header",
        "step 100/200 | loss 0.5000 | 10 img/s | eta 5s",
        "ddpm-train: error: only in the log",
    ]
    assert out.getvalue().splitlines() == ["header", "step 100/200 | loss 0.5000 | 10 img/s | eta 5s"]


def test_the_log_file_gets_progress_lines_under_a_bar_too_and_a_quiet_rank_writes_none(tmp_path):
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    with ProgressReporter(200, console=console) as reporter:
        reporter.record_to(tmp_path / "main.log")
        reporter.log(100, 0.5, 99.0, 10)
    assert (tmp_path / "main.log").read_text()[20:] == "step 100/200 | loss 0.5000 | 99 img/s | eta 10s\n"
    quiet = ProgressReporter(200, quiet=True)
    quiet.say("header")
    quiet.record_to(tmp_path / "other.log")
    quiet.say("more")
    assert not (tmp_path / "other.log").exists()


def test_a_log_file_that_cannot_be_written_costs_one_warning(tmp_path):
    out = io.StringIO()
    reporter = ProgressReporter(200, console=Console(file=out, force_terminal=False))
    reporter.record_to(tmp_path / "missing_folder" / "train.log")
    reporter.say("a")
    reporter.say("b")
    lines = out.getvalue().splitlines()
    assert lines[1:] == ["a", "b"] and lines[0].startswith("warning: ") and "console only" in lines[0]
