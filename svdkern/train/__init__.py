"""The main job of svdkern: `svdkern train` (CLI, data, models, loop, checkpoints, report).

Modules: `cli` (argument parsing, outer steps; `train_main`, `compare_main`), `config`
(flags, defaults per data set, TOML), `data` (digits, CIFAR-10 files, synthetic;
deterministic batches), `models` (MLP, CNN, CIFAR ResNets), `loop` (phases, training,
resume), `baselines` (posthoc, TRP), `checkpoint` (atomic, weights_only-loadable),
`report` and `plots`. Submodules are imported on use, so `svdkern.train.data` does not
pull in matplotlib.
"""
