"""The validity checks of an evaluation: signs of gradient masking in a result's rows, and whether a
black-box source is independent of the evaluated model. (The checks made before attacking are in
``eval.precheck``, those of the robustness curves in ``eval.curves``.)

Each check is a dict {"name", "status": "pass" | "flagged" | "skipped", "detail"}; a result whose
checks flag anything is reported with ``masking_suspected`` and a warning verdict.
"""

from __future__ import annotations

import itertools

LARGE_EPS_MAX_ACC = 0.05
"""The large-eps PGD row must bring accuracy to at most this, else gradient masking is suspected."""
AA_GAP = 0.05
"""AutoAttack more than this below the strongest PGD row is flagged."""
BLACKBOX_TOL = 0.01
"""Black-box accuracy more than this below the white-box accuracy of the same attack is flagged."""


def masking_checks(rows: list[dict]) -> list[dict]:
    """Signs of gradient masking in a result's rows; each check is 'pass', 'flagged' or 'skipped'.

    1. accuracy never rises with more PGD (or CW) steps; 2. black-box accuracy not below white-box
    (more than BLACKBOX_TOL); 3. PGD with a large eps drives accuracy to at most LARGE_EPS_MAX_ACC;
    4. AutoAttack not more than AA_GAP below the strongest white-box PGD row; 5. more random restarts
    stay inside the single start's 95% interval; 6. the targeted row not more than AA_GAP below the
    strongest PGD row; 7. a transfer attack from a natural model not stronger than the white-box one.
    """
    checks = _monotone_and_blackbox(rows) + [_large_eps(rows), _autoattack(rows), _restarts(rows),
                                             _targeted(rows), _transfer(rows)]
    return checks


def _check(name: str, status: str, detail: str) -> dict:
    return {"name": name, "status": status, "detail": detail}


def _strongest_pgd(rows: list[dict]) -> dict | None:
    wb = [r for r in rows if r["kind"] == "whitebox" and r["loss"] == "ce"]
    return max(wb, key=lambda r: r["steps"]) if wb else None


def _monotone_and_blackbox(rows: list[dict]) -> list[dict]:
    by_id = {r["id"]: r for r in rows}
    checks = []

    def add(name: str, status: str, detail: str) -> None:
        checks.append(_check(name, status, detail))

    for loss, label in (("ce", "PGD"), ("cw", "CW")):
        wb = sorted((r for r in rows if r["kind"] == "whitebox" and r["loss"] == loss), key=lambda r: r["steps"])
        if len(wb) < 2:
            add(f"monotone_{label.lower()}", "skipped", f"fewer than two white-box {label} rows")
            continue
        rises = [f"{a['steps']}->{b['steps']} steps: {a['accuracy']:.2%} -> {b['accuracy']:.2%}"
                 for a, b in itertools.pairwise(wb) if b["correct"] > a["correct"]]
        add(f"monotone_{label.lower()}", "flagged" if rises else "pass",
            ("accuracy rises with more steps (" + "; ".join(rises) + ")") if rises
            else f"accuracy non-increasing over {label}-" + "/".join(str(r["steps"]) for r in wb))

    pairs = [(by_id[r["id"].replace("blackbox/", "whitebox/")], r) for r in rows
             if r["kind"] == "blackbox" and r["id"].replace("blackbox/", "whitebox/") in by_id]
    if not pairs:
        add("blackbox_not_below_whitebox", "skipped", "no black-box rows (evaluate with --source)")
    else:
        low = [f"{b['title']}: {b['accuracy']:.2%} < white box {w['accuracy']:.2%}"
               for w, b in pairs if b["accuracy"] < w["accuracy"] - BLACKBOX_TOL]
        add("blackbox_not_below_whitebox", "flagged" if low else "pass",
            "; ".join(low) if low else f"every black-box row >= its white-box row - {BLACKBOX_TOL:.0%}")
    return checks


def _large_eps(rows: list[dict]) -> dict:
    sanity = [r for r in rows if r["kind"] == "sanity"]
    if not sanity:
        return _check("large_eps_near_zero", "skipped", "no large-eps row (suite paper or full)")
    s = sanity[0]
    bad = s["accuracy"] > LARGE_EPS_MAX_ACC
    return _check("large_eps_near_zero", "flagged" if bad else "pass",
                  f"PGD-{s['steps']} with eps {s['eps']:g}: {s['accuracy']:.2%} "
                  f"({'above' if bad else 'at most'} {LARGE_EPS_MAX_ACC:.0%})")


