"""leanserve: an OpenAI-compatible LLM inference server built to cut serving cost."""

import os

# torch's OpenMP workers spin-wait by default; on a shared 2-core host a spinning worker starves the
# neighbour and ran ~6x slower under load. Must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
