"""Built-in scheduling policies; importing this package registers them by name.

``fcfs-sp1/2/4/8`` and ``rssp``: static-degree FCFS baselines (fcfs.py);
``edf``: round-based earliest deadline first (edf.py); ``tetriserve-dp``:
TetriServe's group-knapsack DP (tetriserve.py). All place work with
``blocks.BlockAllocator``.
"""
from ditplan.planner.policies import edf, fcfs, tetriserve  # noqa: F401  (register)
from ditplan.planner.policies.base import Policy, make_policy, policy_names, register

__all__ = ["Policy", "make_policy", "policy_names", "register"]
from ditplan.planner.policies import genserve  # noqa: E402,F401  (register: genserve)
from ditplan.planner.policies import solver  # noqa: F401,E402  (registers cpsat, milp, milp-highs)
from ditplan.planner.policies import hetu_ilp  # noqa: E402,F401  (register: hetu-ilp)
