"""Research experiments: ml_collections configs (configs/) and the sweeps they run (sweeps/).

  python -m experiments.run --config=experiments/configs/quantization.py --workdir=/tmp/runs
  python -m experiments.run --config=experiments/configs/quantization.py:smoke --workdir=/tmp/runs

A run writes config.json, results.json and PNG plots into WORKDIR/NAME-TIMESTAMP/.
"""
