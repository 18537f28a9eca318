"""data/progress.py: off a terminal, plain time-stamped lines (no carriage returns, no repeats); on one, a bar."""
import io
import re

from ldot.data.progress import progress_bar


class Tty(io.StringIO):
    def isatty(self):
        return True


STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


def test_lines_off_a_terminal():
    out = io.StringIO()  # not a tty: what an sbatch log is
    bar = progress_bar(total=4, initial=1, desc="train", unit="step", every_s=0, stream=out)
    for step in range(2, 5):
        bar.set_postfix(ordered_dict={"task": "cmr", "loss": f"{1 / step:.4f}"}, refresh=False)
        bar.update()
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert all(re.match(STAMP + "train ", line) for line in lines), lines
    assert [re.search(r"train (\d)/4", line).group(1) for line in lines] == ["1", "2", "3", "4"]  # closing repeat dropped
    assert "(100.0%)" in lines[-1] and "task=cmr, loss=0.2500" in lines[-1] and "step/s" in lines[-1]


def test_unknown_total_and_the_interval():
    out = io.StringIO()
    for _ in progress_bar(iter(range(50)), desc="convert", every_s=3600, stream=out):
        pass
    lines = out.getvalue().splitlines()
    # an hour between lines: the first and the last only; no total, so no percentage
    assert len(lines) == 2 and lines[-1].split(" ", 2)[2].startswith("convert 50 [") and "%" not in lines[-1]


def test_a_bar_on_a_terminal_and_nothing_when_disabled():
    tty = Tty()
    for _ in progress_bar(range(3), desc="encode", stream=tty):
        pass
    assert "\r" in tty.getvalue() and "|" in tty.getvalue()  # tqdm's own bar
    quiet = io.StringIO()
    for _ in progress_bar(range(3), desc="encode", stream=quiet, disable=True):
        pass
    assert quiet.getvalue() == ""
