"""The benchmark's wrk parser: numbers in, numbers out, no load generated here."""

from __future__ import annotations

import pytest

from bench.wrk import REPORT_LUA, parse_wrk_output

LATENCY_TEXT = """\
Running 10s test @ http://127.0.0.1:8080/bench/json
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.12ms    1.02ms  20.31ms   90.12%
    Req/Sec     9.81k   512.33    10.50k    80.00%
  Latency Distribution
     50%  980.00us
     75%    5.40ms
     90%    6.01ms
     99%    1.20s
  97650 requests in 10.00s, 14.34MB read
  Socket errors: connect 0, read 2, write 0, timeout 12
  Non-2xx or 3xx responses: 5
Requests/sec:   9764.12
Transfer/sec:      1.43MB
"""

JSON_LINE = (
    'WRK_JSON {"requests":17018,"duration_us":1099765,"bytes":3369564,"connect":0,'
    '"read":0,"write":0,"status":3,"timeout":1,"p50_us":556.0,"p90_us":1230.0,'
    '"p99_us":5052.0,"max_us":14036.0,"mean_us":822.1}\n'
)


def test_parses_latency_text_into_milliseconds_and_errors() -> None:
    result = parse_wrk_output(LATENCY_TEXT)

    assert result.requests == 97650
    assert result.seconds == pytest.approx(10.0)
    assert result.rps == pytest.approx(9764.12)
    assert result.p50_ms == pytest.approx(0.98)
    assert result.p90_ms == pytest.approx(6.01)
    assert result.p99_ms == pytest.approx(1200.0)
    assert result.socket_errors == 14
    assert result.non_2xx == 5
    assert result.errors == 19


def test_prefers_the_lua_json_line_over_the_text() -> None:
    result = parse_wrk_output(LATENCY_TEXT + JSON_LINE)

    assert result.requests == 17018
    assert result.rps == pytest.approx(17018 / 1.099765)
    assert result.p50_ms == pytest.approx(0.556)
    assert result.p99_ms == pytest.approx(5.052)
    assert (result.socket_errors, result.non_2xx) == (1, 3)


def test_text_without_a_latency_distribution_is_refused() -> None:
    with pytest.raises(ValueError, match="not wrk --latency output"):
        parse_wrk_output("Running 10s test @ http://127.0.0.1:1/\nRequests/sec: 1.0\n")


def test_report_script_embeds_the_request_limit() -> None:
    script = REPORT_LUA % {"limit": 100000}

    assert "local limit = 100000" in script
    assert "WRK_JSON" in script
