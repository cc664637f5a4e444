"""A sweep's shared cache: tokens and baselines computed once, reused only when nothing they depend on changed."""

import json

import pytest
import torch
from conftest import run_here, run_ok

from transfer import cache
from transfer.config.compose import compose_config
from transfer.data.blocks import text_blocks
from transfer.errors import TransferError
from transfer.models.load import byte_tokenizer, load_model_and_tokenizer
from transfer.record import read_record
from transfer.strategies import apply_strategy
from transfer.training import restore
from transfer.training.hardware import resolve

HIT, MISS = {"hits": 1, "misses": 0}, {"hits": 0, "misses": 1}  # of one entry, in the record's `cache`
TEXTS = ["Ownership moves a value.", "Borrowing lends it.", "Lifetimes say for how long."]


def _blocks(texts, tokenizer):
    return text_blocks(texts, tokenizer, 8, tokenizer.eos_token_id, keep_partial=True)


def test_tokens_are_kept_and_found_only_for_the_same_texts_and_tokenizer(tmp_path):
    tokenizer = byte_tokenizer()
    fresh = _blocks(TEXTS, tokenizer)
    with cache.use(tmp_path) as stats:
        first, again = _blocks(TEXTS, tokenizer), _blocks(TEXTS, tokenizer)
        assert stats["tokens"] == {"hits": 1, "misses": 1}
        _blocks([*TEXTS[:2], "Lifetimes say for how long!"], tokenizer)  # one character changed
        assert stats["tokens"] == {"hits": 1, "misses": 2}
        other = byte_tokenizer()
        other.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})  # another tokenizer definition
        _blocks(TEXTS, other)
        assert stats["tokens"] == {"hits": 1, "misses": 3}
    for kept in (first, again):
        assert torch.equal(kept.ids, fresh.ids) and torch.equal(kept.starts, fresh.starts)
    assert not cache.active()  # the block ends its use


def _function(strategy: str, cfg_overrides=(), adapt=lambda model: model) -> dict[str, str]:
    cfg = compose_config([f"strategy={strategy}", "block_size=32", *cfg_overrides])
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size)
    model, _ = apply_strategy(adapt(model), cfg.strategy, seed=cfg.seed)
    split = _blocks(TEXTS, tokenizer)
    return cache.model_function(model, {"validation": split}, resolve(cfg.hardware), len(tokenizer))


def test_the_model_enters_the_key_as_what_it_computes(tmp_path):
    """LoRA and IA3 start as the base model exactly; a re-initialised model or other weights do not: on a split's
    first tokens, and on the fixed ones that a benchmark's key holds in their place (no dataset's)."""
    full = _function("full")
    assert set(full) == {"validation", cache.FIXED}
    assert _function("lora") == _function("ia3") == full

    cfg = compose_config(["strategy=lora"])
    adapter, _ = apply_strategy(load_model_and_tokenizer(cfg.model, 32)[0], cfg.strategy, seed=cfg.seed)
    with torch.no_grad():  # as training leaves it: B no longer zero
        for name, p in adapter.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    adapter.save_pretrained(tmp_path / "parent")
    parent = _function("full", adapt=lambda model: restore._merged_adapter(model, tmp_path / "parent"))  # init_from
    for other in (_function("scratch"), _function("full", ["model=tiny_random"]), parent):
        assert other["validation"] != full["validation"] and other[cache.FIXED] != full[cache.FIXED]


SWEEP = ["max_steps=4", "eval_interval=0", "block_size=64", "eval.max_tokens=2048", "hardware.estimate_memory=false",
         "eval.probes.python_docs.max_tokens=2048", "eval.max_new_tokens=4", "checkpoint.enabled=false"]  # fmt: skip


def test_a_sweep_scores_each_baseline_once_and_reuses_it_exactly(tmp_path):
    run_ok(["-m", "strategy=full,lora,scratch", *SWEEP, "tables_after_sweep=false", "hydra.sweep.dir=sweep"], tmp_path)
    full, lora, scratch = (read_record(tmp_path / "sweep" / str(i)) for i in range(3))
    evaluators = ("objective", "probes", "samples")  # benchmarks: none asked for, nothing kept
    assert full["cache"] == {"tokens": {"hits": 0, "misses": 4}, "baseline": dict.fromkeys(evaluators, MISS)}
    assert lora["cache"] == {"tokens": {"hits": 4, "misses": 0}, "baseline": dict.fromkeys(evaluators, HIT)}
    assert scratch["cache"]["baseline"] == dict.fromkeys(evaluators, MISS)  # another function: scored anew
    assert (
        scratch["eval"]["baseline"]["validation"]["perplexity"]
        > 10 * full["eval"]["baseline"]["validation"]["perplexity"]
    )
    # that a reused baseline is the one a job measures without the cache, to the bit: tests/test_combinations.py
    keys = list((tmp_path / "sweep" / ".cache").glob("baseline-*.key.json"))
    assert len(keys) == 2 * len(evaluators) and all("function" in json.loads(k.read_text()) for k in keys)


