"""Classification as generation: score each choice's log-likelihood after the prompt.

For every example, each of the dataset's `choices` (e.g. "Yes", "No") is put in the
assistant's place and the log-probabilities of its tokens are summed. The choice with the
highest sum is the prediction; the sums, normalised over the choices, are the probabilities.
Accuracy, log-loss (the mean of -log p(gold)) and, for two choices, ROC-AUC with the first
choice as the positive class. The same evaluator scores multiple-choice questions.

Beside them, what a model that learned only the prior would score (config.objective.DESCRIPTIVE): each constant
answer's accuracy (the share of examples whose gold answer is that choice), the majority class's, and the share of
examples the model answers with each choice, with the largest of those shares. Accuracy at the majority accuracy
with a largest share near 1 is a model that gives one answer to everything.
"""

import torch

from transfer.data.sequences import Sequences
from transfer.evaluation import my_batches
from transfer.training import distributed
from transfer.training.loss import sequence_logprobs


@torch.no_grad()
def choice_scores(model, seqs: Sequences, n_choices: int, batch_size: int, hardware, pad_id: int,
                  desc: str = "choices") -> torch.Tensor:  # fmt: skip
    """[examples, choices]: each choice's summed log-probability; `seqs` holds example 0's choices, then 1's, ...

    In several processes each scores its share of the batches, and every process gets the whole table."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(seqs), dtype=torch.float64)
    for number, batch in my_batches(seqs, batch_size, pad_id, desc):
        batch = batch.to(hardware.device)
        with hardware.autocast():
            scores = sequence_logprobs(model, batch.input_ids, batch.labels, hardware.loss_chunk_tokens)
        if number is not None:
            sums[number * batch_size : number * batch_size + len(scores)] = scores.double().cpu()
    model.train(was_training)
    return distributed.summed(sums, "cpu").view(-1, n_choices)


def choice_metrics(scores: torch.Tensor, gold: torch.Tensor, names: list[str] | None = None) -> dict:
    """Accuracy, log-loss and (two choices) ROC-AUC from [examples, choices] log-likelihoods and gold indices; and
    what a constant answer scores and how the answers spread over the choices, by choice `names` (default "0", "1")."""
    probs = torch.softmax(scores.double(), dim=-1)
    picked = probs[torch.arange(len(gold)), gold]
    predicted = scores.argmax(-1)
    result = {
        "accuracy": float((predicted == gold).double().mean()),
        "log_loss": float(-picked.clamp_min(1e-300).log().mean()),
        "choice_examples": len(gold),
    }
    if scores.shape[1] == 2:
        result["auc"] = roc_auc(probs[:, 0], gold == 0)
    return result | spread(predicted, gold, names or [str(k) for k in range(scores.shape[1])])


def spread(predicted: torch.Tensor, gold: torch.Tensor, names: list[str]) -> dict:
    """Per choice the accuracy of always answering it (its share of the gold answers) and its share of the
    predictions; the majority class's accuracy and the largest share of predictions on one choice."""
    n = max(len(gold), 1)
    gold_share = torch.bincount(gold, minlength=len(names)).double() / n
    predicted_share = torch.bincount(predicted, minlength=len(names)).double() / n
    return {
        "constant_accuracy": {name: float(v) for name, v in zip(names, gold_share, strict=True)},
        "majority_accuracy": float(gold_share.max()),
        "predicted_share": {name: float(v) for name, v in zip(names, predicted_share, strict=True)},
        "max_predicted_share": float(predicted_share.max()),
    }


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """The probability that a random positive scores above a random negative (ties count half); None with one class.

    Mann-Whitney U from average ranks: O(n log n).
    """
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = torch.argsort(scores.double(), stable=True)
    sorted_scores = scores.double()[order]
    ranks = torch.empty(len(scores), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # tied scores share the mean of their ranks
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))
