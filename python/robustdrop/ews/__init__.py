"""EWS: training by enhancing weak subnets (Guo, Stutz and Schiele, *Improving Robustness by Enhancing Weak Subnets*).

Subnets and their gates (``gates``): ``GatedNetwork`` wraps a model and runs
it with ``Subnet`` gates (channel gates on the gated layers, path gates on the
residual blocks), S subnets in one batched forward; ``channel_gate`` is the
fused per-sample channel gate those forwards use; ``gated_layers`` names what
is gated.
"""
from robustdrop.ews.gates import Decision, GatedNetwork, Subnet, gated_layers, kept_count
from robustdrop.ops.channel_gate import channel_gate

from robustdrop.ops.kl_distill import kl_distill
from robustdrop.ews.controller import Controller
from robustdrop.ews.trainer import EWSTrainer

__all__ = [
    "channel_gate", "Decision", "GatedNetwork", "Subnet", "gated_layers", "kept_count", "kl_distill",
    "Controller", "EWSTrainer",
]
