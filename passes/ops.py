"""The op table: what the passes know about each ATen overload (and each op fxstream inserts), in one place.

One :class:`OpInfo` per overload, read by every pass; an op missing from the table is a barrier everywhere
(no slice rule, no alias, no family), never a guess. Its fields:

``dims``
    the slice rule (:mod:`passes.dims`): given a slice of the output along an axis, the slices of the inputs
    it reads, or None where the op is not parallel along that axis.
``alias``
    whether the output shares its first argument's storage (:class:`Alias`); the memory engine groups values
    by storage with it, and row streaming knows which band ops are free.
``layout``
    a layout op: it only rearranges its input (views, reshapes, permutes). A layout op never seeds an
    operator group (nothing to slice), and views that leave a group are redone outside it.
``anchor``
    the work slicing is for (convolutions, matrix products, attention): a group's tail is what follows the
    last anchor.
``family``
    the ops other rules treat together: ``conv`` (row halos, CUDA workspace; :func:`conv_params` reads the
    arguments), ``upsample`` (nearest: a row range maps to fewer input rows), ``group_norm`` (statistics
    span the rows: split reductions, row passes), ``norm`` (per-position norms: LayerNorm, RMSNorm; a norm's
    cost for the time model), ``sdpa`` (backend workspace), ``reshape`` (shape-spelling
    views: a band keeps the row dim whole or copies), ``pad`` (``F.pad``: row streaming folds it into the halo
    of the convolutions that read it), ``join`` (``cat``: a decode loop joins its chunks' outputs with it).
``sizes``
    which argument spells out the output's sizes, rewritten for a slice: ``"shape"`` (the second) or
    ``"unflatten"`` (the sizes the dim is unflattened into).
``combine``
    for a reduction fxstream inserts (GroupNorm statistics): how per-slice results combine exactly.
``value_of``
    for an in-place op (``copy_``, ``fill_``, ``add_``...): its out-of-place twin, same arguments, which
    returns the written value (:mod:`passes.functional` rewrites writes with it).
``write_back``
    for a view op a write may go through: the op that puts a new value of the view back into its base
    (``slice`` -> ``slice_scatter``), or ``SAME`` for views of the whole tensor (``alias``, ``detach``).
``copies_storage``
    the result is a copy of the first argument's whole storage, not of its elements (torch's
    ``clone_preserve_strides``: ``slice_scatter``, ``select_scatter``, ``copy``): on a view of a larger tensor
    it costs the larger tensor (the fake values the memory model reads have that storage; slice bodies copy a
    sliced input out first, see ``passes/slicing.py``).

Modelled on ``torch.distributed.tensor._ops._view_ops``: a declarative table, shape-only rules, testable
without a graph.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from fxstream.runtime.keys import KeyChunkedAttention
from fxstream.runtime.ops import APPLY_OP, PARTIAL_OP, combine_partials
from fxstream.runtime.sliced import join_buffer, join_into
from passes import dims as d

aten = torch.ops.aten


class Alias(enum.Enum):
    NONE = "none"  # a new tensor
    VIEW = "view"  # always a view of the first argument
    VIEWS = "views"  # a list of views of the first argument, read with getitem
    RESHAPE = "reshape"  # a view when the input's strides allow it, a copy otherwise
    CONVERT = "convert"  # the input itself when there is nothing to convert (dtype, device, layout)
    DROPOUT = "dropout"  # the input itself in eval mode or with p = 0


@dataclass(frozen=True)
class OpInfo:
    dims: Callable | None = None
    alias: Alias = Alias.NONE
    layout: bool = False
    anchor: bool = False
    family: str | None = None
    sizes: str | None = None
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    value_of: Any = None
    write_back: Any = None
    copies_storage: bool = False


# ``write_back`` of a view that is its whole base: the view's new value is the base's
SAME = "same"

TABLE: dict[Any, OpInfo] = {}


def _add(ops: list, **fields: Any) -> None:
    for op in ops:
        TABLE[op] = OpInfo(**fields)


_add([
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor,
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode,
    aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.neg.default, aten.abs.default,
    aten.exp.default, aten.log.default, aten.sqrt.default, aten.rsqrt.default, aten.reciprocal.default,
    aten.sin.default, aten.cos.default, aten.tanh.default, aten.sigmoid.default, aten.erf.default,
    aten.silu.default, aten.gelu.default, aten.relu.default, aten.leaky_relu.default, aten.mish.default,
    aten.hardtanh.default, aten.softplus.default, aten.clamp.default, aten.clamp.Tensor,
    aten.clamp_min.default, aten.clamp_max.default, aten.where.self, aten.where.Scalar, aten.where.ScalarOther,
    aten.where.ScalarSelf, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.lerp.Scalar,
    aten.lerp.Tensor, aten.maximum.default, aten.minimum.default, aten.eq.Tensor, aten.eq.Scalar,
    aten.ne.Scalar, aten.gt.Scalar, aten.lt.Scalar, aten.ge.Scalar, aten.le.Scalar, aten.logical_not.default,
    aten._to_copy.default, aten.clone.default, aten.square.default, aten.floor.default, aten.round.default,
    aten.sign.default, aten.ge.Tensor, aten.gt.Tensor, aten.le.Tensor, aten.lt.Tensor, aten.ne.Tensor,
    aten.bitwise_and.Tensor, aten.__and__.Tensor, aten.bitwise_or.Tensor, aten.__or__.Tensor,
    aten.logical_and.default, aten.logical_or.default, aten.pow.Scalar,
    # the values of in-place writes (passes/functional.py): self's shape, the value broadcast into it
    aten.fill.Tensor, aten.fill.Scalar,
    # fresh tensors shaped like their input: a slice of the output is one shaped like the input's slice
    aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
], dims=d.pointwise)
_add([aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.contiguous.default], dims=d.pointwise,
     alias=Alias.CONVERT)
_add([aten.to.other], alias=Alias.CONVERT)
_add([aten.type_as.default], dims=d.same(0))  # the second operand gives only its dtype
_add([aten.alias.default, aten.detach.default], dims=d.pointwise, alias=Alias.VIEW, layout=True, write_back=SAME)
_add([aten.dropout.default], dims=d.dropout, alias=Alias.DROPOUT)

_add([aten.linear.default], dims=d.linear, anchor=True)
_add([aten.matmul.default, aten.bmm.default, aten.mm.default], dims=d.matmul, anchor=True)
_add([aten.baddbmm.default, aten.addmm.default], dims=d.addmm_like, anchor=True)
_add([aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding, aten.conv2d.padding,
      aten.conv3d.padding, aten.convolution.default], dims=d.conv, anchor=True, family="conv")
_add([aten.scaled_dot_product_attention.default], dims=d.sdpa, anchor=True, family="sdpa")
_add([aten.group_norm.default], dims=d.group_norm, family="group_norm")
_add([aten.layer_norm.default, aten.rms_norm.default], dims=d.leading(lambda n: len(n.args[1])), family="norm")
_add([aten.softmax.int, aten._softmax.default, aten.log_softmax.int], dims=d.kept_dims(1, "dim", None))
_add([aten.mean.dim, aten.sum.dim_IntList, aten.amax.default], dims=d.kept_dims(1, "dim", 2))
_add([aten.linalg_vector_norm.default], dims=d.kept_dims(2, "dim", 3))  # (x, ord, dim, keepdim): Wan's RMS norm
_add([aten.var.correction], dims=d.kept_dims(1, "dim", 3))

_add([aten.view.default, aten._unsafe_view.default], dims=d.reshape, alias=Alias.VIEW, layout=True,
     family="reshape", sizes="shape")
_add([aten.reshape.default], dims=d.reshape, alias=Alias.RESHAPE, layout=True, family="reshape", sizes="shape")
_add([aten.flatten.using_ints], dims=d.reshape, alias=Alias.RESHAPE, layout=True, family="reshape")
_add([aten.unflatten.int], dims=d.reshape, alias=Alias.VIEW, layout=True, family="reshape", sizes="unflatten")
_add([aten.permute.default], dims=d.permute, alias=Alias.VIEW, layout=True)
_add([aten.transpose.int], dims=d.transpose, alias=Alias.VIEW, layout=True)
_add([aten.t.default], dims=d.t, alias=Alias.VIEW, layout=True)
_add([aten.unsqueeze.default], dims=d.unsqueeze, alias=Alias.VIEW, layout=True)
_add([aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default], dims=d.squeeze, alias=Alias.VIEW, layout=True)
_add([aten.expand.default], dims=d.expand, alias=Alias.VIEW, layout=True, sizes="shape")
_add([aten.broadcast_to.default], dims=d.expand, alias=Alias.VIEW, sizes="shape")
_add([aten.select.int], dims=d.select, alias=Alias.VIEW, layout=True, write_back=aten.select_scatter.default)
_add([aten.slice.Tensor], dims=d.slice_rule, alias=Alias.VIEW, layout=True, write_back=aten.slice_scatter.default)
_add([aten.movedim.int], dims=d.movedim, alias=Alias.VIEW, layout=True)
_add([aten.expand_as.default], dims=d.expand_as, alias=Alias.VIEW, layout=True)
_add([aten.narrow.default, aten.as_strided.default, aten.view_as.default,
      aten.diagonal.default, aten.unfold.default], alias=Alias.VIEW)
_add([aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default], dims=d.split_like, alias=Alias.VIEWS)
_add([aten.unbind.int], dims=d.unbind, alias=Alias.VIEWS)
_add([aten.tensor_split.sections, aten.tensor_split.indices], alias=Alias.VIEWS)
_add([aten.cat.default, aten.concatenate.default], dims=d.joined(stacked=False), family="join")
_add([aten.stack.default], dims=d.joined(stacked=True))
_add([operator.getitem], dims=d.getitem)
# nearest-exact maps output row r to input row floor((r + 1/2) / f): r // f for an integer factor f, as nearest
_add([aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default, aten.upsample_nearest3d.vec,
      aten.upsample_nearest3d.default, aten._upsample_nearest_exact2d.vec, aten._upsample_nearest_exact2d.default,
      aten._upsample_nearest_exact3d.vec, aten._upsample_nearest_exact3d.default], dims=d.upsample, family="upsample")
_add([aten.upsample_bilinear2d.vec], dims=d.upsample)
_add([aten.repeat_interleave.self_int], dims=d.repeat_interleave)
_add([aten.repeat.default], dims=d.repeat)
_add([aten.outer.default], dims=d.outer)
_add([aten.copy.default], dims=d.pointwise, copies_storage=True)
_add([aten.slice_scatter.default], dims=d.slice_scatter, copies_storage=True)
_add([aten.select_scatter.default], dims=d.select_scatter, copies_storage=True)
_add([aten.constant_pad_nd.default, aten.pad.default], dims=d.pad, family="pad")

# In-place writes (no slice rule: passes/functional.py rewrites them into their out-of-place twins, which are
# barriers unless they have rules of their own) and the ops those rewrites insert.
_INPLACE = {
    aten.copy_.default: aten.copy.default, aten.fill_.Tensor: aten.fill.Tensor, aten.fill_.Scalar: aten.fill.Scalar,
    aten.add_.Tensor: aten.add.Tensor, aten.add_.Scalar: aten.add.Scalar, aten.sub_.Tensor: aten.sub.Tensor,
    aten.mul_.Tensor: aten.mul.Tensor, aten.mul_.Scalar: aten.mul.Scalar, aten.div_.Tensor: aten.div.Tensor,
    aten.div_.Scalar: aten.div.Scalar, aten.clamp_.default: aten.clamp.default,
    aten.clamp_min_.default: aten.clamp_min.default, aten.relu_.default: aten.relu.default,
    aten.silu_.default: aten.silu.default, aten.masked_fill_.Scalar: aten.masked_fill.Scalar,
    aten.masked_fill_.Tensor: aten.masked_fill.Tensor, aten.zero_.default: aten.zeros_like.default,
    # autograd metadata only (export writes torch.tensor(data) in a forward as lift_fresh_copy + detach_)
    aten.detach_.default: aten.detach.default,
}
for _op, _twin in _INPLACE.items():
    TABLE[_op] = OpInfo(value_of=_twin)

# the ops fxstream inserts: GroupNorm split into statistics (a reduction, combined across slices) and apply
_add([PARTIAL_OP], dims=d.group_norm_partial, combine=combine_partials)
_add([APPLY_OP], dims=d.group_norm_apply)
# an attention whose keys and values are recomputed chunk by chunk (passes/keys.py): every instance, by its type
_add([KeyChunkedAttention], dims=d.key_chunked, anchor=True, family="keys")
# a cat made in a buffer that sliced groups write their ranges of (passes/slicing.py, write_into_joins): the
# buffer (a new tensor), and the join, which returns it
_add([join_buffer])
_add([join_into], alias=Alias.VIEW, family="join")

# Overloads the rewrites build nodes or programs with.
GROUP_NORM = aten.group_norm.default
CONVOLUTION = aten.convolution.default
SLICE = aten.slice.Tensor
JOIN = aten.cat.default
CONCATENATE = aten.concatenate.default
SLICE_SCATTER = aten.slice_scatter.default
UNFLATTEN = aten.unflatten.int
PERMUTE = aten.permute.default
TRANSPOSE = aten.transpose.int
UNSQUEEZE = aten.unsqueeze.default
SQUEEZE_DIM = aten.squeeze.dim
ALIAS = aten.alias.default
DETACH = aten.detach.default
PAD = aten.pad.default
CONSTANT_PAD = aten.constant_pad_nd.default
VIEW = aten.view.default
RESHAPE = aten.reshape.default
CLONE = aten.clone.default
COPY = aten.copy.default
TO_COPY = aten._to_copy.default
EXPAND = aten.expand.default
CONTIGUOUS = aten.contiguous.default
DROPOUT = aten.dropout.default
UNSAFE_VIEW = aten._unsafe_view.default
VIEW_AS = aten.view_as.default
SDPA = aten.scaled_dot_product_attention.default
PARTIAL = PARTIAL_OP
APPLY = APPLY_OP

_MISSING = OpInfo()


def info(target: Any) -> OpInfo:
    """The table's row for an op (a node's ``target``); an empty row (a barrier) for an op not in it. An op
    fxstream builds per node (a callable object) has its class's row."""
    try:
        row = TABLE.get(target)
    except TypeError:  # an unhashable target
        return _MISSING
    return row if row is not None else TABLE.get(type(target), _MISSING)


