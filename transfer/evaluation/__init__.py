"""What a run is judged on: perplexity (perplexity.py), choices (choices.py), generated samples (samples.py).

Every evaluator returns {metric: value}; DIRECTION says which way each metric improves, for
picking the best weights, early stopping, sorting tables and plots.
"""

DIRECTION = {"loss": "min", "perplexity": "min", "accuracy": "max", "auc": "max", "log_loss": "min",
             "reward_accuracy": "max", "margin": "max"}  # fmt: skip


def my_batches(seqs, batch_size: int, pad_id: int, desc: str):
    """(number, batch) of this process's share of a split's evaluation batches (all of them in one process),
    with a progress bar on rank 0; number None: a batch run again uncounted (distributed.my_batches)."""
    from tqdm.auto import tqdm

    from transfer.data.sequences import evaluation_batches
    from transfer.training import distributed

    count = -(-len(seqs) // batch_size)
    mine = distributed.my_batches(evaluation_batches(seqs, batch_size, pad_id), count)
    return tqdm(mine, total=distributed.share(count), desc=desc, leave=False, unit="batch",
                disable=distributed.bars_off())  # fmt: skip
