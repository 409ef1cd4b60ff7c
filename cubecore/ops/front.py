"""The op front: argument checks, backend choice, and the custom op's fake and autograd registration.

``propagate`` is the one entry point.  With ``backend="kernel"`` it calls the fused C++/CUDA op
``torch.ops.cubecore.propagate_forward`` (whose backward is ``propagate_backward``, our own kernel too); with
``backend="reference"`` the plain-PyTorch rule of :mod:`cubecore.ops.reference`; ``"auto"`` takes the kernel where
one is built for the tensors' device and dtype and otherwise the reference, warning once why.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Dict, Optional, Tuple

import torch

from ..checks import check_bool, check_choice, check_int, check_number, check_tensor
from .reference import ACTIVATIONS, BOUNDARIES, UPDATES, propagate_reference, trajectory_reference
from ..errors import InvalidTypeError, InvalidValueError, UnavailableError

BACKENDS = ("auto", "kernel", "reference")

REBUILD = "pip install --no-build-isolation -e . (or without -e for a plain install)"


def _build_info() -> Dict[str, object]:
    """What setup.py recorded when it built cubecore._C: the torch (and CUDA) it was built against."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_build_info.json")  # beside _C
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def extension_error(exc: BaseException, built: Dict[str, object], running: str) -> str:
    """Why cubecore._C did not load, in words: above all, a build against another torch than this one."""
    built_with = built.get("torch")
    if built_with and built_with != running:
        return (f"cubecore._C was built against torch {built_with}, but torch {running} is installed, and a "
                f"compiled extension only loads with the torch it was built against; rebuild it: {REBUILD}")
    if "undefined symbol" in str(exc) or "symbol not found" in str(exc):
        return (f"cubecore._C does not match the installed torch {running} (it was built against another "
                f"version: {str(exc).splitlines()[0][:200]}); rebuild it: {REBUILD}")
    return f"the compiled extension cubecore._C could not be loaded ({exc}); build it: {REBUILD}"


BUILD_INFO = _build_info()
try:  # Loading the library runs its TORCH_LIBRARY initialisers, which define torch.ops.cubecore.
    from .. import _C

    EXTENSION_ERROR: Optional[str] = None
    # The largest state the CUDA kernels take, from the extension (kMaxCudaState in csrc/cell_rule.h).
    CUDA_MAX_STATE: Optional[int] = _C.CUDA_MAX_STATE
except ImportError as exc:  # A source checkout that was never built, a build for another torch, a broken build.
    EXTENSION_ERROR = extension_error(exc, BUILD_INFO, torch.__version__)
    CUDA_MAX_STATE = None  # no kernels at all
_KERNEL_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float64)}



