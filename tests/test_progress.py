import io

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
