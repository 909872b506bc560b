#!/usr/bin/env python
"""How the openTSNE embedding's scale moves with N (issue 14, TRAP's eps): Fashion-MNIST pixels, PCA 50, t-SNE
(perplexity 30, openTSNE defaults); per N: std of the embedding, median distance to the 50th neighbour, and how
many DBSCAN(eps=3, min_samples=50) clusters form.

    python benchmarks/tsne_scale.py 2000 5000 10000 20000 50000
"""
import json, time, sys
import numpy as np
from sklearn.decomposition import PCA
from backdoor_engine import cluster
from backdoor_engine.data.fashion_mnist import load_fashion_mnist

train = load_fashion_mnist("train")
rng = np.random.default_rng(0)
for n in [int(a) for a in sys.argv[1:]]:
    index = np.sort(rng.choice(len(train), n, replace=False))
    x = train.x[index].reshape(n, -1).astype(np.float32) / 255
    z = PCA(50, random_state=0).fit_transform(x).astype(np.float32)
    t0 = time.perf_counter()
    e = cluster.tsne(z, random_state=0)
    s = time.perf_counter() - t0
    _, d = cluster.knn(e, 51)
    labels = cluster.dbscan(e, eps=3.0, min_samples=50)
    print(json.dumps({"n": n, "tsne_s": round(s, 1), "std": float(e.std(0).mean()), "extent": float(np.ptp(e, 0).mean()),
                      "median_nn50": float(np.median(d[:, -1])), "median_nn1": float(np.median(d[:, 1])),
                      "dbscan_clusters": int(labels.max() + 1), "noise": int((labels < 0).sum())}), flush=True)
