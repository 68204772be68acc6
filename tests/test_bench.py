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


def test_attention_bench(tmp_path, capsys):
    """Blockwise rows agree with dense, hold a block-sized score array, and mark the block jaxpar picks."""
    out = tmp_path / "a"
    bench.main(["attention", "--lengths", "512", "--blocks", "64", "128", "--heads", "4", "--kv-heads", "2",
                "--head-dim", "16", "--repeats", "1", "--out", str(out)])
    rows = json.loads((out / "attention.json").read_text())["rows"]
    assert [(x["kind"], x["block"]) for x in rows] == [("dense", None), ("blockwise", 64), ("blockwise", 128)]
    assert all(x["ms"] > 0 and x["max_diff"] < 1e-5 for x in rows)
    assert rows[0]["score_bytes"] == 4 * 512 * 512 * 4 and rows[1]["score_bytes"] == 4 * 64 * 64 * 4
    assert [x["chosen"] for x in rows] == [False, False, True]
    assert "| 512 | blockwise, block 128 |" in capsys.readouterr().out


def test_continuous_batching_benchmark(tmp_path):
    """`bench continuous` end to end on a small workload: both modes produce every requested token, nothing
    compiles after warm-up, paged and contiguous decode attention agree."""
    out = tmp_path / "cb"
    bench.main(["continuous", "--model", "tiny", "--requests", "6", "--meshes", "single", "--decode-steps", "4",
                "--long-prompt", "256", "--attention-contexts", "64", "--out", str(out)])
    r = json.loads((out / "continuous.json").read_text())
    m = r["meshes"][0]
    assert m["continuous"]["output_tokens"] == m["static"]["output_tokens"] == r["output_tokens"] > 0
    assert m["compiles_after_warmup"] == 0 and m["sweep"][0]["compiles"] == 0
    assert m["chunked_prefill"]["compiles_timed_run"] == 0 and m["chunked_prefill"]["short_ttft_s"] > 0
    assert m["saturation"]["ratio"] > 0
    assert m["prefill_only"]["prompt_tokens"] == r["prompt_tokens"] and m["prefill_only"]["seconds"] > 0
    a = r["attention"][0]
    assert a["max_diff"] <= 1e-5 and a["paged_us_per_token"] > 0


def test_decode_steps_needed_by_each_batching_mode():
    """Static batches of 2 run to their longest (5, then 10: 15 steps); continuous batching refills a slot when
    its request ends (3 ends, 10 joins; 5 ends, 2 joins; 13 steps), or only every 4 steps (16)."""
    from jaxpar.benchmarks.continuous import decode_steps_needed
    assert decode_steps_needed([5, 3, 10, 2], 2, 1) == {"static": 15, "continuous": 13, "ratio": 15 / 13}
    assert decode_steps_needed([5, 3, 10, 2], 2, 4)["continuous"] == 16


def test_serving_benchmark(tmp_path):
    """`bench serve` end to end: it starts a server, sends the workload at two rates, overloads it and soaks
    it, runs the same workload through the engine's Python API and in static batches, and stops the server
    cleanly; every request is answered and counted."""
    out = tmp_path / "serve"
    bench.main(["serve", "--mesh", "single", "--fake-devices", "1", "--max-num-seqs", "2", "--max-queue", "8",
                "--requests", "6", "--rates", "20", "inf", "--load-seconds", "2", "--soak", "12", "--vs-engine",
                "--static", "--out", str(out)])
    r = json.loads((out / "serve.json").read_text())  # a queue of 8 holds every timed rate's 6 requests
    assert r["server_exit_status"] == 0 and r["model"] == "tiny-add"
    for rate in r["rates"]:
        assert rate["statuses"] == {"200": 6} and rate["output_tokens"] == r["output_tokens"] > 0
        assert rate["ttft_ms"]["p50"] > 0 and rate["e2e_ms"]["p99"] >= rate["ttft_ms"]["p99"]
    assert r["load"]["lost"] == 0 and set(r["load"]["statuses"]) <= {"200", "503"}
    assert r["soak"]["ok"] == 12 and r["soak"]["rss_after_mib"] > 0
    assert r["engine"]["output_tokens_per_s"] > 0 and r["http_over_engine"] > 0
    assert r["static"]["output_tokens_per_s"] > 0
    assert (out / "serve.png").exists()


def test_accelerator_check_runs_here_when_allowed(tmp_path, capsys):
    """The device check refuses a CPU (it measures an accelerator) unless told to run anyway; then, with a
    tiny model, it measures and writes what it says: decode bandwidth and prefill FLOP utilisation against
    the hardware preset, and one shipped mesh's sweep point with its bytes equal to the planner's."""
    import pytest

    with pytest.raises(SystemExit):
        bench.main(["accelerator", "--out", str(tmp_path / "no")])
    assert "no GPU or TPU here" in capsys.readouterr().err
    out = tmp_path / "a"
    bench.main(["accelerator", "--allow-cpu", "--model", "tiny-add", "--dtype", "float32", "--prompt-len", "32",
                "--decode-prompt", "8", "--new-tokens", "8", "--decode-steps", "4", "--mesh", "tp2",
                "--skip-serving", "--out", str(out)])
    r = json.loads((out / "accelerator.json").read_text())
    assert r["platform"] == "cpu" and r["hardware"] == "h100-nvlink" and r["dtype"] == "float32"
    d, p = r["decode"], r["prefill"]
    assert d["tpot_ms"] > 0 and 0 < d["mbu"] and d["weights_bytes"] == 3212 * 1024 + 512
    assert p["ttft_ms"] > 0 and 0 < p["mfu"] and p["flops"] > 2 * 32 * 700_000
    assert [m["mesh"] for m in r["meshes"]] == ["tp2"]
    assert all(m["prefill_bytes_moved"] == m["prefill_bytes_predicted"] for m in r["meshes"])
    assert "| decode MBU |" in (out / "accelerator.md").read_text()
