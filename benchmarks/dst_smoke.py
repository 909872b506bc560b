"""D-ST smoke run on 3000 Fashion-MNIST images (BadNets a2o 10%), FCT split replaced by the ground truth split
(poisoned part = 5% of poison, clean part = 20% clean), tiny budget: does the classifier stage at lr 5 train?"""
import json, time
import numpy as np
from backdoor_engine import api
from backdoor_engine.data.attacks import harness
from backdoor_engine.data.fashion_mnist import load_fashion_mnist
from backdoor_engine.detection import CLEAN, POISONED, UNCERTAIN

train = load_fashion_mnist("train")
index = np.sort(np.random.default_rng(0).choice(len(train), 3000, replace=False))
spec = harness.PoisonSpec(attack="badnets", mode="a2o", rate=0.1, target=0, seed=0)
poisoned, _ = harness.poison(train.subset(index), spec)
truth = poisoned.poison.astype(bool)
rng = np.random.default_rng(0)
split = np.full(len(poisoned), UNCERTAIN, np.int8)
split[rng.choice(np.flatnonzero(truth), 150, replace=False)] = POISONED
split[rng.choice(np.flatnonzero(~truth), 600, replace=False)] = CLEAN
test = load_fashion_mnist("test")
for lr in (5.0, 0.5):
    t0 = time.time()
    r = api.purify(None, None, poisoned, split, strategy="d-st", arch="small_resnet", progress=False,
                   encoder_epochs=4, warmup_epochs=1, encoder_batch_size=256, classifier_batch_size=256,
                   classifier_lr=lr)
    m = api.evaluate(r.model, r.normalisation, test, spec, num_classes=10)
    print(json.dumps({"classifier_lr": lr, "s": round(time.time() - t0), **m,
                      "history": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()} for h in r.history]}), flush=True)
