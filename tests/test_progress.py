"""Progress bars in a log file: lines, not carriage returns."""

import io

from robustfeat.progress import LineStream, progress_bar, write_line


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_in_a_file_writes_lines_without_carriage_returns(monkeypatch):
    monkeypatch.setenv("ROBUSTFEAT_PROGRESS_INTERVAL", "0")
    out = io.StringIO()
    bar = progress_bar(total=5, desc="train", unit="step", stream=out)
    for _ in range(5):
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[-1].startswith("train: 100%") and "5/5" in lines[-1]
    assert len(lines) >= 5 and all(line.strip() for line in lines)  # one line per redraw, none blank


def test_a_bar_in_a_file_is_rate_limited_by_the_interval(monkeypatch):
    monkeypatch.setenv("ROBUSTFEAT_PROGRESS_INTERVAL", "3600")
    out = io.StringIO()
    for _ in progress_bar(range(1000), desc="eval", stream=out):
        pass
    assert len(out.getvalue().splitlines()) <= 2  # the first draw and the final one


def test_a_bar_on_a_terminal_redraws_in_place():
    out = Tty()
    bar = progress_bar(total=3, stream=out, mininterval=0)
    bar.update(3)
    bar.close()
    assert "\r" in out.getvalue()


def test_line_stream_turns_redraws_into_lines_and_drops_blank_clears():
    out = io.StringIO()
    s = LineStream(out)
    s.write("\r 10%")
    s.write("\r 20%")
    s.write("\r" + " " * 20 + "\r")
    s.write("\n")
    assert out.getvalue() == " 10%\n 20%\n"


def test_a_line_written_during_a_bar_gets_a_line_of_its_own(monkeypatch):
    monkeypatch.setenv("ROBUSTFEAT_PROGRESS_INTERVAL", "3600")
    out = io.StringIO()
    bar = progress_bar(total=2, desc="AutoAttack", unit="chunk", stream=out)  # its first draw, line left open
    write_line("AutoAttack, images 0-999: running apgd-ce", stream=out)
    write_line("second", stream=out)
    bar.update(2)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("AutoAttack:   0%") and lines[1:3] == ["AutoAttack, images 0-999: running apgd-ce",
                                                                      "second"]
    assert lines[3].startswith("AutoAttack: 100%")
    tty = Tty()
    write_line("above the bars", stream=tty)
    assert tty.getvalue() == "above the bars\n"