JOB = ["max_steps=1", "eval_interval=0", "block_size=64", "eval.max_tokens=1024", "eval.max_new_tokens=2",
       "hardware.estimate_memory=false", "checkpoint.enabled=false", "logging.loggers=[]"]  # fmt: skip


def test_each_evaluator_keeps_its_own_baseline_so_a_probe_added_or_changed_reuses_the_objectives(tmp_path):
    """Jobs sharing a cache that differ in their probes: the objective's and the samples' baselines are found, the
    probes' scored; and what was found is what a job without the cache measures, to the bit."""
    cache_dir = f"cache.dir={tmp_path / 'cache'}"
    probe = ["eval/probes=[python_docs]", "eval.probes.python_docs.max_tokens=1024"]
    none = run_here([*JOB, "eval/probes=[]", cache_dir], tmp_path / "none")
    added = run_here([*JOB, *probe, cache_dir], tmp_path / "added")
    changed = run_here([*JOB, *probe, "eval.probes.python_docs.max_tokens=512", cache_dir], tmp_path / "changed")
    alone = run_here([*JOB, *probe], tmp_path / "alone")
    assert none["cache"]["baseline"] == {"objective": MISS, "samples": MISS}  # no probe: nothing of them kept
    assert (
        added["cache"]["baseline"] == changed["cache"]["baseline"] == {"objective": HIT, "probes": MISS, "samples": HIT}
    )
    assert alone["cache"] == {}
    assert added["eval"]["baseline"] == alone["eval"]["baseline"] and added["samples"] == alone["samples"]
    assert added["eval"]["baseline"]["validation"] == none["eval"]["baseline"]["validation"]
    # scored with its own setting: blocks of 64 tokens, 63 predicted in each
    assert changed["eval"]["baseline"]["ref_python_docs"]["tokens"] == 512 // 64 * 63
    assert added["eval"]["baseline"]["ref_python_docs"]["tokens"] == 1024 // 64 * 63
    entries = sorted(p.name.split("-")[1] for p in (tmp_path / "cache").glob("baseline-*[0-9a-f].json"))
    assert entries == ["objective", "probes", "probes", "samples"]


EVALUATED = ("objective", "benchmarks", "samples")


def test_a_benchmark_added_reuses_the_other_baselines(tmp_path, shared):
    """What the real runs met: a job that only added a benchmark scored validation, test and the probes again."""
    cache_dir, probe = f"cache.dir={tmp_path / 'cache'}", "eval.probes.python_docs.max_tokens=512"
    bench = ["eval/benchmarks=[arc_easy]", "eval.benchmarks.arc_easy.limit=2",
             f"eval.benchmarks.arc_easy.data={shared}/datasets/benchmarks"]  # fmt: skip
    plain = run_here([*JOB, probe, cache_dir], tmp_path / "plain")
    added = run_here([*JOB, probe, *bench, cache_dir], tmp_path / "added")
    assert plain["cache"]["baseline"] == {"objective": MISS, "probes": MISS, "samples": MISS}
    assert added["cache"]["baseline"] == {"objective": HIT, "probes": HIT, "benchmarks": MISS, "samples": HIT}
    assert added["eval"]["baseline"]["bench_arc_easy"]["harness"]["items"] == 2


def test_a_benchmarks_baseline_is_found_whatever_the_objective_and_dataset(tmp_path, shared):
    """What the real runs met: the same model and benchmark in an lm job and in an sft job of another dataset scored
    the benchmark twice. Found now, and what the sft job scores without the cache; other weights (scratch) score
    their own."""
    cache_dir, bench_of = f"cache.dir={tmp_path / 'cache'}", lambda record: record["eval"]["baseline"]["bench_arc_easy"]
    job = [*JOB, "eval/probes=[]", "eval/benchmarks=[arc_easy]", "eval.benchmarks.arc_easy.limit=2",
           f"eval.benchmarks.arc_easy.data={shared}/datasets/benchmarks"]  # fmt: skip
    sft = ["objective=sft", "dataset=self_instruct"]
    lm = run_here([*job, cache_dir], tmp_path / "lm")
    tuned = run_here([*job, *sft, cache_dir], tmp_path / "sft")
    alone = run_here([*job, *sft], tmp_path / "alone")
    scratch = run_here([*job, "strategy=scratch", cache_dir], tmp_path / "scratch")
    assert lm["cache"]["baseline"] == scratch["cache"]["baseline"] == dict.fromkeys(EVALUATED, MISS)
    assert tuned["cache"]["baseline"] == {"objective": MISS, "benchmarks": HIT, "samples": MISS}
    assert bench_of(tuned) == bench_of(alone) and bench_of(tuned)["harness"]["items"] == 2
    entries = sorted(p.name.split("-")[1] for p in (tmp_path / "cache").glob("baseline-*[0-9a-f].json"))
    assert entries == ["benchmarks"] * 2 + ["objective"] * 3 + ["samples"] * 3
    # the harness and the samples tokenize with the tokenizer: its definition is in their keys
    tokenizer = cache.tokenizer_digest(byte_tokenizer())
    for part in ("benchmarks", "samples"):
        assert {
            json.loads(k.read_text())["tokenizer"] for k in (tmp_path / "cache").glob(f"baseline-{part}-*.key.json")
        } == {tokenizer}


