"""The model layer: open_clip visual towers split into a frozen trunk and a trainable pooling head.

backbone (loading, backbone cards), families/ (one file per backbone family: detection, the
exact trunk/head split, which heads), heads (fast exact heads and the naive open_clip reference),
weights (tags, local files, offline errors), inference (SAFE's blend and Tip-Adapter's logits),
model_configs/ (the shipped tiny architectures). Never reads stores.
"""

from __future__ import annotations

from .backbone import Backbone, head_from_config, load_backbone

__all__ = ["Backbone", "head_from_config", "load_backbone"]
