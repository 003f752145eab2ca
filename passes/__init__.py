"""Graph passes of fxstream: pure torch.fx work on captured ATen graphs (no diffusers, never the face).

ops         the op table: per ATen overload its slice rule, aliasing, family, size arguments
dims        the slice rules: which dims of each node are parallel, and how a slice axis maps through each op
chains      operator groups: convex node sets that share one slice axis
reductions  GroupNorm split into exact statistics and apply (and fused back where a group runs whole)
memory      per-node bytes, aliasing, liveness -> MemoryTimeline and peak
budget      slices per group so that the predicted peak fits a budget
slicing     outline each chosen group into a submodule run slice by slice
rows        row streaming with halos where no axis is parallel (a decoder's tail)
rehash      Step Rehash: cache points, partial graphs, FLOPs
pipeline    the planner: plan(graph, request) -> Plan and the graph that runs it; replay(graph, plan)
plan, meta  the Plan record; the node metadata helpers
"""
