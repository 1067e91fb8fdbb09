"""A layer's drop rate ``p`` that a schedule may reassign between forwards, without
recompiling under torch.compile."""
import torch

from robustdrop import _checks


class ScheduledRate:
    """Mixin for an nn.Module whose drop rate ``p`` may be reassigned between forwards,
    as DropBlock's linear schedule of the rate does (CamDrop's authors use the same).

    In eager mode and under torch.compile until ``p`` is first reassigned, the
    forward passes the float ``p``, a constant of a compiled graph. Dynamo guards
    on that constant's value, so a schedule would recompile at every new value and
    hit its recompile limit (eight by default). Once ``p`` has been reassigned, a
    compiled forward instead passes ``_rate``, a () float64 CPU tensor that the
    setter changes in place: a graph input whose value is not guarded on. Dynamo
    then guards only on two bools, so a schedule costs at most two more graphs
    (p == 0, passed as the float 0.0 so the op stays the identity without drawing
    a seed, as eager; and p > 0). A 0-d tensor rate gives the float's bits.
    """

    def _init_rate(self, p) -> None:
        """Sets up the rate ``p``, checked (``_checks.check_layer_rate``: a float in [0, 1] or a float
        tensor of rates). Later reassignments are not checked here: a bad rate is refused, naming p,
        at the next forward, by the op's own checks."""
        p = _checks.check_layer_rate(p)
        # Not an inference tensor, which fill_ could not change outside inference mode, when the layer
        # is built inside it.
        with torch.inference_mode(False):
            self._rate = torch.zeros((), dtype=torch.float64)
        self._rate_traced = False
        self._rate_is_zero = False
        self.p = p

    @property
    def p(self):
        return self._p

    @p.setter
    def p(self, value) -> None:
        reassigned = "_p" in self.__dict__
        self._p = value
        # Only a valid float rate is traced: anything else takes the float path, whose checks name p.
        rate = _checks.as_float(value) if _checks.is_real(value) else None
        valid = rate is not None and 0.0 <= rate <= 1.0
        self._rate_traced = reassigned and valid
        if valid:
            self._rate.fill_(rate)
            self._rate_is_zero = rate == 0.0

    def _forward_rate(self):
        """The p a forward passes to its op: the float p, or, compiling after p was reassigned, 0.0
        or the 0-d tensor ``_rate``. Reads no float p in the latter case, so Dynamo guards on none."""
        if not (torch.compiler.is_compiling() and self._rate_traced):
            return self.p
        return 0.0 if self._rate_is_zero else self._rate
