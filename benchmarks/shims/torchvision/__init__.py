"""A minimal stand-in for torchvision, for benchmarks only (`benchmarks/peer_sd3.py`).

There is no CPU build of torchvision in this environment, and diffusers' DreamBooth example only needs a few
PIL image transforms from it. This package implements exactly those with PIL, numpy and torch. It is not on
any path: `benchmarks/shims/run_peer.py` serves it to the peer script's own imports only. It is not torchvision
and claims no compatibility beyond those transforms.
"""

__version__ = "0.0.0+dittune.shim"
