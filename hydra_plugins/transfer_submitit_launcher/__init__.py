"""`hydra/launcher=submitit_local` and `submitit_slurm` run to the end of every job (see launcher.py).

Hydra imports every module of the `hydra_plugins` namespace at start-up to find its plugins:
nothing here imports submitit before a sweep launches.
"""
