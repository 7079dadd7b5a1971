"""The `svdkern` command: `train`, `compare`, and `check` (the default).

    svdkern                    same as `svdkern check`
    svdkern check              which backend serves each device; every op vs the reference
    svdkern train [...]        the training pipeline (`svdkern train --help`)
    svdkern compare RUN_DIR... one table and one plot over finished runs

Also `python -m svdkern ...` and `torchrun --nproc-per-node N -m svdkern train ...`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

__all__ = ["check_main", "main"]

# (m, n, r) of the factor shapes checked: odd sizes, rank 1, a single row.
_SHAPES = ((37, 29, 13), (1, 5, 1), (64, 48, 16))


def _factors(m: int, n: int, r: int, dtype, device, g: torch.Generator):
    def make(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    return make(m, r), make(r), make(n, r), make


def _max_rel_error(ours, ref) -> float:
    ours = ours if isinstance(ours, list | tuple) else [ours]
    ref = ref if isinstance(ref, list | tuple) else [ref]
    worst = 0.0
    for a, b in zip(ours, ref, strict=True):
        scale = max(1.0, b.detach().abs().max().item())
        worst = max(worst, (a.detach().double() - b.detach().double()).abs().max().item() / scale)
    return worst


def _compare(fn: Callable, ref: Callable, inputs: list[torch.Tensor]) -> float:
    """Max relative error of fn vs ref on the outputs and the gradients of every input."""
    xs = [t.clone().requires_grad_(True) for t in inputs]
    ys = [t.clone().requires_grad_(True) for t in inputs]
    out, expected = fn(*xs), ref(*ys)
    outs = out if isinstance(out, list | tuple) else [out]
    exps = expected if isinstance(expected, list | tuple) else [expected]
    g = torch.Generator().manual_seed(1)
    seeds = [torch.randn(e.shape, generator=g, dtype=torch.float64).to(e) for e in exps]
    grads = torch.autograd.grad(outs, xs, seeds)
    grads_ref = torch.autograd.grad(exps, ys, seeds)
    return max(_max_rel_error(outs, exps), _max_rel_error(list(grads), list(grads_ref)))


def _cases(dtype, device) -> dict[str, list[tuple[Callable, Callable, list[torch.Tensor]]]]:
    from svdkern import ops, reference

    g = torch.Generator().manual_seed(0)
    cases: dict[str, list] = {}
    for m, n, r in _SHAPES:
        U, s, V, make = _factors(m, n, r, dtype, device, g)
        x = make(3, n)
        bias = make(m)
        cases.setdefault("compose", []).append((ops.compose, reference.compose, [U, s, V]))
        cases.setdefault("lowrank_linear", []).append(
            (ops.lowrank_linear, reference.lowrank_linear, [x, U, s, V, bias])
        )
        cases.setdefault("orth_loss", []).append(
            (lambda a, b: ops.orth_loss([a, b]), lambda a, b: reference.orth_loss([a, b]), [U, V])
        )
        for kind in ("l1", "hoyer", "hoyer_square"):
            cases.setdefault(f"sparsity_loss[{kind}]", []).append(
                (
                    lambda a, k=kind: ops.sparsity_loss([a, a * 0.5], k),
                    lambda a, k=kind: reference.sparsity_loss([a, a * 0.5], k),
                    [s],
                )
            )
    layers = [_factors(m, n, r, dtype, device, g)[:3] for m, n, r in _SHAPES]
    flat = [t for layer in layers for t in layer]

    def grouped(impl):
        def run(*ts):
            return impl([*ts[0::3]], [*ts[1::3]], [*ts[2::3]])

        return run

    cases["compose_grouped"] = [
        (grouped(ops.compose_grouped), grouped(reference.compose_grouped), flat)
    ]
    return cases


def check_main(argv: list[str] | None = None) -> int:
    """`svdkern check`: 0 when every op matches the reference (forward and gradients)."""
    parser = argparse.ArgumentParser(
        prog="svdkern check",
        description="Print the backend of each device and check every op of svdkern.ops "
        "against svdkern.reference (forward and gradients, float32, a few odd shapes).",
    )
    parser.parse_args(argv)
    import svdkern

    print(f"svdkern {svdkern.__version__}, torch {torch.__version__}")
    print(f"backend: {svdkern.backend()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    tolerance = 1e-4
    failed = 0
    for device in devices:
        for name, cases in _cases(torch.float32, device).items():
            try:
                err = max(_compare(fn, ref, inputs) for fn, ref, inputs in cases)
                ok = err <= tolerance
                detail = f"max rel error {err:.2e}"
            except Exception as exc:  # a crashing kernel is a FAIL line, not a traceback
                ok, detail = False, f"error: {type(exc).__name__}: {exc}"
            failed += not ok
            print(f"{name:<28} {device:<5} float32  {detail:<26} {'OK' if ok else 'FAIL'}")
    print("all ops match the reference" if not failed else f"{failed} check(s) FAILED")
    return 1 if failed else 0


_USAGE = """\
usage: svdkern [check | train | compare] [options]

  check      print the backend and check every op against the reference (default)
  train      train, prune, fine-tune, compress and report (svdkern train --help)
  compare    one table and one accuracy-vs-MACs plot over runs (svdkern compare --help)
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `svdkern` console script and `python -m svdkern`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else ("check", [])
    if command in ("train", "compare"):
        from svdkern.train import cli, config, report

        try:
            return cli.train_main(rest) if command == "train" else cli.compare_main(rest)
        except (config.ConfigError, report.ReportError) as exc:
            # Raised only for a file the user gave (a config, a saved run, a report): one
            # line as argparse writes it; every other exception keeps its traceback.
            print(f"svdkern {command}: error: {exc}", file=sys.stderr)
            return 2
    if command == "check":
        return check_main(rest)
    if command in ("-h", "--help"):
        print(_USAGE, end="")
        return 0
    print(_USAGE, end="", file=sys.stderr)
    print(f"svdkern: error: unknown command {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
