"""`hydra/sweeper=optuna`: a Hydra sweeper on Optuna's ask/tell API (see transfer/sweep/search.py).

Hydra imports every module of the `hydra_plugins` namespace at start-up to find its plugins:
nothing here imports Optuna before a search runs.
"""
