"""Faster recording of CUDA graphs under torch.compile's cudagraph trees (mode "reduce-overhead", which
`6_train.py --cuda-graphs` uses for every compiled block).

Before a block's graph records, PyTorch checks each of its input tensors against every output recorded earlier on
the step's path of graphs, and after it records, each output too (`CUDAGraphNode._is_alias_of_live_recorded_tensor`,
`_is_cuda_graph_recorded_tensor`; `CUDAWarmupNode._is_cuda_graph_recorded_tensor` on a shape's first, warm-up
step). Each check is a Python loop that reads the tensor's storage pointer again and asks every earlier output
whether it is still alive (a C call) before comparing pointers. A training step of the 3B has ~100 graphs on its
path (32 frozen vision blocks, then the forward and backward of 36 decoder layers), the forwards' outputs include
the activations saved for the backward, so the checks grow with the square of the path. Sampled on an H100
(bench/stack_samples.py, h100-zv), they took 21 s of the forward graphs' 33 s over ten recording steps of median
7.4 s (the backward, in the autograd engine's thread, unseen); with the replacements a recording step took 2.85 s
(h100-zx, bench/RESULTS.md).

The replacements give the same answers: they read the tensor's pointer once and compare pointers before asking
about liveness (an earlier output at another address can never match, alive or not); where a pointer matches,
liveness is checked exactly as before, so a dead output whose memory was reused still does not count.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _is_alias_of_live_recorded_tensor(self, t):
    from torch._inductor.cudagraph_trees import is_live
    ptr = t.untyped_storage().data_ptr()
    for depth, output_refs in enumerate(self.path_weakrefs):
        for output_index, ref in enumerate(output_refs):
            if ref is not None and ref.data_ptr() == ptr and is_live(ref):
                return (depth, output_index)
    return None


def _is_cuda_graph_recorded_tensor(self, t) -> bool:
    # outputs dead or alive: the pool's memory is never released while the tree lives (PyTorch's own reasoning)
    ptr = t.untyped_storage().data_ptr()
    return any(ref is not None and ref.data_ptr() == ptr for refs in self.path_weakrefs for ref in refs)


def _warmup_is_cuda_graph_recorded_tensor(self, t) -> bool:
    from torch._inductor.cudagraph_trees import is_live
    ptr = t.untyped_storage().data_ptr()
    return any(ref is not None and ref.data_ptr() == ptr and is_live(ref)
               for node in self._path_from_root for ref in node.outputs_weakrefs)


REPLACEMENTS = {("CUDAGraphNode", "_is_alias_of_live_recorded_tensor"): _is_alias_of_live_recorded_tensor,
                ("CUDAGraphNode", "_is_cuda_graph_recorded_tensor"): _is_cuda_graph_recorded_tensor,
                ("CUDAWarmupNode", "_is_cuda_graph_recorded_tensor"): _warmup_is_cuda_graph_recorded_tensor}


def speed_up_graph_recording() -> int:
    """Install the replacements (process-wide, idempotent). Returns how many were installed; a PyTorch without one
    of the methods keeps its own, with a warning."""
    from torch._inductor import cudagraph_trees
    installed = 0
    for (cls_name, method), replacement in REPLACEMENTS.items():
        cls = getattr(cudagraph_trees, cls_name, None)
        if cls is None or not callable(getattr(cls, method, None)) or not hasattr(cudagraph_trees, "is_live"):
            log.warning("CUDA graph recording keeps PyTorch's own %s.%s: not found in this PyTorch", cls_name, method)
            continue
        setattr(cls, method, replacement)
        installed += 1
    return installed
