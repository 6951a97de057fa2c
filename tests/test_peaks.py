"""The roofline micro-benchmarks count their bytes as documented."""

import pytest

from llmkit import peaks


def test_copy_bandwidth_counts_the_read_and_the_write_of_a_filled_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    copies = []
    monkeypatch.setattr(peaks, "best_seconds", lambda fn, repeat=peaks.REPEAT: copies.append(fn()) or 0.5)
    assert peaks.host_copy_bandwidth(4096) == 2 * 4096 / 0.5
    assert copies[0].sum().item() == 1024  # the source is filled: not the zero page
