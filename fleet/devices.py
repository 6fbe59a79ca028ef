"""Device strings: ``"auto"`` is resolved on the worker, where the GPU is known.

Every device default in fleet (the client's calls, ``DiLoCoConfig.device``, the CLI) is
:data:`AUTO`: a worker pinned to a GPU (``fleet worker --gpu N``: that GPU is its only
visible device) trains on ``"cuda"``, any other worker on ``"cpu"``. An explicit device
(``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) is passed to the workload as it is.
"""

from __future__ import annotations

#: The device default: the worker's GPU if it has one, else the CPU.
AUTO = "auto"


def resolve_device(device: str) -> str:
    """``"cuda"`` for :data:`AUTO` when torch sees a GPU, ``"cpu"`` for :data:`AUTO`
    otherwise, any other device string unchanged. Imports torch: call it on workers."""
    if device != AUTO:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
