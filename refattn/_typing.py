"""Type aliases shared by the whole package.

``Array`` is ``Any`` on purpose (as SciPy does): refattn accepts any array of a
namespace that array_api_compat recognises, and static typing of the Array
API is not mature enough to say more.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Array = Any
"""An array of any supported namespace (NumPy, CuPy, array_api_strict)."""

Shape = tuple[int, ...]
"""A concrete array shape."""

Params = dict[str, Array]
"""A flat parameter dict keyed by canonical dotted names (state_dict style)."""

Arrays = Mapping[str, Array]
"""Named arrays a function reads: a block's inputs, params, state or douts."""

ArrayDict = dict[str, Array]
"""Named arrays a function returns: a block's outputs or gradients."""
