"""Standard benchmarks through lm-evaluation-harness (evaluation/benchmarks.py, issue 27): the evaluator's numbers are
the harness's own, the project's choice scorer agrees with it, a run records them before and after with the paired
change, the tables show them, and a bad setting is one line at start-up."""

import copy
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import shared_folder

from transfer.config.benchmarks import TASKS_DIR
from transfer.config.checks import check_config
from transfer.config.compose import compose_config
from transfer.errors import TransferError
from transfer.evaluation import benchmarks
from transfer.models.load import load_model_and_tokenizer
from transfer.training.distributed import Trainee
from transfer.training.hardware import Hardware
from transfer.training.oom import MemoryPlan

LIMIT = 12  # items of each benchmark: enough for accuracies that are not all 0 or 1, a second or two on a CPU
CPU = Hardware(torch.device("cpu"), "fp32")


def data_folder() -> Path:
    return shared_folder() / "datasets" / "benchmarks"


def subject(model_args: list[str], names: list[str], limit: int = LIMIT):
    """What the evaluator reads of a run (evaluation.Subject): the config, the model in memory and its tokenizer."""
    cfg = compose_config([*model_args, f"eval/benchmarks=[{','.join(names)}]",
                          *(f"eval.benchmarks.{n}.limit={limit}" for n in names),
                          *(f"eval.benchmarks.{n}.data={data_folder()}" for n in names)])  # fmt: skip
    model, tokenizer = load_model_and_tokenizer(cfg.model, 64)
    trainee = Trainee(model, CPU.device)
    return SimpleNamespace(cfg=cfg, model=model, tokenizer=tokenizer, trainee=trainee, hardware=CPU,
                           plan=MemoryPlan(cfg, CPU))  # fmt: skip


MODELS = {"tiny": [], "stories260k": ["model=local", "model.name_or_path=${oc.env:TRANSFER_SHARED}/models/stories260k"]}


@pytest.fixture(scope="module")
def baseline():
    """model -> (its subject, the evaluator's results before training, the harness's own output per task): each
    model loaded and scored once, for the independent check and the choice scorer's comparison both."""
    scored, outputs = {}, {}
    harness = benchmarks.harness

    def keeping(model, tokenizer, bench, batch_size, hardware):
        found = harness(model, tokenizer, bench, batch_size, hardware)
        outputs[bench.task] = found
        return found

    def get(model: str):
        if model not in scored:
            outputs.clear()
            s = subject(MODELS[model], ["arc_easy", "piqa"])
            with pytest.MonkeyPatch.context() as patch:  # the evaluator as a run calls it, its harness output kept
                patch.setattr(benchmarks, "harness", keeping)
                results = benchmarks.run(s, "baseline")
            scored[model] = (s, results, dict(outputs))
        return scored[model]

    return get


