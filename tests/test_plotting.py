"""Tick values and labels shared by every PNG: round numbers, written plainly."""
from slimlm.report.plotting import log_ticks, plain, style


def test_log_ticks_are_round_numbers_over_any_range():
    assert log_ticks(26, 200) == [30, 40, 50, 60, 70, 80, 90, 100, 200]
    assert log_ticks(2.3, 50) == [3, 5, 10, 20, 30, 50]
    assert log_ticks(40, 30000) == [50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000]
    assert log_ticks(0.012, 1.1) == [0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1]
    assert log_ticks(0.79, 1.36) == [0.8, 0.9, 1, 1.1, 1.2, 1.3]  # under half a decade: even steps
    assert log_ticks(1e-4, 1e5) == [1e-4, 1e-3, 0.01, 0.1, 1, 10, 100, 1000, 1e4, 1e5]


def test_plain_numbers_and_distinct_colours():
    assert [plain(v) for v in (0.05, 47.123, 27181.8, 1000)] == ["0.05", "47.1", "27,182", "1,000"]
    assert len({style(i)["color"] for i in range(10)}) == 10
    assert style(0)["color"] == style(10)["color"] and style(0)["linestyle"] != style(10)["linestyle"]
