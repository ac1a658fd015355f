"""`rgemma bench-serve` against the real server on the embedded model: every figure it reports, and how it counts
decode time."""

import json
import math
import subprocess
import sys

from rgemma.cli.bench_serve import all_decoding_rate


def test_decode_rate_counts_the_time_every_stream_decodes():
    # Two streams: both decode from 2.0 (the later first chunk) to 3.5 (the earlier last); 3 chunks come then.
    assert all_decoding_rate([[0.0, 1.0, 2.5, 3.5], [2.0, 3.0, 4.0]]) == 3 / 1.5
    assert math.isnan(all_decoding_rate([[0.0, 1.0], [2.0, 3.0]]))  # one ended before the other began


def test_bench_serve_reports_every_figure_per_concurrency(tmp_path):
    # A process of its own, as a user runs it: the server's logging must not touch pytest's capture.
    out = tmp_path / "serve.json"
    done = subprocess.run([sys.executable, "-m", "rgemma.cli", "bench-serve", "--clients", "1,2",
                           "--requests-per-client", "1", "--prompt-tokens", "4", "--max-tokens", "3",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["clients"] for row in rows] == [1, 2] and [row["requests"] for row in rows] == [1, 2]
    for row in rows:
        for key in ("requests_per_s", "tokens_per_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        # Measured while every stream decodes, or NaN where the streams never all decode at once.
        assert math.isnan(row["decode_tokens_per_s"]) or row["decode_tokens_per_s"] > 0
    assert " 2 clients:" in done.stdout and "decode" in done.stdout