def _built_kernels() -> Dict[str, bool]:
    """Device types with a registered kernel, read once at import (torch.compile then sees a constant)."""
    if EXTENSION_ERROR is not None:
        return {}
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {dev: has("cubecore::propagate_forward", key) for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


KERNEL_BUILT = _built_kernels()


def kernel_limit_reason(device_type: str, dtype: torch.dtype, state_size: int = 1) -> Optional[str]:
    """Why the kernels for ``device_type``, once built, cannot take tensors of this dtype and state size (None
    if they can).  These are all the limits of every forward and backward path: a kernel that passes here
    does not fail later for its sizes."""
    if device_type not in _KERNEL_DTYPES:
        return f"there is no cubecore kernel for device type {device_type!r}"
    if dtype not in _KERNEL_DTYPES[device_type]:
        return f"the {device_type} kernel supports {_dtype_names(device_type)}, not {str(dtype).replace('torch.', '')}"
    if device_type == "cuda" and CUDA_MAX_STATE is not None and state_size > CUDA_MAX_STATE:
        return f"the CUDA kernel supports state_size <= {CUDA_MAX_STATE} (S <= {CUDA_MAX_STATE}), got {state_size}"
    return None


def kernel_unavailable_reason(device: torch.device, dtype: torch.dtype, state_size: int = 1) -> Optional[str]:
    """Why the fused kernel cannot run on tensors of this device, dtype and state size (None if it can)."""
    device = torch.device(device)
    if EXTENSION_ERROR is not None:
        return EXTENSION_ERROR
    if not KERNEL_BUILT.get(device.type, False):
        if device.type == "cuda":
            return "cubecore was built without CUDA kernels (no CUDA torch or no CUDA toolkit at build time)"
        return f"there is no cubecore kernel for device type {device.type!r}"
    return kernel_limit_reason(device.type, dtype, state_size)


def info() -> Dict[str, object]:
    """Which backends this build of cubecore has, and why one is missing."""
    cpu_reason = kernel_unavailable_reason(torch.device("cpu"), torch.float32)
    cuda_reason = kernel_unavailable_reason(torch.device("cuda"), torch.float32)
    return {
        "torch": torch.__version__,
        "built_with_torch": BUILD_INFO.get("torch"),
        "extension_loaded": EXTENSION_ERROR is None,
        "cpu_kernel": cpu_reason is None,
        "cpu_kernel_reason": cpu_reason,
        "cuda_kernel": cuda_reason is None,
        "cuda_kernel_reason": cuda_reason,
        "cuda_device_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(),
        "kernel_limits": {dev: _limits_text(dev) for dev in _KERNEL_DTYPES},
    }


def _limits_text(device_type: str) -> str:
    """Every limit of a device type's kernels, in words (``kernel_limit_reason`` checks them)."""
    state = f"; state_size <= {CUDA_MAX_STATE}" if device_type == "cuda" and CUDA_MAX_STATE is not None else ""
    return f"{_dtype_names(device_type)}{state}; any lattice, batch, hidden and external size"


def _dtype_names(device_type: str) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in _KERNEL_DTYPES[device_type])


_WARNED: set = set()


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, state_size: int = 1) -> str:
    """Turn ``"auto"`` into ``"kernel"`` or ``"reference"`` for these tensors; check an explicit choice."""
    check_choice("backend", backend, BACKENDS)
    if backend == "reference":
        return "reference"
    reason = kernel_unavailable_reason(device, dtype, state_size)
    if reason is None:
        return "kernel"
    if backend == "kernel":
        raise UnavailableError(f"backend='kernel' was requested but {reason}")
    key = (torch.device(device).type, dtype, reason)
    if key not in _WARNED and not torch.compiler.is_compiling():
        _WARNED.add(key)
        warnings.warn(f"cubecore: using the pure-PyTorch reference because {reason}", RuntimeWarning, stacklevel=3)
    return "reference"


def _code(name: str, value: str, choices: Tuple[str, ...]) -> int:
    return choices.index(check_choice(name, value, choices))


def _check_tensor(name: str, tensor: object, ndim: int, shape_doc: str) -> torch.Tensor:
    check_tensor(name, tensor, shape_doc, ndim=ndim)
    if not tensor.is_floating_point():
        raise InvalidTypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    return tensor


