"""The SVG plots: labels are drawn as paths (never text or math), many devices become a band, empty data says so."""

from __future__ import annotations

import matplotlib
import pytest

from sdk.dashboard.history import AccuracyPoint
from sdk.dashboard.plots import MAX_DEVICE_LINES, accuracy_svg, updates_svg

NASTY = "price $\\frac$ <script>alert(1)</script>"  # as mathtext, \\frac without arguments cannot be parsed


def test_labels_with_dollars_and_markup_are_drawn_as_paths() -> None:
    with pytest.raises(ValueError):  # what would happen with mathtext on: the label cannot even be drawn
        with matplotlib.rc_context({"text.parse_math": True}):
            fig = matplotlib.figure.Figure()
            fig.text(0, 0, NASTY)
            fig.savefig(__import__("io").BytesIO(), format="svg")
    points = [AccuracyPoint(round=r, mean=0.5 + r / 20, devices=2) for r in range(5)]
    svg = accuracy_svg(points, {NASTY: points}, {"d1": [(r, 0.4) for r in range(5)]}).decode()
    # matplotlib keeps each label as an XML-escaped comment; no element can come of it
    assert svg.startswith("<?xml") and "<script" not in svg and "<text" not in svg and "&lt;script&gt;" in svg
    bars = updates_svg({1: {"accepted": 3, f"rejected:{NASTY}": 1}, 2: {"accepted": 4}}).decode()
    assert "<script" not in bars and "<text" not in bars


def test_many_devices_become_a_band_and_empty_plots_say_so() -> None:
    devices = {f"d{i}": [(r, 0.1 * (i % 10)) for r in range(3)] for i in range(MAX_DEVICE_LINES + 1)}
    few = accuracy_svg([], {}, dict(list(devices.items())[:2]))
    many = accuracy_svg([], {}, devices)
    assert many.count(b"<path") < few.count(b"<path") + 200  # one band, not 31 lines with markers
    assert len(accuracy_svg([], {}, {})) > 1000 and len(updates_svg({})) > 1000
