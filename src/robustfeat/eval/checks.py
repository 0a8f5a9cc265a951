"""The validity checks of an evaluation: signs of gradient masking in a result's rows, and whether a
black-box source is independent of the evaluated model.

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
    4. AutoAttack not more than AA_GAP below the strongest white-box PGD row.
    """
    by_id = {r["id"]: r for r in rows}
    checks = []

    def add(name: str, status: str, detail: str) -> None:
        checks.append({"name": name, "status": status, "detail": detail})

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

    sanity = [r for r in rows if r["kind"] == "sanity"]
    if not sanity:
        add("large_eps_near_zero", "skipped", "no large-eps row (suite paper or full)")
    else:
        s = sanity[0]
        bad = s["accuracy"] > LARGE_EPS_MAX_ACC
        add("large_eps_near_zero", "flagged" if bad else "pass",
            f"PGD-{s['steps']} with eps {s['eps']:g}: {s['accuracy']:.2%} "
            f"({'above' if bad else 'at most'} {LARGE_EPS_MAX_ACC:.0%})")

    aa = by_id.get("autoattack")
    wb_pgd = [r for r in rows if r["kind"] == "whitebox" and r["loss"] == "ce"]
    if aa is None or not wb_pgd:
        add("autoattack_vs_pgd", "skipped", "no AutoAttack row (suite full)" if aa is None else "no PGD row")
    else:
        strongest = max(wb_pgd, key=lambda r: r["steps"])
        gap = strongest["accuracy"] - aa["accuracy"]
        bad = gap > AA_GAP
        add("autoattack_vs_pgd", "flagged" if bad else "pass",
            f"AutoAttack {aa['accuracy']:.2%} vs PGD-{strongest['steps']} {strongest['accuracy']:.2%} "
            f"(gap {gap * 100:.2f} points, limit {AA_GAP * 100:g})")
    return checks


def independent_source_check(source: dict, target: dict) -> dict:
    """The black-box source should be an independently trained copy: same preset, another seed
    (``source`` / ``target``: the two checkpoints' identities)."""
    same_seed = source["seed"] == target["seed"]
    return {"name": "independent_source", "status": "flagged" if same_seed else "pass",
            "detail": f"source seed {source['seed']}, target seed {target['seed']}; source preset "
                      f"{source['preset']!r}, target {target['preset']!r}"}


def masking_suspected(checks: list[dict]) -> bool:
    return any(c["status"] == "flagged" for c in checks)
