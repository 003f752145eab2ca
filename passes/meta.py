"""The one namespaced key fxstream stores on ``node.meta``, and its typed record."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx

META_KEY = "fxstream"


@dataclass
class NodeInfo:
    """What the passes record on a node.

    workspace_bytes: transient memory the node allocates and frees while it runs, beyond its output (an
        outlined sliced group: the peak of one slice's intermediates; SDPA: its attention workspace).
    group: name of the operator group the node belongs to, if any.
    """

    workspace_bytes: int | None = None
    group: str | None = None


def node_info(node: torch.fx.Node) -> NodeInfo:
    """The node's :class:`NodeInfo`, created empty on first access."""
    info = node.meta.get(META_KEY)
    if info is None:
        info = node.meta[META_KEY] = NodeInfo()
    return info