def _autoattack(rows: list[dict]) -> dict:
    aa = next((r for r in rows if r["id"] == "autoattack"), None)
    strongest = _strongest_pgd(rows)
    if aa is None or strongest is None:
        return _check("autoattack_vs_pgd", "skipped", "no AutoAttack row (suite full)" if aa is None else "no PGD row")
    gap = strongest["accuracy"] - aa["accuracy"]
    return _check("autoattack_vs_pgd", "flagged" if gap > AA_GAP else "pass",
                  f"AutoAttack {aa['accuracy']:.2%} vs PGD-{strongest['steps']} {strongest['accuracy']:.2%} "
                  f"(gap {gap * 100:.2f} points, limit {AA_GAP * 100:g})")


def _restarts(rows: list[dict]) -> dict:
    """More random starts must not lower accuracy below the single start's 95% interval: if they do,
    where PGD ends depends on where it starts, so one start understates what the attack can do."""
    by_key = {(r["loss"], r["steps"], r["eps"]): r for r in rows if r["kind"] == "whitebox"}
    pairs = [(by_key[k], r) for r in rows if r["kind"] == "restarts"
             and (k := (r["loss"], r["steps"], r["eps"])) in by_key]
    if not pairs:
        return _check("restarts_stable", "skipped", "no restarts row (suite paper or full)")
    low = [(b, r) for b, r in pairs if r["accuracy"] < b["ci95"][0]]
    detail = "; ".join(f"{r['restarts']} restarts {r['accuracy']:.2%} vs {b['restarts']} "
                       f"{b['accuracy']:.2%} (95% CI {b['ci95'][0]:.2%}-{b['ci95'][1]:.2%}) of "
                       f"{_name(r)}-{r['steps']}" for b, r in (low or pairs))
    return _check("restarts_stable", "flagged" if low else "pass", detail)


def _targeted(rows: list[dict]) -> dict:
    t = next((r for r in rows if r["kind"] == "whitebox" and r["loss"] == "targeted"), None)
    strongest = _strongest_pgd(rows)
    if t is None or strongest is None:
        return _check("targeted_vs_pgd", "skipped", "no targeted row (suite full)" if t is None else "no PGD row")
    gap = strongest["accuracy"] - t["accuracy"]
    return _check("targeted_vs_pgd", "flagged" if gap > AA_GAP else "pass",
                  f"targeted PGD-{t['steps']} (top {t['targets']} classes) {t['accuracy']:.2%} vs PGD-"
                  f"{strongest['steps']} {strongest['accuracy']:.2%} (gap {gap * 100:.2f} points, limit "
                  f"{AA_GAP * 100:g})")


def _transfer(rows: list[dict]) -> dict:
    """Adversaries of an undefended model must fool the evaluated model less than its own gradients do."""
    by_key = {(r["loss"], r["steps"], r["eps"]): r for r in rows if r["kind"] == "whitebox"}
    pairs = [(by_key[k], r) for r in rows if r["kind"] == "transfer"
             and (k := (r["loss"], r["steps"], r["eps"])) in by_key]
    if not pairs:
        return _check("transfer_weaker_than_whitebox", "skipped", "no transfer row (evaluate with --transfer-from)")
    w, t = pairs[0]
    bad = t["accuracy"] < w["accuracy"] - BLACKBOX_TOL
    return _check("transfer_weaker_than_whitebox", "flagged" if bad else "pass",
                  f"transfer {t['accuracy']:.2%} vs white box {w['accuracy']:.2%} ({_name(t)}-{t['steps']}; "
                  f"limit {BLACKBOX_TOL:.0%} below)")


def _name(r: dict) -> str:
    return {"ce": "PGD", "cw": "CW"}.get(r["loss"], r["loss"])


def independent_source_check(source: dict, target: dict) -> dict:
    """The black-box source should be an independently trained copy: same preset, another seed
    (``source`` / ``target``: the two checkpoints' identities)."""
    same_seed = source["seed"] == target["seed"]
    return {"name": "independent_source", "status": "flagged" if same_seed else "pass",
            "detail": f"source seed {source['seed']}, target seed {target['seed']}; source preset "
                      f"{source['preset']!r}, target {target['preset']!r}"}


def masking_suspected(checks: list[dict]) -> bool:
    return any(c["status"] == "flagged" for c in checks)
