"""The roofline micro-benchmarks count their bytes as documented: a copy's reads and writes, a
read's reads only."""

import pytest

from llmkit import peaks


def test_copy_counts_reads_and_writes_and_read_counts_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(peaks, "best_seconds", lambda fn, repeat=peaks.REPEAT: calls.append(fn()) or 0.5)
    assert peaks.host_copy_bandwidth(4096) == 2 * 4096 / 0.5
    assert peaks.host_read_bandwidth(4096) == 4096 / 0.5
    assert calls[1].item() == 1024  # the read sums a filled buffer: not the zero page
