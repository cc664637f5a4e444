"""The project's own tiny pretrained model: `model=tiny`.

A 4-block Qwen2-architecture model (hidden 128, byte-level tokenizer), pretrained by
`python -m transfer.tiny.build` on English prose whose licences allow it (SOURCES.md).
Its weights ship here (`model.safetensors`, fp16, under 2 MB), so the default experiment
starts from a model that already knows general English: fine-tuning it on Rust shows a real
domain gain, and its held-out general text shows real forgetting. `model=tiny_random` is the
same shape with seeded random weights, for tests of mechanics.

The files are found through transfer.models.load (TINY_WEIGHTS, TINY_MANIFEST), which loads them; this package is
the command that builds them.
"""
