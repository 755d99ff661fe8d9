"""Latency measurement of DepthPro, one idea per module.

- ``timing``: :class:`~.timing.Stats`, the timer (CUDA events / ``perf_counter``), random
  inputs, the peak matmul rate (the FLOP floor's denominator).
- ``environment``: device, versions and git commit recorded with every result; results names.
- ``variants``: the rows of ``depthpro-fast bench`` (:class:`~.variants.Variant`) and which a
  device gets; transformers' DepthPro as a peer.
- ``runner``: :class:`~.runner.Runner` times the rows side by side, with accuracy vs the fp32
  reference; :class:`~.runner.RowResult`.
- ``stages``: the per-stage breakdown of one forward.
- ``tables`` / ``results``: the text tables and the JSON results file.
- ``micro``: the decision micro-benchmarks (attention vs SDPA backends, the ViT GEMMs, the
  decoder conv, split / merge vs a plain copy): ``python -m depthpro_fast.bench.micro``.
- ``smoke``: a quick correctness check of every op and of the fast engine on the device
  (``python -m depthpro_fast.bench.smoke``), run first by ``bench/gpu_check.sh``.
- ``race`` (``depthpro-fast bench --peers``): the CPU race of our engine against its peers,
  each contestant in a process of its own per round; ``race_contestants`` (the table of
  contestants and how each is built), ``race_child`` (one job in a child), ``race_children``
  (starting and waiting for one), ``race_floor`` (the GEMM floor), ``race_summary`` (order,
  summaries, the machine's verdict), ``race_table`` (the markdown).
- ``journal``: a JSON file of independent cases written after each one, so that a case that
  crashes or poisons the CUDA context costs only itself (the next process resumes).

``depthpro_fast.commands.bench`` is the command-line face of the latency table.
"""
