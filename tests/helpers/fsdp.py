"""The accelerate patch the FSDP test and the scaling benchmark share (one copy)."""
from __future__ import annotations


def force_fsdp_on_cpu() -> None:
    """accelerate 1.15 drops an FSDP plugin on CPU (MULTI_CPU is not in the branch of
    AcceleratorState.__init__ that turns a run into FSDP); make it do on CPU what it does on GPUs."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    orig = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        orig(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init
