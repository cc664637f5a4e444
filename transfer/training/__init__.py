"""The training loop's components: loss, optimizer, distributed, memory, checkpoints, speed."""
