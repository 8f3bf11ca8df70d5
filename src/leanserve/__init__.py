"""leanserve: an OpenAI-compatible LLM inference server built to cut serving cost."""

import os

# torch's OpenMP workers spin-wait by default; on a shared 2-core host a spinning worker starves the
# neighbour and ran ~6x slower under load. Fully passive workers, though, sleep between every two of a
# decode step's few hundred parallel regions, and waking them doubled a batch-1 step (INT4: 16.1 vs
# 8.7 ms). So: passive, but spin 10k iterations first, which bridges the gaps inside a step and still
# yields an idle core (libgomp: an explicit GOMP_SPINCOUNT wins over the policy's; benchmarks/RESULTS.md,
# "Single stream as served"). Both must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"
