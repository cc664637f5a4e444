"""transfer: honest, comparable transfer-learning experiments on causal language models."""

import time

__version__ = "0.1.0"
# When this process began to run transfer: the start of the start-up time in the run record.
STARTED = time.perf_counter()
