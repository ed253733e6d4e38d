"""Golden fixtures: case generation (``generate``) and the ``refattn-golden/1``
format (``format``: write, read, verify, summarise)."""
