"""The spec modules: what the tools around the math need of each block.

``refattn/blocks/<block>.py`` holds a block's math; ``specs/<block>.py``
holds its ``BlockSpec`` (``SPECS``): the checked entry points (the one place
a caller's arguments are checked, with ``refattn.checks``), parameter shapes
and draws, fixture shapes and tolerances, kink margins, anchor names, FLOP
count, benchmark case and figure.  CONTRIBUTING.md, "Adding a block".
"""
