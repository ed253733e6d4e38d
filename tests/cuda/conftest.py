"""Fixtures of the CUDA kernel tests: the host-shim build, once per session.

Environment:
    REFATTN_SHIM_SANITIZE=1   build with -fsanitize=address,undefined (set by
                              the sanitizer test, which runs the host-shim
                              checks again in a subprocess with libasan
                              preloaded)
"""

from __future__ import annotations

import os

import pytest

from shim_harness import ShimLibrary, build_shim, find_cxx

SANITIZE = os.environ.get("REFATTN_SHIM_SANITIZE") == "1"


@pytest.fixture(scope="session")
def shim_library(tmp_path_factory: pytest.TempPathFactory) -> ShimLibrary:
    """The whole kernel module built for the host (once per session)."""
    if find_cxx() is None:
        pytest.skip("no C++ compiler (g++ or clang++) found: host-shim tests need one")
    out = tmp_path_factory.mktemp("shim_san" if SANITIZE else "shim")
    return ShimLibrary(build_shim(out, sanitize=SANITIZE))
