"""The main job of svdkern: `svdkern train` (CLI, data, models, loop, checkpoints, report).

Modules: `cli` (argument parsing, outer steps; `train_main`, `compare_main`), `config`
(flags, defaults per data set, TOML), `recipe` (the phases of each method, what each
phase starts from and trains), `data` (digits, CIFAR-10 files, synthetic, text;
deterministic batches), `models` (MLP, CNN, CIFAR ResNets, GPT-2), `loop` (each phase's
model, the training loop, resume), `measure` (test figures, MACs, ranks, spectra),
`baselines` (posthoc, TRP), `rundir` (the run directory: checkpoints, metrics rows, lock),
`checkpoint` (atomic, weights_only-loadable), `report` (the run's end: deployment,
latency, report files; `svdkern compare`) and `plots`. Submodules are imported on use, so
`svdkern.train.data` does not pull in matplotlib.
"""
