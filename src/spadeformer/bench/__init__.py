"""Speed and memory benchmarks: ``spadeformer bench train|generate``.

* :mod:`spadeformer.bench.train_bench` — training-step time, peak memory and achieved FLOP/s
  against sequence length (the paper's Figure 5), one subprocess per (model, length) cell;
* :mod:`spadeformer.bench.generate_bench` — per-token decoding latency and state memory
  against context length (streaming SPADE vs a KV-cache Transformer);
* :mod:`spadeformer.bench.plots` — the figures (matplotlib, optional);
* :mod:`spadeformer.bench.cli` — the command line.

Nothing is imported here, so ``spadeformer --help`` stays fast; import the submodules.
"""
