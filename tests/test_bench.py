"""`robustfeat bench` on a tiny configuration: fields and sanity of the numbers (no timing assertions)."""

import json

from robustfeat.bench import count_flops
from robustfeat.cli import main

TINY = ["bench", "--presets", "mnist-at-reg", "--batch", "4", "--attack-steps", "1", "--eval-steps", "1",
        "--repeats", "2", "--warmup", "0", "--steps", "1", "--matmul-size", "128", "--data-size", "16"]


def test_bench_json_and_results_files(tmp_path, capsys):
    assert main([*TINY, "--json", "--out", str(tmp_path / "results")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"command", "revision", "date", "machine", "settings", "matmul", "cases"} <= set(report)
    assert report["command"].startswith("robustfeat bench")
    assert report["machine"]["device"] == "cpu"
    mm = report["matmul"]["gflops"]
    assert 0 < mm["min"] <= mm["median"] <= mm["max"] and mm["n"] >= 2 and report["matmul"]["n"] == 128
    (case,) = report["cases"]
    assert (case["model"], case["method"], case["batch"], case["attack"]["steps"]) == ("mnist_cnn", "at-reg", 4, 1)
    ours, book = case["train"]["ours"], case["train"]["textbook"]
    for d in (ours, book, case["eval"]):
        r = d["examples_per_s"]
        assert 0 < r["min"] <= r["median"] <= r["max"] and r["n"] == 2
        assert d["gflops"] > 0 and 0 < d["peak_fraction"]
    # MNIST CNN, at-reg with PGD-1: attack (fwd + input bwd) + adversarial and clean forward + full backward
    assert 1e8 < ours["flops_per_example"] < 1e9
    assert book["flops_per_example"] > ours["flops_per_example"]  # the textbook attack's parameter gradients
    assert ours["speedup_vs_textbook"] > 0
    assert case["eval"]["attack"] == "PGD-1"
    files = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert len(files) == 2 and files[0].startswith("cpu-") and files[0].endswith(".json")
    md = (tmp_path / "results" / files[1]).read_text()
    assert "command: `robustfeat bench" in md and "revision:" in md and "train ours" in md


def test_table_output_and_variant_errors(capsys):
    assert main([*TINY, "--no-eval", "--matmul-size", "0", "--variants", "ours-nosync"]) == 0
    out = capsys.readouterr().out
    assert "train ours-nosync (PGD-1)" in out and "eval" not in out.split("\n", 3)[-1].split("MFLOP/ex:")[0]
    assert main([*TINY, "--variants", "fastest"]) == 2
    assert "unknown variant 'fastest'" in capsys.readouterr().err


def test_bf16_variants_report_the_bf16_matmul_rate(capsys):
    assert main([*TINY, "--json", "--no-eval", "--variants", "ours,ours-bf16,ours-bf16-attack32,textbook"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["matmul"]["dtype"] == "float32" and report["matmul_bf16"]["dtype"] == "bfloat16"
    t = report["cases"][0]["train"]
    for v in ("ours-bf16", "ours-bf16-attack32"):
        # same work counted (the FLOP count does not depend on the dtype), its own rate and speedup
        assert t[v]["flops_per_example"] == t["ours"]["flops_per_example"]
        assert 0 < t[v]["bf16_peak_fraction"] and t[v]["speedup_vs_textbook"] > 0
    assert "bf16_peak_fraction" not in t["ours"]


def test_flop_count_of_a_linear_layer():
    import torch

    lin = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(3, 8, requires_grad=True)
    # forward 2*3*8*4; input gradient only (as PGD asks) another 2*3*4*8
    assert count_flops(lambda: torch.autograd.grad(lin(x).sum(), x)) == 2 * (2 * 3 * 8 * 4)


def test_suite_throughput_on_a_trained_run(tmp_path, capsys):
    """--suite-run times whole evaluation suites on a trained run: examples/s, accuracies, row times."""
    from test_suite import TINY as TRAIN_TINY

    run = tmp_path / "run"
    assert main(["train", "--preset", "mnist-at", "--out", str(run), "--quiet", "data.name=mnist-sample",
                 *TRAIN_TINY]) == 0
    capsys.readouterr()
    assert main(["bench", "--presets", "", "--matmul-size", "0", "--suite-run", str(run), "--suites", "quick,paper",
                 "--suite-n", "6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cases"] == [] and "--suite-run" in report["command"]
    quick, paper = report["suites"]
    for s in (quick, paper):
        assert s["n"] == 6 and s["examples_per_s"] > 0 and 0 <= s["robust_acc"] <= s["clean_acc"] <= 1
    assert (quick["suite"], paper["suite"]) == ("quick", "paper")
    assert paper["seconds"] > 0 and all(k.startswith(("natural", "whitebox", "restarts", "sanity"))
                                        for k in paper["row_seconds"])
