"""``robustfeat reproduce``: targets -> runs, a whole table end to end on the smoke budget, skipping
finished work and resuming an interrupted run on re-run, the README, and the budgets."""

import json

import pytest
from shared_data import SHARED_DATA

from robustfeat import reproduce as rp
from robustfeat.cli import main
from robustfeat.config import list_presets, load_config, preset_budgets
from robustfeat.eval.stats import paired_difference
from robustfeat.train import train

# table1 on the smoke budget, smaller still: the embedded MNIST sample (offline), a few steps
TINY_MNIST = ["data.name=mnist-sample", "data.train_size=200", "data.val_size=50", "optim.batch_size=20",
              "optim.steps=4", "run.eval_every=2", "run.eval_size=20", "attack.steps=2",
              "eval_attack.steps=2"]
CIFAR_DIR = SHARED_DATA
TINY_CIFAR = [f"data.dir={CIFAR_DIR}", "model.widths=[4,4,8,8]", "data.train_size=32", "data.val_size=16",
              "optim.batch_size=16", "optim.steps=2", "run.eval_every=2", "run.eval_size=8",
              "attack.steps=1", "eval_attack.steps=1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def tiny_eval(monkeypatch):
    monkeypatch.setitem(rp.EVAL_N, "smoke", {"mnist": 8, "cifar": 8})
    monkeypatch.setitem(rp.ANALYSIS_N, "smoke", 8)


def test_paired_difference_counts_discordant_images_and_gives_mcnemars_exact_p():
    a = [1, 1, 0, 0, 1]
    b = [1, 0, 1, 1, 1]  # b alone right on 2 images, a alone on 1
    d = paired_difference(a, b)
    assert (d["only_b"], d["only_a"], d["n"]) == (2, 1, 5) and d["diff"] == pytest.approx(20.0)
    assert d["p_mcnemar"] == pytest.approx(1.0)  # 2 * P(X <= 1), X ~ Bin(3, 1/2) = 2 * 4/8, capped at 1
    d = paired_difference([0] * 10 + [1] * 90, [1] * 100)
    assert d["p_mcnemar"] == pytest.approx(2 / 1024) and d["ci95"][0] > 0
    assert paired_difference([1, 0], [1, 0])["p_mcnemar"] == 1.0


def test_targets_name_the_runs_they_need():
    names = lambda t: [r.name for r in rp.plan(t)]
    assert names("table1") == ["mnist-at-seed0", "mnist-at-seed1", "mnist-at-reg-seed0", "mnist-at-reg-seed1"]
    assert len(rp.plan("table2")) == len(rp.plan("table3")) == len(rp.plan("table5")) == 8
    assert {r.role for r in rp.plan("table2")} == {"evaluated", "black-box source"}
    assert names("table4") == ["cifar10-at-seed0", "cifar10-at-att-reg-seed0", "cifar10-natural-seed0"]
    assert names("figure2") == names("figure3") == ["cifar10-at-att-reg-seed0"]
    assert names("figure4") == ["cifar10-at-seed0", "cifar10-at-att-reg-seed0"]
    for t in rp.TARGETS.values():  # every preset exists and has the cpu, fast and smoke budgets
        for p in t.presets:
            assert {"paper", "cpu", "fast", "smoke"} <= set(preset_budgets(p))


def test_fast_budget_is_fgsm_with_random_start_in_every_preset():
    for p in list_presets():
        if p == "demo":
            continue
        cfg = load_config(p, "fast")
        assert cfg.attack.steps == 1 and cfg.attack.random_start
        # Wong et al.'s step range: 1.25 eps (CIFAR); eps on MNIST, where 1.25 eps overfit catastrophically
        assert cfg.attack.eps - 1e-9 <= cfg.attack.step_size <= 1.25 * cfg.attack.eps + 1e-9
        if p.startswith("mnist"):  # results/fast-mnist-fgsm: the measured recipe
            assert cfg.method.grad_align == 1.0 and cfg.optim.schedule == "cyclic" and cfg.run.precision == "bf16"
            assert cfg.attack.eps_warmup_examples == 0  # the one-cycle lr's rise is the warm-up
            assert cfg.attack.carry and not cfg.data.augment  # session 11: carried starts
        assert cfg.eval_attack == load_config(p).eval_attack  # the catastrophic-overfitting watch is PGD
        assert cfg.run.eval_every < cfg.optim.steps


def test_cpu_budgets_keep_the_papers_model_and_attacks_and_fit_the_time():
    for p, budget in [(p, b) for p in ("mnist-at", "mnist-at-reg", "cifar10-at", "cifar10-at-att-reg")
                      for b in ("cpu", "cpu-3epoch", "cpu-1epoch") if b in preset_budgets(p)]:
        paper, cpu = load_config(p), load_config(p, budget)
        assert cpu.model == paper.model and cpu.method == paper.method and cpu.eval_attack == paper.eval_attack
        assert cpu.lam == paper.lam and cpu.data.augment == paper.data.augment
        assert (cpu.attack.eps, cpu.attack.step_size, cpu.attack.steps) == (
            paper.attack.eps, paper.attack.step_size, paper.attack.steps)
    # the arithmetic of presets/_mnist.yaml and _cifar10.yaml: 44 MNIST PGD-40 examples/s shared,
    # 2.5 s per CIFAR PGD-5 step shared
    mnist = load_config("mnist-at", "cpu").optim
    assert 4 * mnist.steps * mnist.batch_size / 44 < 1.6 * 3600
    cifar = load_config("cifar10-at", "cpu-1epoch").optim
    assert 8 * cifar.steps * 2.5 < 2.5 * 3600
    # the CIFAR-10 cpu budget: one AT model in at most an hour at bf16's measured 179 examples/s
    # (results/bench/precision, two threads, alone), validations aside
    cifar = load_config("cifar10-at", "cpu")
    assert cifar.run.precision == "bf16" and cifar.optim.steps * cifar.optim.batch_size / 179 < 3600
    # cpu-3epoch: the same in fp32 at the 41 examples/s measured on a 2-core AVX2 CPU without bf16
    # hardware (docs/findings/cifar10-cpu-3epoch.md), so that a session finishes each model it starts
    short = load_config("cifar10-at", "cpu-3epoch")
    assert short.run.precision == "fp32" and short.optim.steps * short.optim.batch_size / 41 < 3600
    assert (short.optim.schedule, short.optim.lr, short.optim.peak) == (cifar.optim.schedule, cifar.optim.lr,
                                                                      cifar.optim.peak)


@pytest.fixture(scope="module")
def table1(tmp_path_factory):
    """table1 end to end; mnist-at-reg-seed1 was interrupted at step 2 before reproduce ran."""
    out = tmp_path_factory.mktemp("table1")
    mp = pytest.MonkeyPatch()
    mp.setitem(rp.EVAL_N, "smoke", {"mnist": 8, "cifar": 8})
    mp.setitem(rp.AUTOATTACK_N, "smoke", {"mnist": 4, "cifar": 4})
    cfg = rp.run_config(rp.RunSpec("mnist-at-reg", 1, ""), "smoke", TINY_MNIST, None)
    train(cfg, out / "runs" / "mnist-at-reg-seed1", progress=False, stop_after=2)
    summary = rp.reproduce("table1", "smoke", out, overrides=TINY_MNIST)
    mp.undo()
    return out, summary


def test_table1_end_to_end_writes_the_readme(table1):
    out, s = table1
    text = (out / "README.md").read_text()
    for needle in ("# Reproduction of Table 1: MNIST", "Madry et al. (2017)", "AT-reg", "92.86", "95.69",
                   "96.90", "95% CI", "ours - paper", "Black box, PGD 40 steps", "git revision", "machine:",
                   "## Budget", "optim.steps: 100000 -> 4", "robustfeat reproduce table1 --budget smoke",
                   "robustfeat eval", "--source", "wall time"):
        assert needle in text, needle
    assert set(s["results"]) == {"mnist-at", "mnist-at-reg"}
    row = next(r for r in s["results"]["mnist-at"]["rows"] if r["id"] == "whitebox/pgd-40")
    assert row["paper"] == 92.86 and row["diff"] == pytest.approx(row["ours"] - 92.86)
    assert row["ci95"][0] <= row["ours"] <= row["ci95"][1] and row["n"] == 8
    assert any(r["id"] == "blackbox/pgd-40" for r in s["results"]["mnist-at-reg"]["rows"])
    ev = json.loads((out / "runs/mnist-at-seed0/eval/eval.json").read_text())
    assert ev["source"]["seed"] == 1 and ev["model"]["seed"] == 0
    # the paper's claims as differences from the baseline, ours with an interval, and the training revision
    assert "### Differences: methods against the baseline, and two seeds of one method" in text
    base = next(r for r in s["results"]["mnist-at"]["rows"] if r["id"] == "whitebox/pgd-40")
    d_ours = next(r for r in s["results"]["mnist-at-reg"]["rows"] if r["id"] == "whitebox/pgd-40")["ours"] - base["ours"]
    assert f"| White box, PGD 40 steps | AT-reg - Madry et al. (2017) | +2.83 | {d_ours:+.2f} |" in text
    comp = {(c["row"], c["kind"], c["b"]): c for c in s["comparisons"]}
    m = comp[("whitebox/pgd-40", "method", "mnist-at-reg")]
    assert m["diff"] == pytest.approx(d_ours) and m["n"] == 8 and 0 < m["p_mcnemar"] <= 1
    # the seed-1 copy on the same 8 images (its quick suite has natural and PGD at the preset's steps)
    seed = comp[("natural", "seed", "mnist-at-seed1")]
    ctrl = json.loads((out / "runs/mnist-at-seed1/eval/eval.json").read_text())
    assert ctrl["settings"]["suite"] == "quick" and ctrl["indices"] == ev["indices"]
    rep = comp[("natural", "method-seed1", "mnist-at-reg-seed1")]  # the method comparison between the copies
    assert rep["a"] == "mnist-at-seed1" and rep["n"] == 8 and "(seed-1 copies)" in text
    nat0 = next(r for r in s["results"]["mnist-at"]["rows"] if r["id"] == "natural")["ours"]
    assert seed["ours"] == pytest.approx(100 * next(r["accuracy"] for r in ctrl["rows"] if r["id"] == "natural")
                                         - nat0)
    for r in s["runs"]:
        assert r["revisions"] and f"`{r['revisions'][0][:10]}" in text
        assert r["machines"] == [rp.machine_label(json.loads((out / r["dir"] / "run.json").read_text())["machine"])]
        assert f"| {r['machines'][0]} |" in text  # the Runs table names where each run trained
        assert f"`{r['weights_fingerprint'][:16]}`" in text
    assert s["runs"][0]["weights_fingerprint"] == ev["model_fingerprint"]  # the weights eval.json evaluated
    # AutoAttack on each seed-0 model, beside natural and the preset's PGD on the same 4 images
    aa = s["autoattack"]["presets"]
    assert set(aa) == {"mnist-at", "mnist-at-reg"} and "### AutoAttack (standard) on the seed-0 models" in text
    for p, v in aa.items():
        ev_aa = json.loads((out / f"runs/{p}-seed0/eval-autoattack/eval.json").read_text())
        assert ev_aa["n"] == 4 and [r["id"] for r in ev_aa["rows"]] == [
            "natural", "worst_case", f"whitebox/pgd-{rp.run_config(rp.RunSpec(p, 0, ''), 'smoke', TINY_MNIST, None).eval_attack.steps}",
            "autoattack"]
        assert v["rows"]["autoattack"]["ours"] <= v["rows"]["natural"]["ours"]
    (d,) = s["autoattack"]["differences"]
    assert d["n"] == 4 and d["label"] == "AT-reg - Madry et al. (2017)"
    # a verdict for each claim measured in both seed pairs
    assert "### Verdicts on the paper's claims" in text
    replicated = {c["row"] for c in s["comparisons"] if c["kind"] == "method-seed1"}
    assert replicated and {v["row"] for v in s["verdicts"]} == replicated
    assert all(v["verdict"] in ("reproduced", "contradicted", "not resolved") for v in s["verdicts"])
    assert json.loads((out / "reproduce.json").read_text())["target"] == "table1"


def test_interrupted_run_was_resumed_and_rerun_skips_finished_work(table1, capsys, monkeypatch):
    out, _ = table1
    monkeypatch.setitem(rp.AUTOATTACK_N, "smoke", {"mnist": 4, "cifar": 4})  # as the fixture ran it
    sessions = json.loads((out / "runs/mnist-at-reg-seed1/run.json").read_text())["sessions"]
    assert [(x["from_step"], x["to_step"]) for x in sessions] == [(0, 2), (2, 4)]
    ev_file = out / "runs/mnist-at-seed0/eval/eval.json"
    before = ev_file.stat().st_mtime_ns
    rp.reproduce("table1", "smoke", out, overrides=TINY_MNIST, quiet=False)
    log = capsys.readouterr().out
    assert log.count("skipped") == 10, log  # 4 runs + 2 evaluations + 2 seed controls + 2 AutoAttacks
    assert ev_file.stat().st_mtime_ns == before
    assert len(json.loads((out / "runs/mnist-at-reg-seed1/run.json").read_text())["sessions"]) == 2


def test_machine_label_names_the_cpu_kind_and_says_when_it_was_not_recorded(tmp_path):
    zen4 = {"cpu": "AMD EPYC", "cpu_id": "AuthenticAMD family 25 model 17 stepping 1", "cpu_capability": "AVX512",
            "threads": 2, "device": "cpu"}
    assert rp.machine_label(zen4) == "AMD EPYC, AVX512, family 25 model 17, 2 threads"
    assert rp.machine_label({"threads": 2, "device": "cpu"}) == "CPU not recorded, 2 threads"  # an old run.json
    assert rp.machine_label({"gpu": "NVIDIA H100", "cpu": "x", "threads": 8}) == "NVIDIA H100, 8 threads"
    assert rp.machine_label(None) == "not recorded"
    # a run resumed on another CPU lists both machines, in order, each once
    old = {"threads": 2}
    sessions = [{"machine": old}, {"machine": old}, {"machine": zen4}]
    (tmp_path / "run.json").write_text(json.dumps({"sessions": sessions}))
    assert rp.train_machines(tmp_path) == ["CPU not recorded, 2 threads",
                                           "AMD EPYC, AVX512, family 25 model 17, 2 threads"]
    assert rp.train_machines(tmp_path / "missing") == []


def test_cli_dry_run_and_errors(table1, capsys):
    out, _ = table1
    args = ["reproduce", "table1", "--budget", "smoke", "--out", str(out), "--dry-run"]
    assert main([*args, *[a for o in TINY_MNIST for a in ("--set", o)]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(" done " in ln for ln in lines)
    assert main(args) == 2  # other settings than the runs in OUT: refused, not mixed into the table
    assert "another config" in capsys.readouterr().err
    assert main(["reproduce", "table1", "--budget", "nope", "--out", str(out)]) == 2
    assert "budget" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "table9"])


@pytest.mark.skipif(not (CIFAR_DIR / "cifar10").exists(), reason="needs ../shared/data/cifar10")
def test_table4_and_figures_share_runs(tmp_path):
    runs = tmp_path / "runs"
    s = rp.reproduce("table4", "smoke", tmp_path / "t4", runs_dir=runs, overrides=TINY_CIFAR)
    a = s["analysis"]
    assert set(a["rows"]) == {"cifar10-at-seed0", "cifar10-at-att-reg-seed0"} and a["n"] == {"train": 8, "test": 8}
    assert "Table 4" in (tmp_path / "t4/README.md").read_text()
    for target, png in (("figure2", "figure2_attention_robustness.png"), ("figure3", "figure3_attention_maps.png"),
                        ("figure4", "figure4_gradient_maps.png")):
        s = rp.reproduce(target, "smoke", tmp_path / target, runs_dir=runs, overrides=TINY_CIFAR)
        assert all(r["state_before"] == "done" for r in s["runs"])  # trained once, by table4
        assert (tmp_path / target / "figures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{png}" in (tmp_path / target / "README.md").read_text()
    text = (tmp_path / "figure2/README.md").read_text()
    assert "Spearman" in text and "untrained control" in text
    split = json.loads((tmp_path / "figure2/reproduce.json").read_text())["analysis"]["splits"]["test"]
    assert -1 <= split["control_spearman"] <= 1 and len(split["control_mean_by_rank"]) == len(split["mean_by_rank"])
    assert split["control_mean_by_rank"] != split["mean_by_rank"]  # a different (untrained) model


def _cmp(row, kind, a, b, ours, lo, hi, paper=None):
    return {"row": row, "title": row, "kind": kind, "a": a, "b": b, "label": f"{b} - {a}", "paper": paper,
            "ours": ours, "diff": ours, "ci95": [lo, hi]}


@pytest.mark.parametrize("pairs, seeds, paper, expected", [
    # both pairs significant on the paper's side, larger than seed noise
    (((+3.0, +1.0, +5.0), (+2.5, +0.5, +4.5)), (1.0, -1.2), +4.5, "reproduced"),
    # both significant on the other side
    (((-3.0, -5.0, -1.0), (-2.5, -4.5, -0.5)), (1.0, 0.5), +4.5, "contradicted"),
    # one pair's interval includes zero
    (((+3.0, +1.0, +5.0), (+1.0, -1.0, +3.0)), (0.5, 0.5), +4.5, "not resolved"),
    # both significant but one seed alone moves the row as much
    (((+3.0, +1.0, +5.0), (+2.5, +0.5, +4.5)), (0.5, -2.8), +4.5, "not resolved"),
    # the pairs disagree in sign
    (((+3.0, +1.0, +5.0), (-3.0, -5.0, -1.0)), (0.5, 0.5), +4.5, "not resolved"),
    # the paper claims no difference and both intervals rule out more than a point either way
    (((+0.2, -0.6, +0.9), (-0.1, -0.8, +0.7)), (0.5, 0.5), -0.06, "reproduced"),
    # neither pair finds a difference, but the intervals are too wide to show there is none
    (((+0.4, -1.0, +1.8), (-0.2, -1.6, +1.2)), (0.5, 0.5), -0.06, "not resolved"),
    # the paper claims no difference and both pairs find one beyond the seed noise
    (((+2.0, +0.8, +3.2), (+1.8, +0.6, +3.0)), (0.5, 0.5), +0.2, "contradicted"),
])
def test_verdicts_follow_the_stated_rule(pairs, seeds, paper, expected):
    (o0, l0, h0), (o1, l1, h1) = pairs
    comps = [_cmp("whitebox/pgd-20", "method", "at", "at-reg", o0, l0, h0, paper),
             _cmp("whitebox/pgd-20", "method-seed1", "at-seed1", "at-reg-seed1", o1, l1, h1, paper),
             _cmp("whitebox/pgd-20", "seed", "at-seed0", "at-seed1", seeds[0], -9, 9),
             _cmp("whitebox/pgd-20", "seed", "at-reg-seed0", "at-reg-seed1", seeds[1], -9, 9),
             # a row without a seed-1 replicate gets no verdict
             _cmp("whitebox/pgd-100", "method", "at", "at-reg", 5.0, 3.0, 7.0, 4.97)]
    (v,) = rp.verdicts(comps)
    assert v["verdict"] == expected, v["reason"]
    assert v["seed_noise"] == pytest.approx(max(abs(x) for x in seeds))
    assert f"{o0:+.2f}" in v["reason"] and f"{o1:+.2f}" in v["reason"]


def test_verdict_reason_says_when_both_intervals_exclude_the_papers_size():
    def reason(paper, seed0, seed1):
        comps = [_cmp("whitebox/pgd-20", "method", "at", "at-reg", *seed0, paper),
                 _cmp("whitebox/pgd-20", "method-seed1", "at-seed1", "at-reg-seed1", *seed1, paper),
                 _cmp("whitebox/pgd-20", "seed", "at-seed0", "at-seed1", 0.1, -9, 9)]
        (v,) = rp.verdicts(comps)
        assert v["verdict"] == "not resolved"
        return v["reason"]
    near_zero, wide = (-0.8, -2.0, +0.4), (+2.0, -0.5, +5.0)
    assert "the paper's +4.86 lies above both intervals" in reason(+4.86, near_zero, (-1.2, -2.5, +0.1))
    assert "lies below both intervals" in reason(-4.0, near_zero, (-1.2, -2.5, +0.1))
    assert "lies" not in reason(+4.86, near_zero, wide)  # inside the seed-1 interval
    assert "lies" not in reason(+4.86, wide, near_zero)  # inside the seed-0 interval
    # a "no difference" claim: the reason gives the span of both intervals against the margin
    assert reason(+0.42, (+0.9, -0.5, +2.3), (-1.0, -2.17, +0.17)).endswith(
        "together they span -2.17 to +2.30, not within +-1.0")


def test_cli_shows_progress_in_a_log_file_too(monkeypatch, capsys):
    """Under nohup stderr is a file: progress must still be on (progress.py writes plain lines there)."""
    import robustfeat.cli.reproduce as cli_rp
    seen = []

    def fake(target, budget, out, **kw):
        seen.append(kw["progress"])
        return {"title": target, "budget": budget}

    monkeypatch.setattr(cli_rp, "reproduce", fake)
    assert main(["reproduce", "figure2", "--budget", "smoke"]) == 0  # capsys: stderr is no terminal
    assert main(["reproduce", "figure2", "--budget", "smoke", "--quiet"]) == 0
    assert seen == [True, False]