def test_the_cache_is_the_sweeps_unless_turned_off_or_moved(tmp_path):
    """Where a job keeps shared work (a run of a job without it: tests/test_combinations.py's single runs)."""
    from transfer.run import _cache_folder

    assert _cache_folder(compose_config([]), tmp_path / "sweep") == tmp_path / "sweep" / ".cache"
    assert _cache_folder(compose_config([]), None) is None  # a single run
    assert _cache_folder(compose_config(["cache.enabled=false"]), tmp_path / "sweep") is None
    assert (
        _cache_folder(compose_config([f"cache.dir={tmp_path / 'shared'}"]), tmp_path / "sweep") == tmp_path / "shared"
    )
    with cache.use(_cache_folder(compose_config(["cache.enabled=false"]), tmp_path / "sweep")) as stats:
        assert not cache.active() and _blocks(TEXTS, byte_tokenizer()) and stats == {}
    assert not (tmp_path / "sweep").exists()


# ---------------------------------------------------------------- entries that cannot be trusted
def test_a_baseline_edited_on_disk_is_computed_again_with_a_warning(tmp_path, caplog):
    key, calls = {"splits": "x"}, []

    def compute():
        calls.append(1)
        return {"validation": {"loss": 1.25, "perplexity": 3.49}}

    with cache.use(tmp_path) as stats:
        first, kept = cache.baseline(key, compute, "objective")
        assert cache.baseline(key, lambda: ["other"], "samples") == (["other"], False)  # the same key, another entry
        (entry,) = tmp_path.glob("baseline-objective-*[0-9a-f].json")
        entry.write_text(entry.read_text().replace("1.25", "0.5"))  # the loss edited, its checksum not
        again, kept_again = cache.baseline(key, compute, "objective")
        assert again == first and (kept, kept_again) == (False, False) and len(calls) == 2
        assert stats["baseline"] == {"objective": {"hits": 0, "misses": 2, "damaged": 1}, "samples": MISS}
        assert f"cache entry {entry} is damaged (its content differs from the checksum written with it)" in caplog.text
        entry.write_text(entry.read_text()[:20])  # cut short
        assert cache.baseline(key, compute, "objective") == (first, False)
        assert stats["baseline"]["objective"]["damaged"] == 2
        assert cache.baseline(key, compute, "objective") == (first, True)  # the entry written again is trusted again
        assert cache.baseline(key, lambda: ["other"], "samples") == (["other"], True)  # the other one never damaged


def test_token_entries_cut_short_or_pickled_are_computed_again_and_run_nothing(tmp_path, caplog):
    tokenizer = byte_tokenizer()
    fresh = _blocks(TEXTS, tokenizer)
    with cache.use(tmp_path) as stats:
        _blocks(TEXTS, tokenizer)
        (entry,) = tmp_path.glob("tokens-*.pt")
        data = entry.read_bytes()
        entry.write_bytes(data[: len(data) // 2])
        assert torch.equal(_blocks(TEXTS, tokenizer).ids, fresh.ids)
        # an entry that would build an object when loaded: refused by weights_only, never run
        torch.save({"ids": torch.tensor([1]), "starts": torch.tensor([0, 1]), "sha256": Exploit()}, entry)
        assert torch.equal(_blocks(TEXTS, tokenizer).ids, fresh.ids)
        torch.save({"ids": torch.tensor([1, 2]), "starts": torch.tensor([0, 2])}, entry)  # no checksum: not ours
        assert torch.equal(_blocks(TEXTS, tokenizer).ids, fresh.ids)
        assert stats["tokens"] == {"hits": 0, "misses": 4, "damaged": 3}
        assert torch.equal(_blocks(TEXTS, tokenizer).ids, fresh.ids) and stats["tokens"]["hits"] == 1
    assert not (tmp_path / "exploited").exists()
    assert caplog.text.count("is damaged") == 3


class Exploit:
    def __reduce__(self):
        return (open, ("exploited", "w"))


def test_writers_of_one_entry_never_share_a_temporary_file(tmp_path):
    """A second writer of the same entry, while the first is still writing: each writes its own temporary file, and
    the entry is whole (one of the two) when both are done."""
    path = tmp_path / "entry.pt"
    seen = []

    def first(f):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        cache.save_tensors(path, {"a": torch.arange(3)})  # the second writer, mid-way through the first
        f.write(b"")  # the first then ends its own write
        torch.save({"a": torch.arange(3), "sha256": cache._tensors_digest({"a": torch.arange(3)})}, f)

    cache._write(path, first)
    assert len(seen[0]) == 1 and seen[0][0].startswith(".entry.pt.")  # the first's own temporary file
    assert cache.load_tensors(path, ("a",), "x")["a"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["entry.pt"]  # no temporary file left behind


def test_a_cache_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(TransferError, match=r"cache.dir='.*file': .*file is a file, not a folder; allowed: a folder"):
        cache.start(tmp_path / "file")
    assert not cache.active()
