"""The project's tools: the kernel gate's parsing and verdicts (tools/kernel_check.py, on
synthetic records: no triton compile), the tree mirror of `make test-compat`, the
interpreter-bug detection of tests/conftest.py, and the mutant list of `make mutants`
still fitting the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import kernel_check as kc  # noqa: E402
import mutants  # noqa: E402
import sync_tree  # noqa: E402
from conftest import INTERP_BUG, interpreter_skip_reason  # noqa: E402

PTXAS_LOG = """
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_matmul_kernel' for 'sm_90a'
ptxas info    : Function properties for _matmul_kernel
    104 bytes stack frame, 96 bytes spill stores, 88 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 104 bytes cumulative stack size
"""


def _variant(**kw) -> kc.Variant:
    base = dict(
        kernel="_matmul_kernel",
        constexprs={"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64},
        num_warps=8,
        num_stages=3,
        ops={"compose"},
        dtypes={"bf16"},
        shared=98304,
        regs=168,
        spills=0,
        mma="wgmma",
        has_dot=True,
    )
    base.update(kw)
    return kc.Variant(**base)


def test_parse_ptxas_log_reads_registers_and_spills():
    res = kc.parse_ptxas_log(PTXAS_LOG)
    assert res == {"regs": 255, "stack": 104, "spill_stores": 96, "spill_loads": 88}
    with pytest.raises(ValueError, match="no register/spill report"):
        kc.parse_ptxas_log("ptxas info    : 0 bytes gmem")


@pytest.mark.parametrize(
    "ptx, kind",
    [
        ("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...}", "wgmma"),
        ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...}", "mma.sync"),
        ("fma.rn.f32 %f1, %f2, %f3, %f4;", "none"),
    ],
)
def test_mma_kind_from_ptx(ptx, kind):
    assert kc.mma_kind(ptx) == kind


def test_clean_bf16_gemm_variant_passes():
    assert kc.verdict(_variant()) == []


def test_bf16_hot_kernel_with_spills_fails():
    (why,) = kc.verdict(_variant(spills=96, regs=255))
    assert "spills 96 B" in why


def test_spills_outside_hot_kernels_or_in_fp32_do_not_fail_but_fp32_is_reported():
    assert kc.verdict(_variant(ops={"sparsity_loss"}, spills=64, has_dot=False)) == []
    fp32 = _variant(dtypes={"fp32"}, spills=6000, mma="none")
    assert kc.verdict(fp32) == []
    assert kc.notes(fp32) == ["fp32 spills 6000 B per thread (168 registers)"]


def test_a_stack_frame_without_spill_stores_passes():
    assert kc.verdict(_variant(spills=0, stack=8)) == []


def test_backward_ops_count_as_hot():
    for op in ("compose_backward", "compose_grouped_backward", "orth_loss_forward"):
        assert kc.verdict(_variant(ops={op}, spills=4)), op


def test_shared_memory_over_the_h100_limit_fails_in_any_dtype():
    assert kc.verdict(_variant(shared=kc.SMEM_LIMIT)) == []
    for dtypes in ({"bf16"}, {"fp32"}):
        (why,) = kc.verdict(_variant(dtypes=dtypes, shared=kc.SMEM_LIMIT + 1, mma="wgmma"))
        assert "shared memory" in why


@pytest.mark.parametrize(
    "block_m, warps, mma, fails",
    [
        (128, 8, "mma.sync", True),
        (64, 4, "none", True),
        (64, 4, "wgmma", False),
        (32, 4, "mma.sync", False),  # too few rows for a warpgroup MMA
        (64, 2, "mma.sync", False),  # under one warpgroup
    ],
)
def test_bf16_gemm_tiles_must_lower_to_wgmma(block_m, warps, mma, fails):
    v = _variant(constexprs={"BLOCK_M": block_m, "BLOCK_N": 64}, num_warps=warps, mma=mma)
    assert bool(kc.verdict(v)) is fails


def test_gram_tiles_use_block_r_and_kernels_without_dot_are_not_gemms():
    gram = _variant(kernel="_orth_fwd_kernel", constexprs={"BLOCK_R": 64}, num_warps=4, mma="none")
    assert kc.verdict(gram)
    assert kc.verdict(_variant(constexprs={"BLOCK": 1024}, has_dot=False, mma="none")) == []
    assert kc.verdict(_variant(dtypes={"fp32"}, mma="none")) == []


def test_compile_error_fails():
    (why,) = kc.verdict(_variant(error="CompilationError: out of resources\nline 2: boom"))
    assert why.startswith("does not compile: line 2: boom")


def test_report_lists_failures_and_counts(tmp_path):
    good, spill = _variant(), _variant(spills=128, constexprs={"BLOCK_M": 256, "BLOCK_N": 128})
    counts = {
        "test": {"compiles": 120, "benchmarks": 0, "autotune_keys": 0},
        "bench": {"compiles": 300, "benchmarks": 900, "autotune_keys": 80},
    }
    meta = {"triton": "3.6.0", "torch": "2.11.0", "git": "abc", "date": "2026-01-01"}
    path = tmp_path / "k.md"
    kc.write_report(path, [good, spill], [("lowrank x", "ValueError: bad")], counts, meta)
    text = path.read_text()
    assert "**Gate: FAIL**" in text
    assert "2 variants, 1 failing, 1 launcher errors" in text
    assert "BLOCK_M=256" in text and "lowrank x: launcher raised ValueError: bad" in text
    assert "120 compiles" in text and "300 compiles" in text
    assert "| _matmul_kernel | bf16 | 2 | 168 | 1 (128) |" in text
    kc.write_report(path, [good], [], counts, meta)
    assert "**Gate: PASS**" in path.read_text()


def test_sync_tree_mirrors_new_changed_and_removed_files(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=src, check=True)
    (src / ".gitignore").write_text("ignored.txt\n")
    (src / "a.py").write_text("a")
    (src / "ignored.txt").write_text("x")
    (src / "pkg").mkdir()
    (src / "pkg" / "b.py").write_text("b")
    assert sync_tree.sync(src, dest) == (3, 0)
    assert (dest / "pkg" / "b.py").read_text() == "b" and not (dest / "ignored.txt").exists()
    (dest / "build.so").write_text("kept: not a tree file")
    assert sync_tree.sync(src, dest) == (0, 0)  # nothing changed
    (src / "pkg" / "b.py").unlink()
    (src / "a.py").write_text("a2")
    assert sync_tree.sync(src, dest) == (1, 1)
    assert (dest / "a.py").read_text() == "a2" and not (dest / "pkg" / "b.py").exists()
    assert (dest / "build.so").exists()


def _raises(exc: Exception):
    def probe():
        raise exc

    return probe


def _never_called():
    raise AssertionError("the probe must not run for this combination")


@pytest.mark.parametrize(
    "triton_version, numpy_version",
    [("3.9.0", "2.4.1"), ("3.7.0", "2.5.0"), ("3.6.0", "2.3.5"), ("3.6.0+git123", "1.26.4")],
)
def test_interpreter_runs_on_good_version_pairs(triton_version, numpy_version):
    assert interpreter_skip_reason(triton_version, numpy_version, _never_called) is None


def test_interpreter_skips_with_the_bug_named_only_when_the_probe_hits_it():
    reason = interpreter_skip_reason("3.6.0", "2.4.0", _raises(TypeError(INTERP_BUG)))
    assert reason is not None and "triton 3.6.0" in reason and INTERP_BUG in reason
    wrapped = RuntimeError(f"TypeError('{INTERP_BUG}')")  # as triton's InterpreterError
    wrapped.__cause__ = TypeError(INTERP_BUG)
    assert interpreter_skip_reason("3.6.0", "2.5.0", _raises(wrapped)) is not None
    assert interpreter_skip_reason("3.6.0", "2.5.0", lambda: None) is None  # probe passes
    other = _raises(TypeError("unsupported operand"))
    assert interpreter_skip_reason("3.6.0", "2.5.0", other) is None  # other errors: tests show
    assert interpreter_skip_reason("3.5.1", "2.4.0", _raises(RuntimeError("x"))) is None


def test_gate_expects_every_triton_kernel_of_the_project():
    # The gate fails when a kernel was never compiled; its list must name every @triton.jit
    # kernel that has a launcher (the ones ending in _kernel), no more, no fewer.
    import re

    root = Path(__file__).resolve().parents[2] / "svdkern" / "kernels"
    defined = {
        name
        for path in root.glob("*.py")
        for name in re.findall(r"^def (_\w+_kernel)\(", path.read_text(), flags=re.M)
    }
    assert defined == set(kc.EXPECTED_KERNELS)


@pytest.mark.parametrize("m", mutants.load(mutants.LIST), ids=lambda m: m.name)
def test_every_mutant_can_be_planted_and_names_existing_tests(m):
    # `make mutants` is not in CI: a snippet that the code no longer holds exactly once, or
    # a test file that moved, would otherwise only show when someone runs it.
    text = (ROOT / m.file).read_text()
    assert text.count(m.find) == 1, f"{m.name}: its snippet occurs {text.count(m.find)} times"
    for selection in m.tests:
        path = selection[0].split("::")[0]
        assert (ROOT / path).is_file(), f"{m.name}: {path} does not exist"


def _layout_entries() -> list[str]:
    """The paths listed in the README's Layout block."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout") :].split("```")[1]
    return [line.split()[0] for line in block.strip().splitlines() if line.strip()]


def test_the_readme_layout_lists_every_module_and_package_of_the_tree():
    listed = set(_layout_entries())
    package = ROOT / "svdkern"
    present = {
        f"svdkern/{p.name}" if p.is_file() else f"svdkern/{p.name}/"
        for p in package.iterdir()
        if (p.suffix == ".py" and p.name != "__init__.py")
        or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert present - listed == set(), "modules missing from the README's Layout"
    stale = {e for e in listed if e.startswith("svdkern/") and not (ROOT / e).exists()}
    assert stale == set(), "README's Layout lists paths that do not exist"
    assert (ROOT / "docs" / "ARCHITECTURE.md").is_file()