def of(node: torch.fx.Node) -> OpInfo:
    """The row of a ``call_function`` node's op; an empty row for any other node."""
    return info(node.target) if node.op == "call_function" else _MISSING


def conv_params(node: torch.fx.Node) -> dict | None:
    """stride, padding, dilation (per spatial dim), groups, kernel and bias of a convolution node, or None when
    it is transposed or its padding is not a symmetric number per dim (``"same"`` with an even kernel)."""
    x, w = node.args[0], node.args[1]
    n = len(d.shape(x)) - 2
    kernel = list(d.shape(w)[2:])
    if node.target is CONVOLUTION:
        if d.arg(node, 6, "transposed", False):
            return None
        stride, padding, dilation, groups = node.args[3], node.args[4], node.args[5], node.args[8]
    else:
        stride, padding = d.arg(node, 3, "stride"), d.arg(node, 4, "padding")
        dilation, groups = d.arg(node, 5, "dilation"), d.arg(node, 6, "groups", 1)
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0] * n
        elif all(k % 2 for k in kernel):
            padding = [(k - 1) // 2 for k in kernel]
        else:
            return None
    return dict(stride=_per_dim(stride, n, 1), padding=_per_dim(padding, n, 0), dilation=_per_dim(dilation, n, 1),
                groups=int(groups or 1), kernel=kernel, bias=d.arg(node, 2, "bias"))


def _per_dim(v, n: int, default: int) -> list[int]:
    if v is None:
        return [default] * n
    if isinstance(v, int):
        return [v] * n
    v = list(v)
    return v * n if len(v) == 1 else v


__all__ = ["Alias", "OpInfo", "TABLE", "conv_params", "info", "of"]
