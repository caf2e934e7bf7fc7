"""Engine-side helpers: application code that calls the kernels, not kernels.

- ``dspark_kernels.engine.calibration``: Sequential Temperature Scaling of the
  confidence head (the fit behind markov_draft's ``sts_temperature``) and its
  metrics (ECE, AUROC, Brier, reliability diagrams).
- ``dspark_kernels.engine.sps_table``: builds the scheduler's SPS table
  (schedule_verify's ``sps``) by timing a verify forward per batch size.
- ``dspark_kernels.engine.deepspec``: loads a DeepSpec DSpark checkpoint's Markov and
  confidence heads (``load_deepspec``) and drafts with them (``DraftHead.draft``);
  ``python -m dspark_kernels check-checkpoint PATH`` checks one.
- ``dspark_kernels.engine.round``: ``DSparkRound``, the whole round on the device (draft, capacity,
  schedule, pack, the engine's target, verify, advance) with one CUDA graph per verify bucket;
  ``dspark_kernels.engine.capacity``: ``CapacityPipe``, the host's lagged copy of the capacity K.
- ``dspark_kernels.engine.tree``: multi-chain drafting (b markov_draft chains per request as one tree for
  tree_rejection_sample); ``dspark_kernels.engine.tree_demo``: the tree round on the demo's target
  (``python -m dspark_kernels tree-demo``).
- ``dspark_kernels.engine.demo``: the end-to-end demo (``python -m dspark_kernels demo``).
- ``dspark_kernels.engine.simulator``: closed-loop serving simulator driving schedule_verify against
  step-time and acceptance models (``python -m dspark_kernels simulate --out DIR``).

They use the ops only through the public API at ``dspark_kernels.<op>``.
Nothing is imported here: import the submodule you need.
"""
