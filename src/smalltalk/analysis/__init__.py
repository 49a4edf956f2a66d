"""Routing analyses and baselines of a finished run (paper §3.4, App. C; `smalltalk analyze`).

    prefix_length.py   mixture test ppl vs routing prefix M-hat, dense line, other partitions (Fig. 4b, 6)
    router_size.py     runs partitioned by routers of different sizes: ppl and partition agreement (Fig. 4a)
    tfidf.py           TF-IDF -> truncated SVD -> balanced k-means router (the c-BTM recipe)
    tfidf_baseline.py  experts trained on the TF-IDF clusters, routed by nearest centroid (Fig. 4c)
    random_shards.py   experts on random equal shards, routing for themselves (control)
    specialisation.py  per expert: shares, top domains, NMI with domains, ppl vs dense (Fig. 5)

    kmeans.py          balanced k-means with an exact capacity-constrained assignment step
    partitions.py      agreement after matching experts, adjusted Rand, NMI
    scores.py          per-sequence expert / dense scores of a test split, cached
    runs.py            a run directory as the analyses see it
    derived.py         baseline partitions as expert shards + a derived run trained like the run's experts
    baselines.py       what the TF-IDF and random-shard baselines share (comparison with EM, bootstrap)
    output.py          <run>/analysis/<name>/{result.json, table.md, <name>.png, section.md}

Domain labels are read here for analysis only; no routing decision uses them.
"""
