"""The store's original pooling head (AttnPool_O), rebuilt from the weights the store keeps in
`head/`: fitting needs the store alone, not the backbone's weights file. A module of its own so
that fit's runs, the workbench (ProLIP projects with it) and analysis share one."""

from __future__ import annotations

import torch

from ..model.backbone import head_from_config
from ..model.heads import GridHead
from ..store import FeatureStore


def original_head(store: FeatureStore) -> GridHead:
    """The original pooling head of the store's backbone, with the stored weights."""
    state, model_config = store.head_state()
    head = head_from_config(model_config, store.manifest["backbone"])
    head.load_state_dict({name: torch.from_numpy(values) for name, values in state.items()})
    return head
