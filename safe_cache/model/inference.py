"""The inference rules of SAFE and SAFE-A on pooled features: what fit evaluates and tunes, and
what an exported model applies to new images, written once.

SAFE's feature is the blend of the original pooling and the fine-tuned one (the paper's
`beta * original + finetuned`), L2-normalised. Tip-Adapter's logits (Zhang et al.) add a cache
model to zero-shot CLIP:

    logits = scale * f W^T + alpha * exp(-gamma * (1 - f K^T)) V

with f the L2-normalised query feature, W the text classifier, K the cache keys and V their
one-hot labels. (Tip-Adapter's code calls gamma "beta"; the paper's names are kept here, since
SAFE's beta is the blend.) SAFE-A is the same with SAFE's blended features as keys and queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def blend_features(original: torch.Tensor, finetuned: torch.Tensor, beta: float,
                   mode: str = "blend") -> torch.Tensor:
    """SAFE's inference feature, L2-normalised: normalise(beta * original + finetuned).

    mode "each" normalises each branch before blending (an ablation)."""
    if mode == "each":
        original, finetuned = F.normalize(original, dim=-1), F.normalize(finetuned, dim=-1)
    return F.normalize(beta * original + finetuned, dim=-1)


def tip_logits(features: torch.Tensor, classifier: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor, alpha: float, gamma: float, scale: float) -> torch.Tensor:
    """scale * f W^T + alpha * exp(-gamma * (1 - f K^T)) V."""
    affinity = features @ keys.T
    cache = torch.exp(-gamma * (1 - affinity)) @ values
    return scale * features @ classifier.T + alpha * cache