@pytest.mark.parametrize("model", MODELS)
def test_in_memory_accuracies_equal_simple_evaluate_of_the_exported_folder(model, baseline, tmp_path):
    """The acceptance's independent check: lm_eval.simple_evaluate on the same weights saved to a folder (HFLM loads
    them itself, as `lm_eval --model hf` does) with the same task definitions gives the evaluator's numbers."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    s, ours, _ = baseline(model)
    s.model.save_pretrained(tmp_path)
    s.tokenizer.save_pretrained(tmp_path)
    tasks = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                        metadata={"benchmark_data": str(data_folder())})  # fmt: skip
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={tmp_path}", tasks=["transfer_arc_easy", "transfer_piqa"],
                             limit=LIMIT, device="cpu", batch_size=16, task_manager=tasks)["results"]  # fmt: skip
    for name, task in (("arc_easy", "transfer_arc_easy"), ("piqa", "transfer_piqa")):
        assert ours[f"bench_{name}"]["harness"]["items"] == LIMIT
        for metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
            assert ours[f"bench_{name}"][metric] == pytest.approx(theirs[task][f"{metric},none"], abs=1e-6)


def test_the_choice_scorer_and_the_harness_agree_on_arc_easy(baseline):
    """evaluation/choices.py, given the harness's prompts and choices (its tokens of each), picks the same answers:
    the same summed log-likelihoods, the same acc, and with the harness's length normalisation (by the characters of
    the choice as written, without the space before it) the same acc_norm."""
    from lm_eval.models.huggingface import HFLM

    from transfer.data.sequences import Sequences
    from transfer.evaluation.choices import choice_metrics, choice_scores

    s, ours, found = baseline("tiny")  # the harness's items and answers as the evaluator's run scored them
    items = sorted(found["transfer_arc_easy"]["samples"]["transfer_arc_easy"], key=lambda x: x["doc_id"])
    assert [len(item["arguments"]) for item in items] == [4] * LIMIT  # the first 12 ARC-Easy questions: 4 choices
    assert [item["acc"] for item in items] == ours["bench_arc_easy"]["per_item"]["acc"]
    lm = HFLM(pretrained=s.model, tokenizer=copy.deepcopy(s.tokenizer))
    ids, labels = [], []
    for item in items:
        for context, continuation in item["arguments"]:
            before, answer = lm._encode_pair(context, continuation)
            ids.append(before + answer)
            labels.append([-100] * len(before) + answer)
    scores = choice_scores(s.model, Sequences.from_lists(ids, labels), 4, 16, CPU, s.tokenizer.pad_token_id)
    harness = torch.tensor([[r[0][0] for r in item["resps"]] for item in items], dtype=torch.float64)
    torch.testing.assert_close(scores, harness, atol=1e-4, rtol=0)
    gold = torch.tensor([item["target"] for item in items])
    assert choice_metrics(scores, gold)["accuracy"] == np.mean([item["acc"] for item in items])
    # the choice's own characters, as the data writes it: not the space the prompt puts before it
    characters = torch.tensor([[len(c) for c in item["doc"]["choices"]["text"]] for item in items], dtype=torch.float64)
    assert choice_metrics(scores / characters, gold)["accuracy"] == np.mean([item["acc_norm"] for item in items])


RUN = [
    "max_steps=4", "eval_interval=0", "block_size=32", "micro_batch_size=4", "eval_batch_size=16",
    "eval.max_tokens=512", "eval/probes=[]", "eval.max_new_tokens=2", "hardware.estimate_memory=false",
    "checkpoint.enabled=false", "optimizer.lr=3e-3", "eval/benchmarks=[arc_easy]", f"eval.benchmarks.arc_easy.limit={LIMIT}",
]  # fmt: skip


def test_a_run_records_each_benchmark_before_and_after_with_the_paired_change_and_the_tables_show_it(tmp_path):
    import pandas as pd

    from transfer.aggregate.jobs import eval_columns
    from transfer.aggregate.tables import default_columns
    from transfer.run import run_experiment

    record = run_experiment(compose_config([*RUN, f"eval.benchmarks.arc_easy.data={data_folder()}"]), tmp_path, {})
    before, after = record["eval"]["baseline"]["bench_arc_easy"], record["eval"]["final"]["bench_arc_easy"]
    for result in (before, after):
        assert result["harness"]["version"] == version("lm_eval")
        assert result["harness"]["items"] == LIMIT and len(result["per_item"]["acc"]) == LIMIT
        assert len(result["harness"]["config_hash"]) == len(result["harness"]["task_hash"]) == 64
        assert result["acc"] == pytest.approx(np.mean(result["per_item"]["acc"]))
    assert before["harness"]["task_hash"] == after["harness"]["task_hash"]  # the same items, prompts and targets
    assert after["per_item"]["acc_norm"] != before["per_item"]["acc_norm"]  # training moved some answers
    for metric in ("acc", "acc_norm"):
        differences = np.array(after["per_item"][metric]) - np.array(before["per_item"][metric])
        assert after[f"{metric}_change_points"] == pytest.approx(100 * differences.mean())
        assert after[f"{metric}_change_points_stderr"] == pytest.approx(100 * differences.std(ddof=1) / LIMIT**0.5)
        assert record["eval"]["change"]["bench_arc_easy"][metric] == pytest.approx(after[metric] - before[metric])
    assert set(record["eval"]["change"]["bench_arc_easy"]) == {"acc", "acc_norm"}  # no change of a standard error
    table = pd.DataFrame([eval_columns(record["eval"])])
    shown = [c for c in default_columns(table) if c.startswith("bench_")]
    assert shown == ["bench_arc_easy_acc_before", "bench_arc_easy_acc_after", "bench_arc_easy_acc_change_points_after",
                     "bench_arc_easy_acc_change_points_stderr_after"]  # fmt: skip
    assert table["bench_arc_easy_acc_after"][0] == after["acc"]
    assert table["bench_arc_easy_acc_change_points_stderr_after"][0] == after["acc_change_points_stderr"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval/benchmarks=[arc_easyy]"], "unknown eval/benchmarks 'arc_easyy'; allowed: arc_challenge, arc_easy, mmlu,"),
        (["eval.benchmarks.arc_easy.limit=0"], "eval.benchmarks.arc_easy.limit=0: allowed a number of items >= 1"),
        (["eval.benchmarks.arc_easy.task=arc_easy"], "eval.benchmarks.arc_easy.task='arc_easy' is not a task; allowed: "
         "transfer_arc_challenge, transfer_arc_easy, transfer_mmlu, transfer_piqa, transfer_winogrande"),
        (["eval.benchmarks.arc_easy.num_fewshot=-1"], "eval.benchmarks.arc_easy.num_fewshot=-1: allowed 0 or more"),
        (["eval.benchmarks.arc_easy.data=/nonexistent"], "eval.benchmarks.arc_easy.data='/nonexistent' holds no "
         "arc/arc_easy_validation.jsonl"),
    ],
)  # fmt: skip
def test_a_bad_benchmark_setting_is_one_line_naming_it_and_what_is_allowed(overrides, message):
    with pytest.raises(TransferError) as e:
        check_config(compose_config(["eval/benchmarks=[arc_easy]", *overrides]))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_shipped_tasks_prompt_as_the_harness_own_and_mmlu_has_every_subject():
    """Our task files read local data; what they ask and how they score is the harness's own task's, field for field
    (a harness upgrade that changes a prompt fails here); MMLU's 57 subjects are those of the dev split."""
    import inspect
    import json

    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    theirs = Path(lm_eval.__file__).parent / "tasks"
    same = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "description")
    pairs = [("arc_easy.yaml", "arc/arc_easy.yaml"), ("piqa.yaml", "piqa/piqa.yaml"),
             ("winogrande.yaml", "winogrande/default.yaml"), ("mmlu/anatomy.yaml", "mmlu/default/mmlu_anatomy.yaml")]  # fmt: skip
    source = lambda v: inspect.getsource(v) if callable(v) else v  # noqa: E731 (winogrande's are functions)
    for ours, harness in pairs:
        a, b = load_yaml(TASKS_DIR / ours), load_yaml(theirs / harness)
        assert {k: source(a.get(k)) for k in same} == {k: source(b.get(k)) for k in same}, ours
    subjects = {json.loads(line)["subject"] for line in (data_folder() / "mmlu" / "mmlu_dev.jsonl").open()}
    assert {p.stem for p in (TASKS_DIR / "mmlu").glob("[!_]*.yaml")} - {"mmlu"} == subjects and len(subjects) == 57
