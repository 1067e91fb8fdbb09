"""torch.fx symbolic tracing (torchvision's create_feature_extractor, FX graph-mode quantization)
keeps each robustdrop layer as one ``call_module`` node, as it keeps torch.nn's own layers. Its
forward branches in Python on the mode and the rate and draws seeds on the host, which a symbolic
trace cannot follow; the traced GraphModule calls the layer itself, so it runs what the layer runs.
"""
import torch.fx


def fx_leaf_call(module, *args):
    """Under torch.fx symbolic tracing (an argument of the forward is an fx Proxy): the call of
    ``module`` on ``args`` as one call_module node of the traced graph. None otherwise."""
    for arg in args:
        if isinstance(arg, torch.fx.Proxy):
            tracer = arg.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})
    return None
