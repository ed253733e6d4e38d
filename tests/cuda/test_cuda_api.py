"""refattn.cuda without a GPU: sources, names, the kernel switch, lazy imports."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import refattn.cuda as rc


def test_importing_refattn_does_not_import_cupy() -> None:
    code = (
        "import sys, refattn, refattn.cuda, refattn.cuda.launch\n"
        "assert 'cupy' not in sys.modules, 'cupy imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernel_files_are_package_data() -> None:
    for name in (rc.KERNEL_HEADER, *rc.KERNEL_FILES):
        assert rc.read_source(name).strip()
    with pytest.raises(ValueError, match="filename: expected"):
        rc.read_source("missing.cu")


def test_module_source_marks_every_file() -> None:
    src = rc.module_source()
    for name in (rc.KERNEL_HEADER, *rc.KERNEL_FILES):
        assert f'#line 1 "{name}"' in src
    # the header comes first, so the guarded #include lines are skipped
    assert src.index("#define REFATTN_COMMON_H") < src.index('#line 1 "pool.cu"')


def test_kernel_names_follow_the_convention() -> None:
    names = rc.kernel_names()
    assert len(names) == len(set(names)) == 2 * sum(len(v) for v in rc.KERNELS.values())
    for n in names:
        base, ctype = n[:-1].split("<")
        assert base.startswith("refattn_") and base.endswith(("_fwd", "_bwd")), n
        assert ctype in ("float", "double"), n
    assert (
        rc.kernel_name("refattn_softmax_fwd", np.float32)
        == "refattn_softmax_fwd<float>"
    )
    assert (
        rc.kernel_name("refattn_softmax_fwd", "float64")
        == "refattn_softmax_fwd<double>"
    )
    with pytest.raises(
        TypeError, match="dtype: expected float32 or float64, got int64"
    ):
        rc.kernel_name("refattn_softmax_fwd", np.int64)


def test_no_host_only_names_in_the_kernels() -> None:
    """What NVRTC has no header for must not appear (tier 1 proves it too)."""
    for name in (rc.KERNEL_HEADER, *rc.KERNEL_FILES):
        text = re.sub(r"//[^\n]*", "", rc.read_source(name))  # code, not comments
        for bad in ("std::", "DBL_MAX", "FLT_MAX", "INFINITY", "#include <", "cupy/"):
            assert bad not in text, (name, bad)


def test_switch_follows_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("REFATTN_KERNELS", raising=False)
    assert rc.kernels_enabled()
    monkeypatch.setenv("REFATTN_KERNELS", "generic")
    assert not rc.kernels_enabled()
    monkeypatch.setenv("REFATTN_KERNELS", "auto")
    assert rc.kernels_enabled()
    monkeypatch.setenv("REFATTN_KERNELS", "fast")
    with pytest.raises(
        ValueError, match="REFATTN_KERNELS: expected 'auto' or 'generic'"
    ):
        rc.kernels_enabled()


def test_api_switch_wins_over_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("REFATTN_KERNELS", "generic")
    with rc.use_kernels(True):
        assert rc.kernels_enabled()
        with rc.use_kernels(False):
            assert not rc.kernels_enabled()
        assert rc.kernels_enabled()
    assert not rc.kernels_enabled()
    try:
        rc.set_kernels_enabled(True)
        assert rc.kernels_enabled()
    finally:
        rc.set_kernels_enabled(None)
    assert not rc.kernels_enabled()
    with pytest.raises(TypeError, match="flag: expected"):
        rc.set_kernels_enabled("yes")  # type: ignore[arg-type]


def test_wants_kernels_only_for_cupy_arrays(monkeypatch) -> None:
    monkeypatch.delenv("REFATTN_KERNELS", raising=False)
    x = np.zeros(3)
    assert not rc.wants_kernels(x)
    assert not rc.wants_kernels()
    assert not rc.wants_kernels(None)


def test_cupy_available_is_a_safe_predicate() -> None:
    assert isinstance(rc.cupy_available(), bool)


def test_register_fills_the_ops_table_with_every_kernel(monkeypatch) -> None:
    """kernel_ops.OVERRIDES: one override point per entry, each described
    (KERNEL_OPS) and with its own cache type; register() installs them all."""
    from refattn.cuda import kernel_ops
    from refattn.ops import OPS, overrides

    monkeypatch.setattr(overrides, "OVERRIDES", {})
    kernel_ops.register()
    assert overrides.OVERRIDES == kernel_ops.OVERRIDES
    assert set(kernel_ops.OVERRIDES) - set(OPS) == {"cgnl_moments"}
    assert kernel_ops.KERNEL_OPS.keys() == kernel_ops.OVERRIDES.keys()
    caches = [o.cache for o in kernel_ops.OVERRIDES.values()]
    assert len(set(caches)) == len(caches)
    assert all(kernel_ops.KERNEL_OPS.values())
