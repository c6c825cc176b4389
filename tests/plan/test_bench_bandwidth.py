"""The STREAM probe: real numbers from a small run, and the cache that spares later runs."""

from __future__ import annotations

import json

from tokenmill.bench import bandwidth
from tokenmill.bench.bandwidth import BandwidthResult


def test_small_measurement_is_plausible():
    r = bandwidth.measure_bandwidth(size_mb=32, repeats=3, progress=False)
    assert 0.5 < r.copy_gbs < 2000 and 0.5 < r.triad_gbs < 2000
    assert r.peak_gbs == max(r.copy_gbs, r.triad_gbs)


def test_cached_bandwidth_measures_once(monkeypatch, _isolated_cache):
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        return BandwidthResult(copy_gbs=20.0, triad_gbs=25.0, machine=bandwidth.machine_signature())

    monkeypatch.setattr(bandwidth, "measure_bandwidth", fake)
    assert bandwidth.cached_bandwidth().peak_gbs == 25.0
    assert bandwidth.cached_bandwidth().triad_gbs == 25.0
    assert len(calls) == 1 and (_isolated_cache / "bandwidth.json").is_file()
    bandwidth.cached_bandwidth(refresh=True)
    assert len(calls) == 2


def test_bandwidth_command_json(monkeypatch, capsys):
    monkeypatch.setattr(
        bandwidth,
        "measure_bandwidth",
        lambda *a, **k: BandwidthResult(copy_gbs=30.0, triad_gbs=31.0, machine="x"),
    )
    bandwidth.bandwidth_command(json_out=True)
    out = json.loads(capsys.readouterr().out)
    assert out["peak_gbs"] == 31.0 and out["copy_gbs"] == 30.0
