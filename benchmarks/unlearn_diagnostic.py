"""Diagnostic (issue 13, not a benchmark row): which unlearning loss moves the eval-mode model on Blend a2o's
poisoned images? The ground-truth poison is split 80 / 20: the pass unlearns the 80% and relearns the clean part
(D-BR's optimiser, lr 1e-4, un-augmented unlearning); after each epoch the eval-mode accuracy (given labels) on the
unlearned 80%, on the held-out 20% (what the pass never saw: an unbiased attack-success estimate from the training
split) and on 1,000 clean training images. No test data is read.

    PYTHONPATH=. python benchmarks/unlearn_diagnostic.py margin_frozen [threads]    # or ce_train, margin_train, ...
"""
import copy
import dataclasses
import json
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from bench_flare_detection import scanned_set
from backdoor_engine.models.checkpoint import load_checkpoint
from backdoor_engine.models.train import make_scheduler, train_epoch
from backdoor_engine.models.evaluate import accuracy, predict
from backdoor_engine.purify.unlearn_relearn import given_label_margin as margin, unlearn_relearn_config
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
model0, meta = load_checkpoint(sys.argv[3] if len(sys.argv) > 3 else "runs/attacks/blend-a2o-10000-e6.pt")
ds, _ = scanned_set(meta, 0)
norm = meta["normalisation"]
poison = np.flatnonzero(ds.poison.astype(bool)); clean = np.flatnonzero(~ds.poison.astype(bool))
rng = np.random.default_rng(0); rng.shuffle(poison)
hold, unl = poison[: len(poison) // 5], poison[len(poison) // 5:]
kept_probe = clean[:1000]
y = torch.from_numpy(ds.y.astype(np.int64))


def run(name, frozen, objective=None, ascend=True, lr=1e-4):
    cfg = unlearn_relearn_config(lr=lr)
    m = copy.deepcopy(model0)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=.9, weight_decay=5e-4)
    sched = make_scheduler(opt, cfg, 10**6)
    ucfg = dataclasses.replace(cfg, augment=False)
    for ep in range(1, 4):
        t0 = time.time()
        u = train_epoch(m, ds.x[unl], y[unl], optimizer=opt, scheduler=sched, normalisation=norm, config=ucfg,
                        generator=g, ascend=ascend, frozen_batchnorm=frozen, objective=objective)
        r = train_epoch(m, ds.x[clean], y[clean], optimizer=opt, scheduler=sched, normalisation=norm, config=cfg, generator=g)
        fa = accuracy(predict(m, ds.x[unl], norm, batch_size=256), ds.y[unl])
        ha = accuracy(predict(m, ds.x[hold], norm, batch_size=256), ds.y[hold])
        ka = accuracy(predict(m, ds.x[kept_probe], norm, batch_size=256), ds.y[kept_probe])
        print(json.dumps({"variant": name, "epoch": ep, "unlearn_loss": round(u["loss"], 4), "flagged_acc": fa,
                          "heldout_flagged_acc": ha, "kept_acc": ka, "s": round(time.time() - t0)}), flush=True)


VARIANTS = {"margin_frozen": dict(frozen=True, objective=margin, ascend=False),
            "margin_train": dict(frozen=False, objective=margin, ascend=False),
            "ce_frozen": dict(frozen=True), "ce_frozen_lr1e-3": dict(frozen=True, lr=1e-3), "ce_train": dict(frozen=False)}
if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
    sys.exit(f"usage: unlearn_diagnostic.py {'|'.join(VARIANTS)} [threads] [checkpoint]")
run(sys.argv[1], **VARIANTS[sys.argv[1]])
