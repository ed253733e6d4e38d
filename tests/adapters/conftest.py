"""Fixtures of the adapter tests: the frameworks (optional unless required).

``jax`` and ``keras`` skip their tests when the framework is absent, and fail
them when ``REFATTN_REQUIRE_JAX=1`` / ``REFATTN_REQUIRE_KERAS=1`` (CI sets
both after installing the ``jax`` and ``keras`` extras), as ``torch`` does
with ``REFATTN_REQUIRE_TORCH``.  Keras is put on its JAX backend before it is
first imported.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import pytest


def require(module: str, env: str, extra: str) -> Any:
    """The module, or a skip; a failure when the environment variable is 1."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get(env) == "1":
            pytest.fail(f"{env}=1 but {module} is not importable")
        pytest.skip(f"{module} is not installed (pip install 'refattn[{extra}]')")


@pytest.fixture(scope="session")
def jax() -> Any:
    require("flax.nnx", "REFATTN_REQUIRE_JAX", "jax")
    return require("jax", "REFATTN_REQUIRE_JAX", "jax")


@pytest.fixture(scope="session")
def keras() -> Any:
    require("jax", "REFATTN_REQUIRE_KERAS", "keras")
    from refattn.adapters import keras as adapter
    from refattn.validate import ValidationInputError

    try:
        adapter.backend()  # KERAS_BACKEND=jax unless set, then import keras
    except ValidationInputError as err:
        if os.environ.get("REFATTN_REQUIRE_KERAS") == "1":
            pytest.fail(f"REFATTN_REQUIRE_KERAS=1 but {err}")
        pytest.skip(str(err))
    return importlib.import_module("keras")
