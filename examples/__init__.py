"""Example workloads for fleet (docs/protocol.md section 1), on the default allowlist:

- ``examples.charlm:make``: a byte-level decoder-only transformer LM trained on the
  Python standard library's own ``.py`` sources;
- ``examples.digits:make``: an MLP on scikit-learn's bundled handwritten digits.
"""
