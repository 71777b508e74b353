"""Sinks: histograms and tables on disk, the null sink, and forwarding through MultiSink."""

import json

import numpy as np
import pytest

from fsdm_eqx.instrument import ConsoleSink, JsonlSink, MultiSink, NullSink, Sink
from fsdm_eqx.instrument.sinks import HISTOGRAM_BINS, confusion_table, histogram
from tests.helpers import RecordingSink


def test_histogram_counts_and_edges_by_hand():
    values = np.array([0.0, 1.0, 2.5, 3.0, np.nan, np.inf, -np.inf])
    counts, edges = histogram("x", values, bins=3)
    # Finite values 0, 1, 2.5, 3 over [0, 3] in bins [0, 1), [1, 2), [2, 3].
    assert edges.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert counts.tolist() == [1, 1, 2] and counts.dtype == np.int64


def test_histogram_default_bins_cover_every_finite_value():
    values = np.random.default_rng(0).normal(size=(7, 11)).astype(np.float32)
    counts, edges = histogram("w", values)
    assert counts.shape == (HISTOGRAM_BINS,) and edges.shape == (HISTOGRAM_BINS + 1,)
    assert counts.sum() == values.size
    assert edges[0] == values.min() and edges[-1] == values.max()
    width = (float(values.max()) - float(values.min())) / HISTOGRAM_BINS
    np.testing.assert_allclose(np.diff(edges), width, rtol=1e-9)
    empty_counts, _ = histogram("nan", np.full(3, np.nan))
    assert empty_counts.sum() == 0
    with pytest.raises(ValueError, match="'labels' has dtype <U1; sinks take arrays of real"):
        histogram("labels", np.array(["a", "b"]))


def test_jsonl_sink_writes_histograms_and_tables(tmp_path):
    sink = JsonlSink(tmp_path)
    values = np.arange(10.0)
    sink.log_histograms({"params/encoder": values}, 12)
    sink.log_table("fid/per class", ["class", "fid", "n"], [["apple", 12.5, 3], ["b", 1.0, 4]], 12)
    sink.log_table("odd", ["v"], [[float("nan")]], 13)
    with pytest.raises(ValueError, match=r"row 0 has 1 values for 2 columns"):
        sink.log_table("bad", ["a", "b"], [[1]], 14)
    sink.close()
    with np.load(tmp_path / "histograms" / "params_encoder_00000012.npz") as saved:
        expected_counts, expected_edges = np.histogram(values, bins=HISTOGRAM_BINS)
        assert np.array_equal(saved["counts"], expected_counts)
        assert np.array_equal(saved["edges"], expected_edges)
    table = json.loads((tmp_path / "tables" / "fid_per_class_00000012.json").read_text())
    assert table == {"columns": ["class", "fid", "n"], "rows": [["apple", 12.5, 3], ["b", 1.0, 4]]}
    odd = json.loads((tmp_path / "tables" / "odd_00000013.json").read_text())
    assert odd["rows"] == [["nan"]]


def test_multi_console_and_null_sinks_take_every_kind(capsys):
    first, second = RecordingSink(), RecordingSink()
    null = NullSink()
    sink = MultiSink(first, ConsoleSink(), null, second)
    for member in (first, second, null, sink, ConsoleSink()):
        assert isinstance(member, Sink)
    sink.log_histograms({"h": np.zeros(3)}, 5)
    sink.log_table("t", ["a"], [[1]], 5)
    sink.log_confusion_matrix("c", ["x", "y"], np.eye(2, dtype=int), 5)
    sink.close()
    expected = [("histograms", 5), ("table", ("t", 5)), ("confusion", ("c", 5)), ("close", None)]
    assert first.calls == expected and second.calls == expected
    assert capsys.readouterr().out == ""


def test_confusion_matrix_is_kept_as_a_table_of_counts(tmp_path):
    sink = JsonlSink(tmp_path)
    counts = np.array([[3, 1], [0, 4]])
    sink.log_confusion_matrix("Val/confusion_matrix", ["apple", "bee"], counts, 7)
    sink.close()
    table = json.loads((tmp_path / "tables" / "Val_confusion_matrix_00000007.json").read_text())
    assert table == {"columns": ["true", "apple", "bee"], "rows": [["apple", 3, 1], ["bee", 0, 4]]}
    with pytest.raises(ValueError, match=r"2 classes needs integer counts of shape \(2, 2\)"):
        confusion_table(["a", "b"], np.ones((2, 3), int))
