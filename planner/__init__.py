"""Decides: requests, cluster, plans, policies, the simulator and the CLI.

Imports and runs without torch.
"""