def check_propagate_args(state, external, w1, b1, w2, b2, steps) -> torch.Tensor:
    """Check shapes, dtypes and devices, naming the argument at fault; return ``external`` (made [B,X,Y,Z,0]
    when None)."""
    _check_tensor("state", state, 5, "[B, X, Y, Z, S]")
    if external is None:
        external = state.new_zeros(state.shape[:-1] + (0,))
    _check_tensor("external", external, 5, "[B, X, Y, Z, E]")
    if external.shape[:4] != state.shape[:4]:
        raise InvalidValueError(
            f"external {tuple(external.shape)} must match state {tuple(state.shape)} in [B, X, Y, Z]"
        )
    if min(state.shape[:4]) < 1 or state.shape[4] < 1:
        raise InvalidValueError(f"state must have B, X, Y, Z, S >= 1, got {tuple(state.shape)}")
    S, E = state.shape[4], external.shape[4]
    _check_tensor("w1", w1, 2, "[H, 7*S+E]")
    H = w1.shape[0]
    if w1.shape[1] != 7 * S + E:
        raise InvalidValueError(
            f"w1 must have shape [H, 7*S+E] = [H, {7 * S + E}] for S={S}, E={E}, got {tuple(w1.shape)}"
            + (" (does the external input size E match the one w1 was built for?)" if w1.shape[1] > 7 * S else "")
        )
    _check_tensor("b1", b1, 1, f"[H] = [{H}]")
    if b1.shape[0] != H:
        raise InvalidValueError(f"b1 must have shape [H] = [{H}], got {tuple(b1.shape)}")
    _check_tensor("w2", w2, 2, f"[S, H] = [{S}, {H}]")
    if tuple(w2.shape) != (S, H):
        raise InvalidValueError(f"w2 must have shape [S, H] = [{S}, {H}], got {tuple(w2.shape)}")
    _check_tensor("b2", b2, 1, f"[S] = [{S}]")
    if b2.shape[0] != S:
        raise InvalidValueError(f"b2 must have shape [S] = [{S}], got {tuple(b2.shape)}")
    for name, t in (("external", external), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t.dtype != state.dtype:
            raise InvalidTypeError(f"{name} has dtype {t.dtype} but state has {state.dtype}; all must match")
        if t.device != state.device:
            raise InvalidValueError(f"{name} is on {t.device} but state is on {state.device}; all must match")
    check_int("steps", steps, minimum=1)
    return external


def propagate(
    state: torch.Tensor,
    external: Optional[torch.Tensor],
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    steps: int,
    boundary: str = "wall",
    activation: str = "tanh",
    update: str = "replace",
    step_size: float = 1.0,
    backend: str = "auto",
    return_trajectory: bool = False,
) -> torch.Tensor:
    """Run ``steps`` synchronous steps of the cell rule and return the final state [B, X, Y, Z, S].

    Differentiable in state, external, w1, b1, w2, b2.  ``external`` [B, X, Y, Z, E] may be None (E = 0).
    Under autocast the rule computes in float32, whatever the inputs' lower precision (the op's autocast rule).

    ``return_trajectory=True`` returns instead the state of every step, [steps + 1, B, X, Y, Z, S]: entry 0 is
    the initial ``state``, entry ``t`` the state after ``t`` steps, the last entry the final state.  It is for
    inspection (:mod:`cubecore.training.viz` draws it).  Its last entry is the differentiable final state on both
    backends; the earlier entries are differentiable on the reference backend only (the kernel's saved
    trajectory is detached, since its backward recomputes from it rather than differentiating it).
    """
    check_bool("return_trajectory", return_trajectory)
    if (isinstance(state, torch.Tensor) and state.device.type in AUTOCAST_DEVICE_TYPES
            and torch.is_autocast_enabled(state.device.type)):
        # The same rule as the op's registered autocast kernel, applied before the argument checks so that
        # mixed inputs (a bf16 external from a projection layer, a float32 state) meet as float32 on both
        # backends, and the reference too runs with autocast off.
        tensors = [_autocast_to_float32(t) for t in (state, external, w1, b1, w2, b2)]
        with torch.autocast(state.device.type, enabled=False):
            return propagate(*tensors, steps=steps, boundary=boundary, activation=activation, update=update,
                             step_size=step_size, backend=backend, return_trajectory=return_trajectory)
    external = check_propagate_args(state, external, w1, b1, w2, b2, steps)
    codes = (
        _code("boundary", boundary, BOUNDARIES),
        _code("activation", activation, ACTIVATIONS),
        _code("update", update, UPDATES),
    )
    step_size = check_number("step_size", step_size)
    steps = int(steps)
    chosen = resolve_backend(backend, state.device, state.dtype, state.shape[-1])
    if chosen == "reference":
        if return_trajectory:
            return trajectory_reference(state, external, w1, b1, w2, b2, steps=steps, boundary=boundary,
                                        activation=activation, update=update, step_size=float(step_size))
        return propagate_reference(
            state, external, w1, b1, w2, b2, steps=steps, boundary=boundary, activation=activation,
            update=update, step_size=float(step_size),
        )
    keep = return_trajectory or (
        torch.is_grad_enabled() and any(t.requires_grad for t in (state, external, w1, b1, w2, b2)))
    final, trajectory = torch.ops.cubecore.propagate_forward(state, external, w1, b1, w2, b2, steps, *codes,
                                                             float(step_size), keep)
    if return_trajectory:
        # The op's trajectory is non-differentiable; its last entry is replaced by the differentiable final
        # state (the same values), so that a loss on trajectory[-1] trains as a loss on the final state does.
        return torch.cat([trajectory[:-1], final.unsqueeze(0)])
    return final


# --- registration of the op's fake (meta) kernels, autograd formula and autocast rule ----------------------

AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


def _autocast_to_float32(t):
    """What autocast does to the op's inputs: floating tensors of lower precision become float32."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.float()
    return t



def _contiguous_empty(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _forward_fake(state, external, w1, b1, w2, b2, steps, boundary, activation, update, step_size, keep):
    torch._check(steps >= 1)
    return _contiguous_empty(state), state.new_empty((steps + 1 if keep else 0, *state.shape))


def _backward_fake(grad_final, trajectory, external, w1, b1, w2, b2, steps, boundary, activation, update,
                   step_size):
    return tuple(_contiguous_empty(t) for t in (trajectory[0], external, w1, b1, w2, b2))


def _setup_context(ctx, inputs, output):
    state, external, w1, b1, w2, b2, steps, boundary, activation, update, step_size, keep = inputs
    final, trajectory = output
    ctx.kept_trajectory = keep
    ctx.rule = (steps, boundary, activation, update, step_size)
    ctx.save_for_backward(trajectory, state, external, w1, b1, w2, b2)
    # The trajectory is what the backward recomputes from, not a result: no gradient flows into it, and
    # autograd does not build a zero-filled [steps + 1, ...] gradient for it (or for an unused final state).
    ctx.mark_non_differentiable(trajectory)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_final, grad_trajectory):
    if grad_final is None:
        return (None,) * 12
    if not ctx.kept_trajectory:
        raise RuntimeError(
            "cubecore.propagate_forward was called with keep_trajectory=False, so it cannot be differentiated; "
            "call cubecore.propagate, which keeps the trajectory whenever gradients are needed"
        )
    trajectory, *inputs = ctx.saved_tensors
    if torch.is_grad_enabled():  # backward(create_graph=True): the gradient must itself be differentiable
        grads = _differentiable_backward(ctx, grad_final, inputs)
    else:
        grads = torch.ops.cubecore.propagate_backward(
            grad_final, trajectory, *inputs[1:], *ctx.rule  # the kernels make inputs contiguous
        )
    return (*grads, None, None, None, None, None, None)


def _differentiable_backward(ctx, grad_final, inputs):
    """The gradients as a graph autograd can differentiate again (double backward, gradient penalties): the
    kernel's backward is not differentiable, so they come from the reference rule, recomputed from the
    saved inputs (the same values up to rounding)."""
    steps, boundary, activation, update, step_size = ctx.rule
    leaves = [t if t.requires_grad else t.detach() for t in inputs]
    wanted = [i for i, t in enumerate(leaves) if t.requires_grad]
    with torch.enable_grad():
        final = propagate_reference(*leaves, steps=steps, boundary=BOUNDARIES[boundary],
                                    activation=ACTIVATIONS[activation], update=UPDATES[update],
                                    step_size=step_size)
        found = torch.autograd.grad(final, [leaves[i] for i in wanted], grad_final, create_graph=True,
                                    allow_unused=True)
    grads = [None] * len(inputs)
    for i, g in zip(wanted, found):
        grads[i] = g
    return grads


if EXTENSION_ERROR is None:
    torch.library.register_fake("cubecore::propagate_forward")(_forward_fake)
    torch.library.register_fake("cubecore::propagate_backward")(_backward_fake)
    torch.library.register_autograd("cubecore::propagate_forward", _backward, setup_context=_setup_context)
    for _device_type in AUTOCAST_DEVICE_TYPES:
        torch.library.register_autocast("cubecore::propagate_forward", _device_type, torch.float32)
