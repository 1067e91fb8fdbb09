"""TorchScript is not supported: torch.jit.script of a robustdrop layer, or of a model holding
one, fails with a message that says so, instead of a compiler error deep in the layer's Python."""


class NotScriptable:
    """Mixin for robustdrop's nn.Modules. ``torch.jit.script`` calls ``__prepare_scriptable__`` on
    the module it scripts and on each of its submodules before compiling anything; here it refuses."""

    def __prepare_scriptable__(self):
        raise RuntimeError(f"{type(self).__name__} does not support TorchScript (torch.jit.script): its forward "
                           f"dispatches in Python to robustdrop's backends. Use torch.compile or torch.export "
                           f"instead.")
