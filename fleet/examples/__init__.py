"""Example workloads for fleet (docs/protocol.md section 1), on the default allowlist
(``fleet.examples.*``):

- ``fleet.examples.charlm:make``: a byte-level decoder-only transformer LM trained on the
  Python standard library's own ``.py`` sources, written against the protocol's hooks;
- ``fleet.examples.digits:make``: an MLP on scikit-learn's bundled handwritten digits,
  as a :class:`~fleet.workloads.TorchWorkload` (model, optimizer, loss, DataLoaders);
- ``fleet.examples.hf_lm:make``: a Hugging Face ``transformers`` GPT-2 built from a
  config, on the charlm corpus's bytes, as a TorchWorkload (extra ``hf``).
"""
