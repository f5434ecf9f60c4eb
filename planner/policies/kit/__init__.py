"""What the peer policies share, so that none imports another (docs/architecture.md, Layers).

``blocks``: aligned GPU blocks of one plan and the rule for choosing one;
``timing``: costs per (model, shape, batch) and SP degree, the parallel-efficiency rule;
``rounds``: deadline order, a round's steps, latent-move estimates, on-track degrees;
``knapsack``: TetriServe's group knapsack over GPUs;
``packing``: whether blocks of given degrees fit the free aligned blocks, by counts.
"""
