"""The seven blocks (and the CBAM gates and the NIN head as their own entries).

Each module holds a frozen config with named anchor presets and the functions
of the block contract (``refattn.blocks.spec``); ``refattn.blocks.registry``
collects them into ``BLOCKS``, which everything else reads.
"""
