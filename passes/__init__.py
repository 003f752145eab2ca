"""Graph passes of fxstream: pure torch.fx work on captured ATen graphs (no diffusers imports).

dims      which dims of each node are parallel, and how a slice axis maps through each op
chains    operator groups: connected node sets that share one slice axis
memory    per-node bytes, aliasing, liveness -> MemoryTimeline and peak
budget    slices per group so that the predicted peak fits a budget
slicing   outline each chosen group into a submodule run slice by slice
"""
