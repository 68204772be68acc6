"""The benchmark tools run end to end and write what they say: the sweep's table, CSV, JSON and plots (its
measured bytes equal the planner's prediction), and the collectives sweep."""
import csv
import json

from jaxpar import bench


def test_sweep_writes_results_and_prediction_matches(tmp_path, capsys):
    out = tmp_path / "b"
    bench.main(["--mesh", "tp2", "ep8", "--batches", "2", "--contexts", "16", "--new-tokens", "3", "--repeats", "1",
                "--out", str(out)])
    r = json.loads((out / "sweep.json").read_text())
    rows = r["sweep"]
    assert [x["mesh"] for x in rows] == ["tp2", "ep8"]
    for x in rows:
        assert x["ttft_ms"] > 0 and x["tpot_ms"] > 0 and x["tokens_per_s"] > 0
        assert x["prefill_bytes_moved"] == x["prefill_bytes_predicted"] > 0
        assert x["decode_bytes_moved"] == x["decode_bytes_predicted"] > 0
    with open(out / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    for png in ("sweep_bytes.png", "sweep_memory.png", "sweep_latency.png"):
        assert (out / png).stat().st_size > 1000
    assert "| tp2 | 2 | 16 |" in capsys.readouterr().out


def test_collectives_sweep(tmp_path):
    out = tmp_path / "c"
    bench.main(["collectives", "--min-log2", "10", "--max-log2", "12", "--repeats", "1", "--out", str(out)])
    r = json.loads((out / "collectives.json").read_text())
    assert r["n"] == 8 and len(r["rows"]) == 4 * 3
    for x in r["rows"]:  # each program's result on one device is the message size asked for
        assert x["bytes"] in (1024, 2048, 4096) and x["seconds"] > 0
    assert sorted(x["bytes"] for x in r["rows"] if x["op"] == "all-gather") == [1024, 2048, 4096]
    assert r["fit"]["latency_us"] >= 0
    assert (out / "collectives.png").stat().st_size > 1000
