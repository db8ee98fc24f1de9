"""Pure modelling: no torch.distributed here (the MoE layer receives a Dispatcher)."""
from dsmoe.model.dispatch import Dispatcher, LocalDispatcher
from dsmoe.model.moe import MoE, GroupedExperts, Router, update_expert_bias
from dsmoe.model.transformer import ModelOutput, Transformer, flops_per_token, param_breakdown

__all__ = ["Dispatcher", "LocalDispatcher", "MoE", "GroupedExperts", "Router", "update_expert_bias",
           "ModelOutput", "Transformer", "flops_per_token", "param_breakdown"]
