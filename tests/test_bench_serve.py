"""`rgemma bench-serve` against the real server on the embedded model: every figure it reports, and how it counts
decode time."""

import json
import math

from rgemma import cli
from rgemma.cli.bench_serve import busy_seconds


def test_decode_time_is_the_union_of_the_streams_decoding_spans():
    assert busy_seconds([]) == 0.0
    assert busy_seconds([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) == 4.0  # overlapping spans count once, gaps not
    assert busy_seconds([(1.0, 4.0), (2.0, 3.0)]) == 3.0  # a span inside another adds nothing


def test_bench_serve_reports_every_figure_per_concurrency(tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert cli.main(["bench-serve", "--clients", "1,2", "--requests-per-client", "1", "--prompt-tokens", "4",
                     "--max-tokens", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["clients"] for row in rows] == [1, 2] and [row["requests"] for row in rows] == [1, 2]
    for row in rows:
        for key in ("requests_per_s", "tokens_per_s", "decode_tokens_per_s", "ttft_p50", "ttft_p99", "itl_p50",
                    "itl_p99"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        # 3 tokens per request: 2 gaps each, decoded within the run's wall time
        assert row["decode_tokens_per_s"] >= 2 * row["requests"] / row["seconds"]
    assert "decode" in capsys.readouterr().out
