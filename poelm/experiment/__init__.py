"""The paper's 3-way experiment end to end: BP (`none`) vs PoE `flat` α=0 vs PoE `flat`
α=0.5 with identical architecture, data order, seed, optimizer and schedule; then the
PoE model's inference modes against plain decoding; then report.md, plots, results.json.

    poelm experiment                                  # the `tiny` preset on the embedded corpus
    poelm experiment gpu-small --out runs/gpu-small   # a preset, or a TOML/YAML file
    poelm experiment tiny --num-iterations 200        # flags override the preset
    poelm compare runs/exp/arms/bp runs/exp/arms/poe --data data/default

Rerunning the same command resumes the unfinished arm and skips the finished ones.

The package reads as the experiment: config.py (arms, presets, files), run.py (the steps),
report.py (report.md and plots), compare.py (what `poelm compare` reports), specialist.py (the
post-hoc specialist stage on the PoE arm).
"""

from poelm.experiment.compare import compare_models  # noqa: F401
from poelm.experiment.config import ARMS, EXPERIMENTS, PAPER, ExperimentConfig, load_config  # noqa: F401
from poelm.experiment.report import alpha_ordering, render_report  # noqa: F401
from poelm.experiment.run import arm_train_config, run_arm, run_experiment  # noqa: F401
