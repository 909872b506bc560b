"""The cover floor: what the TPR / FPR targets cost where an all-to-one attack adds cover samples, from the
poisoning's draw alone (no model, no scan, no image touched).

In an all-to-one set the poison drawn from the target class keeps its label and counts as poison (P_t of the P),
while the target class's cover samples (a trigger kept with the true label) count as clean (C_t of the N clean
samples), as backdoor-toolbox's cleanser.py counts them. A detector that cannot tell the two groups apart flags
them at the same expected rate q, whatever it reads. Then, even with every relabelled sample found:
- TPR >= t needs q >= (ceil(t P) - (P - P_t)) / P_t, which flags q C_t covers: FPR >= q C_t / N (the floor);
- FPR <= f allows q <= f N / C_t, so TPR <= (P - P_t + q P_t) / P (the ceiling).
Where the covers carry the poison's own training trigger, drawn the same way (Adaptive-Blend, Adaptive-Patch), no
detector can tell them apart and the bound holds for every detector; where they carry another trigger (IAD's
cross-trigger: another image's pattern; WaNet's noise mode: a perturbed warp) it holds only for a detector that
does not separate them (COVER_TRIGGER says which).

    python benchmarks/cover_floor.py --attacks adaptive_blend adaptive_patch wanet --rates 0.02 0.05 0.1 \
        --seeds 0 1 2 3 4 5 6 7 8 9 --out runs/cover_floor.jsonl
    python benchmarks/cover_floor.py --attacks iad --param generator=IAD-TRIGGER.npz --seeds 0 6 8 --out ...

One JSON line per attack x rate x subset seed (the 10k subset train_attacks.py draws with that seed), then a
summary per attack x rate: the floor's range over the seeds and how many seeds put the target out of reach.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from backdoor_engine.cli import _parse_param
from backdoor_engine.data.attacks import draw_samples, harness
from backdoor_engine.data.fashion_mnist import load_fashion_mnist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_attacks import subset  # noqa: E402

# What each attack's covers carry, beside its poison's training trigger; "same" = drawn as the poison's is.
COVER_TRIGGER = {
    "adaptive_blend": "same",  # apply_cover is the training-time partial blend
    "adaptive_patch": "same",  # apply_cover is the training-time partial, low-opacity patch
    "iad": "another image's trigger (cross-trigger)",
    "wanet": "a noise-perturbed warp (noise mode)",
}


def cover_floor(n_poison: int, n_own: int, n_target_covers: int, n_clean: int, *, tpr: float = 0.98,
                fpr: float = 0.01) -> dict:
    """The floor and ceiling above for one set: `n_own` = P_t, `n_target_covers` = C_t, `n_clean` = N."""
    if min(n_poison, n_own, n_target_covers, n_clean) < 0 or n_own > n_poison or n_poison == 0 or n_clean == 0:
        raise ValueError(f"counts: expected 0 <= P_t <= P, P > 0, N > 0, C_t >= 0; got P={n_poison}, "
                         f"P_t={n_own}, C_t={n_target_covers}, N={n_clean}")
    needed = max(0, math.ceil(round(tpr * n_poison, 9)) - (n_poison - n_own))
    share = needed / n_own if n_own else 0.0  # needed > 0 with P_t = 0 cannot happen: P - P_t = P >= tpr P
    fpr_floor = share * n_target_covers / n_clean
    allowed = 1.0 if n_target_covers == 0 else min(1.0, fpr * n_clean / n_target_covers)
    tpr_ceiling = (n_poison - n_own + allowed * n_own) / n_poison
    return {"share_needed": share, "fpr_floor": fpr_floor, "tpr_ceiling": tpr_ceiling,
            "reachable": bool(fpr_floor <= fpr + 1e-12)}


def row_for(train, spec: harness.PoisonSpec, *, tpr: float, fpr: float) -> dict:
    attack = harness.build_attack(spec, train.image_shape)
    payload, cover = draw_samples(train.y, attack, rate=spec.rate, target=spec.target,
                                  num_classes=train.num_classes, seed=spec.seed)
    y = np.asarray(train.y)
    n_poison, n_clean = len(payload), len(y) - len(payload)
    own = int((y[payload] == spec.target).sum())
    target_covers = int((y[cover] == spec.target).sum())
    return {"attack": spec.attack, "mode": spec.mode, "rate": spec.rate, "seed": spec.seed, "n": len(y),
            "n_poison": n_poison, "n_own": own, "n_cover": len(cover), "n_target_covers": target_covers,
            "n_clean": n_clean, "covers_carry": COVER_TRIGGER.get(spec.attack, "-"),
            "tpr_target": tpr, "fpr_target": fpr,
            **cover_floor(n_poison, own, target_covers, n_clean, tpr=tpr, fpr=fpr)}


def summary(rows: list[dict]) -> list[str]:
    lines = ["| attack | rate | covers carry | seeds | P_t | C_t | FPR floor at TPR target | TPR ceiling at FPR target "
             "| seeds out of reach |", "|---|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["attack"], r["rate"]) for r in rows):
        group = [r for r in rows if (r["attack"], r["rate"]) == key]

        def span(name, scale=1, digits=0):
            values = [scale * r[name] for r in group]
            return f"{min(values):.{digits}f}-{max(values):.{digits}f}"
        lines.append(f"| {key[0]} | {key[1]:g} | {group[0]['covers_carry']} | {len(group)} | {span('n_own')} | "
                     f"{span('n_target_covers')} | {span('fpr_floor', 100, 2)}% | {span('tpr_ceiling', 100, 1)}% | "
                     f"{sum(not r['reachable'] for r in group)} |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", nargs="+", default=["adaptive_blend", "adaptive_patch", "wanet"])
    p.add_argument("--rates", nargs="+", type=float, default=[0.1])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--tpr", type=float, default=0.98, help="the TPR target (issue 17: 0.98)")
    p.add_argument("--fpr", type=float, default=0.01, help="the FPR target (issue 17: 0.01 where implanted)")
    p.add_argument("--param", action="append", default=[], help="attack parameter NAME=VALUE (iad: generator=FILE)")
    p.add_argument("--out", help="JSON lines, appended")
    args = p.parse_args(argv)
    full = load_fashion_mnist("train")
    rows = []
    for seed in args.seeds:
        train = subset(full, args.train_size, seed)
        for attack in args.attacks:
            for rate in args.rates:
                spec = harness.PoisonSpec(attack=attack, mode="a2o", rate=rate, target=args.target, seed=seed,
                                          params=dict(_parse_param(t) for t in args.param))
                rows.append(row_for(train, spec, tpr=args.tpr, fpr=args.fpr))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print("\n".join(summary(rows)))
    return rows


if __name__ == "__main__":
    main()
