"""What a run is judged on: perplexity (perplexity.py), choices (choices.py), generated samples (samples.py).

Every evaluator returns {metric: value}; DIRECTION says which way each metric improves, for
picking the best weights, early stopping, sorting tables and plots.
"""

DIRECTION = {"loss": "min", "perplexity": "min", "accuracy": "max", "auc": "max", "log_loss": "min",
             "reward_accuracy": "max", "margin": "max"}  # fmt: skip
