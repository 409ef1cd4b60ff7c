"""The fused op's arguments, built and read in one place: the front calls the op, its fake kernels and autograd
formula take the calls apart, and the tests build direct calls, all through :class:`OpArgs` (its C++ twin, the
struct the kernels of both devices are built from, is in csrc/op_args.h)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch

from .rule import Rule

# The op's tensors beside the state, in its schema's order; the first nine of the forward's inputs
# (state, external, perception, w1, b1, wh, bh, wo, bo) take gradients, the masks and dead_state are constants.
TENSORS = ("external", "perception", "w1", "b1", "wh", "bh", "wo", "bo", "fire_mask", "dead_state")
DIFFERENTIABLE = ("state",) + TENSORS[:8]
# The precision of the update net's products (csrc/cell_rule.h's Precision): the inputs' own dtype ("ieee", as
# torch.backends' fp32_precision calls it), TF32, or bfloat16 / float16 operands with float32 accumulation.
PRECISIONS = ("ieee", "tf32", "bfloat16", "float16")


@dataclass(frozen=True, eq=False)
class OpArgs:
    """What one call of the op reads beside the state (forward) or beside the final state's gradient, the
    trajectory and the alive masks (backward): wh, bh are the second hidden layer (None with one), wo, bo the
    output layer."""

    external: torch.Tensor
    perception: Optional[torch.Tensor]
    w1: torch.Tensor
    b1: torch.Tensor
    wh: Optional[torch.Tensor]
    bh: Optional[torch.Tensor]
    wo: torch.Tensor
    bo: torch.Tensor
    fire_mask: Optional[torch.Tensor]
    dead_state: Optional[torch.Tensor]
    steps: int
    rule: Rule
    precision: str = "ieee"

    @classmethod
    def of(cls, external: torch.Tensor, weights: Sequence[Optional[torch.Tensor]], rule: Rule, steps: int, *,
           perception: Optional[torch.Tensor] = None, fire_mask: Optional[torch.Tensor] = None,
           dead_state: Optional[torch.Tensor] = None, precision: str = "ieee") -> "OpArgs":
        """From :func:`cubecore.propagate`'s arguments: ``weights`` are w1, b1, (w2, b2,) w_out, b_out; a missing
        bias becomes zeros (a constant)."""
        layers = [(w, b if b is not None else w.new_zeros(w.shape[0])) for w, b in zip(weights[0::2], weights[1::2])]
        (w1, b1), (wo, bo) = layers[0], layers[-1]
        wh, bh = layers[1] if len(layers) == 3 else (None, None)
        return cls(external, perception, w1, b1, wh, bh, wo, bo, fire_mask, dead_state, steps, rule, precision)

    def tensors(self) -> Tuple[Optional[torch.Tensor], ...]:
        return tuple(getattr(self, name) for name in TENSORS)

    def weights(self) -> List[torch.Tensor]:
        """The update net's (weight, bias) pairs as :func:`cubecore.propagate` takes them."""
        hidden = [self.wh, self.bh] if self.wh is not None else []
        return [self.w1, self.b1, *hidden, self.wo, self.bo]

    def op_codes(self) -> List[int]:
        """The op's ``rule`` list: the rule's codes (Rule.op_codes), then the precision's."""
        return self.rule.op_codes() + [PRECISIONS.index(self.precision)]

    def op_values(self) -> List[float]:
        """The op's ``rule_values`` list (Rule.op_values)."""
        return self.rule.op_values()

    def forward_args(self, state: torch.Tensor, keep_trajectory: bool) -> tuple:
        """The positional arguments of ``torch.ops.cubecore.propagate_forward``."""
        return (state, *self.tensors(), self.steps, self.op_codes(), self.op_values(), keep_trajectory)

    def backward_args(self, grad_final: torch.Tensor, trajectory: torch.Tensor, life: torch.Tensor) -> tuple:
        """The positional arguments of ``torch.ops.cubecore.propagate_backward``."""
        return (grad_final, trajectory, life, *self.tensors(), self.steps, self.op_codes(), self.op_values())

    @classmethod
    def _decoded(cls, tensors: Sequence, steps: int, codes: Sequence[int], values: Sequence[float]) -> "OpArgs":
        if not 0 <= codes[-1] < len(PRECISIONS):  # as csrc/op_args.h's decode_args refuses it
            raise ValueError(f"unknown precision code {codes[-1]}")
        return cls(*tensors, steps, Rule.from_op(codes[:-1], values), PRECISIONS[codes[-1]])

    @classmethod
    def from_forward(cls, args: Sequence) -> Tuple[torch.Tensor, "OpArgs", bool]:
        """(state, the call's OpArgs, keep_trajectory) from the forward op's positional arguments."""
        state, *tensors, steps, codes, values, keep = args
        return state, cls._decoded(tensors, steps, codes, values), keep

    @classmethod
    def from_backward(cls, args: Sequence) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, "OpArgs"]:
        """(grad_final, trajectory, life, the call's OpArgs) from the backward op's positional arguments."""
        grad_final, trajectory, life, *tensors, steps, codes, values = args
        return grad_final, trajectory, life, cls._decoded(tensors, steps, codes, values)

    def part(self, first: int, count: int) -> "OpArgs":
        """The call of steps first .. first + count of this one (a long rollout runs as several)."""
        fire = None if self.fire_mask is None else self.fire_mask[first:first + count]
        return replace(self, steps=count, fire_mask=fire)


FORWARD_INPUTS = 1 + len(TENSORS) + 4  # state, the tensors, steps, rule, rule_values, keep_trajectory
