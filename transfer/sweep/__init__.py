"""Sweeps: launchers, the Optuna search, the output lock, the Hydra callback."""
