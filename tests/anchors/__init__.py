"""PyTorch modules written in the structure of each anchor implementation.

Their ``state_dict`` names are the anchors' own names, so a fixture's
``anchor_names`` map loads into them directly.  Each module file exposes
factories ``f(config: dict) -> torch.nn.Module`` (the signature
``refattn validate --torch module:factory`` expects), the faithful ones and,
for the validation tests, versions with the known bugs planted.
"""
