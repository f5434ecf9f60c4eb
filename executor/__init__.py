"""Torch executor (optional extra ``ditplan[executor]``): runs the plans on GPUs/CPUs.

Nothing on the planner side imports this package.
"""
