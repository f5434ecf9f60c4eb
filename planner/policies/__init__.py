"""Built-in scheduling policies; importing this package registers them by name.

Peers, each written from its paper and sitting side by side on ``kit/`` (none
imports another): ``fcfs-sp1/2/4/8`` and ``rssp``, static-degree FCFS
baselines (fcfs.py); ``edf``, round-based earliest deadline first (edf.py);
``tetriserve-dp``, TetriServe's group-knapsack DP (tetriserve.py);
``genserve`` (genserve.py); ``hetu-ilp``, Hetu-DiT's ILP dispatcher
(hetu_ilp.py); ``patchedserve`` (per-GPU CSP batches by slack), ``nirvana-like`` (one resolution per
batch) and ``distrifusion`` (each request over a whole node) (patchedserve.py). Peers run on a static
placement (static.py). The schedule model's policies: ``cpsat``, ``cpsat-nocsp`` (no CSP batches),
``milp``, ``milp-highs`` (solver.py).
"""
from ditplan.planner.policies import (edf, fcfs, genserve, hetu_ilp, patchedserve, solver,  # noqa: F401  (register)
                                      tetriserve)
from ditplan.planner.policies.base import Policy, make_policy, policy_names, register

__all__ = ["Policy", "make_policy", "policy_names", "register"]
