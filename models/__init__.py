"""What is being served: model catalog, GPU kinds, profiles and the cost model.

Everything here except the ``models.torch`` subpackage imports without torch.
"""
