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
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..checks import check_bool, check_choice, check_int, check_number, check_tensor
from .reference import propagate_reference, trajectory_reference
from .op_args import DIFFERENTIABLE, FORWARD_INPUTS, TENSORS, OpArgs
from .rule import MAX_HIDDEN_LAYERS, Rule
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
    if isinstance(exc, AttributeError):  # it loaded, but lacks what these sources define
        return f"cubecore._C was built from older sources than this cubecore ({exc}); rebuild it: {REBUILD}"
    return f"the compiled extension cubecore._C could not be loaded ({exc}); build it: {REBUILD}"


BUILD_INFO = _build_info()
try:  # Loading the library runs its TORCH_LIBRARY initialisers, which define torch.ops.cubecore.
    from .. import _C

    EXTENSION_ERROR: Optional[str] = None
    # The largest state the CUDA kernels take, from the extension (kMaxCudaState in csrc/cell_rule.h).
    CUDA_MAX_STATE: Optional[int] = _C.CUDA_MAX_STATE
    # The dtypes the kernels of both devices compute in, from the extension (kKernelDtypes in csrc/op_args.h).
    KERNEL_DTYPES: Tuple[torch.dtype, ...] = tuple(getattr(torch, name) for name in _C.KERNEL_DTYPES)
except (ImportError, AttributeError) as exc:  # A source checkout that was never built, a build for another
    # torch, a broken build, a build of older sources (without a constant this front reads).
    EXTENSION_ERROR = extension_error(exc, BUILD_INFO, torch.__version__)
    CUDA_MAX_STATE = None  # no kernels at all
    KERNEL_DTYPES = ()
KERNEL_DEVICE_TYPES = ("cpu", "cuda")
# One call of the op computes at most CALL_WORK multiply-adds (propagate splits longer rollouts into several calls,
# so that Python sees Ctrl-C between them): a few seconds of forward and backward on one or two CPU cores.  Each
# cell and step counts its update net's weights, its depthwise perception's and CELL_STEP_COST for the rest (a
# small rule is slower per multiply-add).  A step has a fixed cost too (the threads meet between steps, tens of
# microseconds), so a call takes MAX_STEPS_PER_CALL steps at most, whatever the lattice.
CALL_WORK = 40 << 30  # the nca benchmark size (32^3, B = 5, 3D artefacts NCA): 21 steps per call
CELL_STEP_COST = 1024
MAX_STEPS_PER_CALL = 4096



def _built_kernels() -> Dict[str, bool]:
    """Device types with a registered kernel, read once at import (torch.compile then sees a constant)."""
    if EXTENSION_ERROR is not None:
        return {}
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {dev: has("cubecore::propagate_forward", key) for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


KERNEL_BUILT = _built_kernels()


def kernel_limit_reason(device_type: str, dtype: torch.dtype, state_size: int = 1, *,
                        hidden_layers: int = 1) -> Optional[str]:
    """Why the kernels for ``device_type``, once built, cannot take tensors of this dtype and state size, or
    this many hidden layers (None if they can).  These are all the limits of every forward and backward path:
    every other option of the rule family runs on every kernel, and a kernel that passes here does not fail later
    for its sizes.  The extension states them: where it is not loaded, the reason is that."""
    hidden_layers = check_int("hidden_layers", hidden_layers, minimum=1)
    if device_type not in KERNEL_DEVICE_TYPES:
        return f"there is no cubecore kernel for device type {device_type!r}"
    if EXTENSION_ERROR is not None:
        return EXTENSION_ERROR
    if dtype not in KERNEL_DTYPES:
        return f"the {device_type} kernel supports {_dtype_names(device_type)}, not {str(dtype).replace('torch.', '')}"
    if hidden_layers > MAX_HIDDEN_LAYERS:
        return f"the kernels run at most {MAX_HIDDEN_LAYERS} hidden layers, got {hidden_layers}"
    if device_type == "cuda":
        if CUDA_MAX_STATE is not None and state_size > CUDA_MAX_STATE:
            return f"the CUDA kernel supports state_size <= {CUDA_MAX_STATE} (S <= {CUDA_MAX_STATE}), got {state_size}"
    return None


def kernel_unavailable_reason(device: torch.device, dtype: torch.dtype, state_size: int = 1, *,
                              hidden_layers: int = 1) -> Optional[str]:
    """Why the fused kernel cannot run on tensors of this device, dtype and state size, with this many hidden
    layers (None if it can)."""
    device = torch.device(device)
    if EXTENSION_ERROR is not None:
        return EXTENSION_ERROR
    if not KERNEL_BUILT.get(device.type, False):
        if device.type == "cuda":
            return "cubecore was built without CUDA kernels (no CUDA torch or no CUDA toolkit at build time)"
        return f"there is no cubecore kernel for device type {device.type!r}"
    return kernel_limit_reason(device.type, dtype, state_size, hidden_layers=hidden_layers)


def cpu_engine(dtype: torch.dtype, hidden_sizes: Sequence[int]) -> Optional[str]:
    """The engine the CPU kernel runs the update net of a call on: ``"tile_gemm"`` (a tile of cells at a time,
    each layer one GEMM of oneDNN's micro-kernel: float32 with a first hidden layer of 64 or more values, on a
    CPU that the micro-kernel runs on) or ``"cells"`` (per-cell vector loops: float64, and the small rules, where
    they are faster); None where the CPU kernel does not run such a call."""
    hidden = [check_int("hidden_sizes", h, minimum=1) for h in hidden_sizes]
    if EXTENSION_ERROR is not None or kernel_limit_reason("cpu", dtype, hidden_layers=max(len(hidden), 1)):
        return None
    return _C.cpu_engine(dtype == torch.float32, hidden[0])


CPU_ENGINES = ("float32 calls with a first hidden layer of 64 or more values run the update net as tile GEMMs "
               "(oneDNN's f32 brgemm micro-kernel, through ATen), where this CPU runs it, and under autocast to "
               "bfloat16 on a CPU with AVX512-BF16 in bfloat16 with float32 accumulation (cpu_bfloat16); float64 "
               "and smaller rules run per-cell vector loops")


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
        "kernel_limits": {dev: _limits_text(dev) for dev in KERNEL_DEVICE_TYPES} if EXTENSION_ERROR is None else None,
        "cpu_engines": CPU_ENGINES if cpu_reason is None else None,
        "cpu_tile_gemm": cpu_reason is None and _C.tile_gemm_available(),
        "cpu_bfloat16": cpu_reason is None and _C.bf16_gemm_available(),
        "precisions": PRECISION_RULE,
    }


def _limits_text(device_type: str) -> str:
    """Every limit of a device type's kernels, in words (``kernel_limit_reason`` checks them)."""
    rule = f"; at most {MAX_HIDDEN_LAYERS} hidden layers"
    if device_type == "cuda":
        rule += f"; state_size <= {CUDA_MAX_STATE}" if CUDA_MAX_STATE is not None else ""
    rule += "; every option of the rule"
    return f"{_dtype_names(device_type)}{rule}; any lattice, batch, hidden and external size"


def _dtype_names(device_type: str) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in KERNEL_DTYPES)


_WARNED: set = set()


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, state_size: int = 1, *,
                    hidden_layers: int = 1, transform_reason: Optional[str] = None) -> str:
    """Turn ``"auto"`` into ``"kernel"`` or ``"reference"`` for these tensors and this depth, or under a
    differentiation the kernel cannot run under (``transform_reason``, from :func:`transform_reason`); check an
    explicit choice."""
    check_choice("backend", backend, BACKENDS)
    if backend == "reference":
        return "reference"
    reason = transform_reason or kernel_unavailable_reason(device, dtype, state_size, hidden_layers=hidden_layers)
    if reason is None:
        return "kernel"
    if backend == "kernel":
        raise UnavailableError(f"backend='kernel' was requested but {reason}")
    key = (torch.device(device).type, dtype, reason)
    if key not in _WARNED and not torch.compiler.is_compiling():
        _WARNED.add(key)
        warnings.warn(f"cubecore: using the pure-PyTorch reference because {reason}", RuntimeWarning, stacklevel=3)
    return "reference"


FORWARD_AD = ("forward-mode differentiation (torch.func.jvp, jacfwd, torch.autograd.forward_ad) is in use and "
              "the kernel has no forward-mode rule: the reference computes the tangents")
GRAD_TRANSFORM = ("a torch.func gradient transform (grad, vjp, jacrev, hessian) is in use, and torch runs no "
                  "custom op's backward under one (pytorch/pytorch#168393): the reference computes the gradients")


def transform_reason(*tensors: Optional[torch.Tensor]) -> Optional[str]:
    """Why the kernel cannot run this call's differentiation, if it cannot: a torch.func transform other than
    vmap anywhere on the stack (jvp or jacfwd: the kernel has no forward-mode rule, its tangents would be zeros;
    grad, vjp, jacrev: torch does not run a custom op's autograd formula under them), or dual tensors of
    torch.autograd.forward_ad (an error in the kernel).  vmap alone runs the kernel."""
    if torch.compiler.is_compiling():
        return None
    try:
        from torch._C._functorch import TransformType, get_interpreter_stack

        transforms = {interpreter.key() for interpreter in get_interpreter_stack() or ()}
    except (ImportError, AttributeError):  # another torch's internals: only dual tensors are seen then
        transforms = set()
    else:
        if TransformType.Jvp in transforms:
            return FORWARD_AD
        if TransformType.Grad in transforms:
            return GRAD_TRANSFORM
    if transforms:  # under vmap, dual tensors cannot be unpacked (and jvp, which makes them, is not in use)
        return None
    import torch.autograd.forward_ad as forward_ad

    dual = any(isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    return FORWARD_AD if dual else None


def _check_tensor(name: str, tensor: object, ndim: int, shape_doc: str) -> torch.Tensor:
    check_tensor(name, tensor, shape_doc, ndim=ndim)
    if not tensor.is_floating_point():
        raise InvalidTypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    return tensor


def _weight_names(count: int) -> List[Tuple[str, str]]:
    """The (weight, bias) names of an update net of ``count`` layers, as the docs call them."""
    return [(f"w{i + 1}", f"b{i + 1}") for i in range(count)]


def check_propagate_args(state, external, weights: Sequence[Optional[torch.Tensor]], perception, rule: Rule,
                         steps: int, fire_mask=None, dead_state=None) -> torch.Tensor:
    """Check shapes, dtypes and devices, naming the argument at fault; return ``external`` (made [B,X,Y,Z,0]
    when None).  ``steps`` is checked already."""
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
    rule.check_lattice(tuple(state.shape))
    S, E, K = state.shape[4], external.shape[4], rule.slots
    checked = [("external", external)]
    if perception is not None:
        _check_tensor("perception", perception, 3, f"[S, F, slots] = [{S}, F, {K}]")
        if perception.shape[0] != S or perception.shape[2] != K or perception.shape[1] < 1:
            raise InvalidValueError(f"perception must have shape [S, F, slots] = [{S}, F, {K}] (F >= 1) for "
                                    f"state_size {S} and the {rule.neighbourhood} neighbourhood, got "
                                    f"{tuple(perception.shape)}")
        checked.append(("perception", perception))
        reads, reads_doc = S * perception.shape[1] + E, "S*F+E"
    else:
        reads, reads_doc = K * S + E, f"{K}*S+E"
    if len(weights) < 4 or len(weights) % 2:
        raise InvalidValueError(f"the update net's tensors come in (weight, bias) pairs, at least two layers "
                                f"(w1, b1, w_out, b_out), got {len(weights)} tensors")
    names = _weight_names(len(weights) // 2)
    for i, (wname, bname) in enumerate(names):
        w, b = weights[2 * i], weights[2 * i + 1]
        last = i == len(names) - 1
        rows = "S" if last else "H"
        if i == 0:
            doc, cols = f"[{rows}, {reads_doc}]", reads
        else:
            doc, cols = f"[{rows}, {names[i - 1][0]}.shape[0]]", weights[2 * i - 2].shape[0]
        _check_tensor(wname, w, 2, doc)
        if w.shape[1] != cols or (last and w.shape[0] != S) or w.shape[0] < 1:
            hint = (" (does the external input size E match the one w1 was built for?)"
                    if i == 0 and perception is None and w.shape[1] > K * S else "")
            raise InvalidValueError(f"{wname} must have shape {doc} = [{S if last else 'H'}, {cols}], got "
                                    f"{tuple(w.shape)}{hint}")
        checked.append((wname, w))
        if b is not None:
            _check_tensor(bname, b, 1, f"[{w.shape[0]}]")
            if b.shape[0] != w.shape[0]:
                raise InvalidValueError(f"{bname} must have shape [{w.shape[0]}], got {tuple(b.shape)}")
            checked.append((bname, b))
    if dead_state is not None:
        _check_tensor("dead_state", dead_state, 1, f"[S] = [{S}]")
        if dead_state.shape[0] != S:
            raise InvalidValueError(f"dead_state must have shape [S] = [{S}], got {tuple(dead_state.shape)}")
        checked.append(("dead_state", dead_state))
    for name, t in checked:
        if t.dtype != state.dtype:
            raise InvalidTypeError(f"{name} has dtype {t.dtype} but state has {state.dtype}; all must match")
        if t.device != state.device:
            raise InvalidValueError(f"{name} is on {t.device} but state is on {state.device}; all must match")
    if fire_mask is not None:
        check_tensor("fire_mask", fire_mask, "[steps, B, X, Y, Z]", ndim=5)
        if fire_mask.dtype != torch.bool:
            raise InvalidTypeError(f"fire_mask must be a bool tensor, got {fire_mask.dtype}")
        if tuple(fire_mask.shape) != (steps, *state.shape[:4]):
            raise InvalidValueError(f"fire_mask must have shape [steps, B, X, Y, Z] = "
                                    f"{[steps, *state.shape[:4]]}, got {tuple(fire_mask.shape)}")
        if fire_mask.device != state.device:
            raise InvalidValueError(f"fire_mask is on {fire_mask.device} but state is on {state.device}")
    return external


def fire_masks(fire_rate: float, steps: int, state: torch.Tensor) -> Optional[torch.Tensor]:
    """Where each step's change applies, [steps, B, X, Y, Z] bool: Bernoulli(``fire_rate``) per cell and step
    from torch's default CPU generator, whatever the device (``torch.manual_seed`` reproduces it, and every backend
    and device sees the same masks for the same seed); None at rate 1."""
    if fire_rate >= 1.0:
        return None
    return (torch.rand((steps, *state.shape[:4])) < fire_rate).to(state.device)


def propagate(
    state: torch.Tensor,
    external: Optional[torch.Tensor],
    *weights: Optional[torch.Tensor],
    steps: int,
    perception: Optional[torch.Tensor] = None,
    neighbourhood: str = Rule.neighbourhood,  # the rule's defaults are Rule's (the original rule)
    boundary: str = Rule.boundary,
    activation: str = Rule.activation,
    output_activation: str = Rule.output_activation,
    update: str = Rule.update,
    step_size: float = Rule.step_size,
    fire_rate: float = 1.0,
    fire_mask: Optional[torch.Tensor] = None,
    alive_channel: Optional[int] = Rule.alive_channel,
    alive_threshold: float = Rule.alive_threshold,
    dead_state: Optional[torch.Tensor] = None,
    backend: str = "auto",
    return_trajectory: bool = False,
) -> torch.Tensor:
    """Run ``steps`` synchronous steps of the cell rule and return the final state [B, X, Y, Z, S].

    ``propagate(state, external, w1, b1, w_out, b_out, steps=...)`` runs one hidden layer,
    ``propagate(state, external, w1, b1, w2, b2, w_out, b_out, steps=...)`` two.  ``external`` [B, X, Y, Z, E]
    may be None (E = 0).  Each step, every cell:

    - *perceives* the cells of its ``neighbourhood`` (``von_neumann``: the six faces and itself, slots x-1, x+1,
      y-1, y+1, z-1, z+1, self; ``moore``: all 27, in the order of a 3x3x3 ``Conv3d`` kernel) under
      ``boundary`` (``zeros``, ``circular``, ``replicate``, ``reflect``: PyTorch's padding modes; ``wall`` and
      ``periodic`` are older names of the first two): without ``perception`` it reads their states concatenated,
      then its external input (w1 is [H, slots*S + E]); with a depthwise ``perception`` weight [S, F, slots]
      (``Conv3d(S, S*F, 3, groups=S, bias=False).weight.view(S, F, 27)`` for ``moore``) it reads channel
      ``c*F + f`` = filter f over channel c, then its external input (w1 is [H, S*F + E]);
    - computes a *change*: hidden layers with ``activation``, then w_out [S, H] with ``output_activation``
      (``tanh`` or ``identity``); a bias may be None (no bias);
    - *fires* where a Bernoulli(``fire_rate``) mask drawn from torch's generator is true, or where ``fire_mask``
      [steps, B, X, Y, Z] (bool) is: ``update="replace"`` takes the change as the new state there,
      ``"residual"`` adds ``step_size`` times it; a cell that does not fire keeps its state;
    - stays *alive* (with ``alive_channel`` set) where the largest value of that channel over its 3x3x3 block
      (cells beyond the lattice ignored) exceeds ``alive_threshold`` both before and after the step; other cells
      are set to ``dead_state`` [S] (zeros when None).

    Differentiable in state, external, perception and every weight and bias; the masks and ``dead_state`` are
    constants of the step.  Under autocast the rule computes in float32, whatever the inputs' lower precision
    (the op's autocast rule); the CPU kernel's tile GEMMs run the update net's products in bfloat16 under
    autocast to bfloat16 where the CPU has AVX512-BF16 (``cubecore.info()["cpu_bfloat16"]``).

    ``return_trajectory=True`` returns instead the state of every step, [steps + 1, B, X, Y, Z, S]: entry 0 is
    the initial ``state``, entry ``t`` the state after ``t`` steps, the last entry the final state.  It is for
    inspection (:mod:`cubecore.training.viz` draws it).  Its last entry is the differentiable final state on both
    backends; the earlier entries are differentiable on the reference backend only (the kernel's saved
    trajectory is detached, since its backward recomputes from it rather than differentiating it).
    """
    check_bool("return_trajectory", return_trajectory)
    rule = Rule(neighbourhood, boundary, activation, output_activation, update, step_size, alive_channel,
                alive_threshold)
    steps = check_int("steps", steps, minimum=1)
    fire_rate = check_number("fire_rate", fire_rate, minimum=0.0, maximum=1.0, strict_minimum=True)
    if fire_mask is not None and fire_rate < 1.0:
        raise InvalidValueError("pass fire_rate or fire_mask, not both (fire_mask says where every step fires)")
    if dead_state is not None and alive_channel is None:
        raise InvalidValueError("dead_state is the state of cells that the alive mask resets: set alive_channel "
                                "too, or leave dead_state None")
    return run_rule(state, external, weights, rule, steps, perception=perception, fire_rate=fire_rate,
                    fire_mask=fire_mask, dead_state=dead_state, backend=backend, return_trajectory=return_trajectory)


def run_rule(state: torch.Tensor, external: Optional[torch.Tensor], weights: Sequence[Optional[torch.Tensor]],
             rule: Rule, steps: int, *, perception: Optional[torch.Tensor] = None, fire_rate: float = 1.0,
             fire_mask: Optional[torch.Tensor] = None, dead_state: Optional[torch.Tensor] = None,
             backend: str = "auto", return_trajectory: bool = False) -> torch.Tensor:
    """:func:`propagate` for a rule whose options are already checked (a ``CubicCore``'s, checked when it was
    built): the tensors are checked here, the plain numbers not again, so that ``torch.compile(dynamic=True)``
    can trace it with symbolic ones."""
    autocast = (state.device.type if isinstance(state, torch.Tensor) and state.device.type in AUTOCAST_DEVICE_TYPES
                and torch.is_autocast_enabled(state.device.type) else None)
    if autocast is not None:
        # The op's autocast rule, applied before the argument checks so that mixed inputs (a bf16 external from a
        # projection layer, a float32 state) meet as AUTOCAST_DTYPE on both backends, and the reference too runs
        # with autocast off.  Autocast's own dtype may still choose the products' precision.
        lower = torch.get_autocast_dtype(autocast)
        state, external, perception, dead_state = (_autocast_input(t) for t in
                                                   (state, external, perception, dead_state))
        weights = tuple(_autocast_input(t) for t in weights)
        with torch.autocast(autocast, enabled=False):
            return _run_rule(state, external, weights, rule, steps, perception=perception, fire_rate=fire_rate,
                             fire_mask=fire_mask, dead_state=dead_state, backend=backend,
                             return_trajectory=return_trajectory, autocast_dtype=lower)
    return _run_rule(state, external, weights, rule, steps, perception=perception, fire_rate=fire_rate,
                     fire_mask=fire_mask, dead_state=dead_state, backend=backend, return_trajectory=return_trajectory)


def _run_rule(state, external, weights, rule: Rule, steps: int, *, perception, fire_rate, fire_mask, dead_state,
              backend, return_trajectory, autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    external = check_propagate_args(state, external, weights, perception, rule, steps, fire_mask, dead_state)
    if fire_mask is None:
        fire_mask = fire_masks(fire_rate, steps, state)
    dead_state = None if dead_state is None else dead_state.detach()
    hidden_layers = len(weights) // 2 - 1
    unrun = None if backend == "reference" else transform_reason(state, external, perception, *weights)
    chosen = resolve_backend(backend, state.device, state.dtype, state.shape[-1], hidden_layers=hidden_layers,
                             transform_reason=unrun)
    if chosen == "reference":
        run = trajectory_reference if return_trajectory else propagate_reference
        return run(state, external, *weights, steps=steps, perception=perception, fire_mask=fire_mask,
                   dead_state=dead_state, rule=rule)
    call = OpArgs.of(external, weights, rule, steps, perception=perception, fire_mask=fire_mask,
                     dead_state=dead_state, precision=product_precision(
                         state.device.type, state.dtype, autocast_dtype, [w.shape[0] for w in weights[:-2:2]]))
    keep = return_trajectory or (torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (state, *call.tensors())))
    chunk = steps if torch.compiler.is_compiling() else steps_per_call(state, weights, perception, steps)
    trajectories = []
    for first in range(0, steps, chunk):
        state, trajectory, _ = torch.ops.cubecore.propagate_forward(
            *call.part(first, min(chunk, steps - first)).forward_args(state, keep))
        trajectories.append(trajectory[:-1])
    if return_trajectory:
        # The op's trajectory is non-differentiable; its last entry is replaced by the differentiable final
        # state (the same values), so that a loss on trajectory[-1] trains as a loss on the final state does.
        return torch.cat([*trajectories, state.unsqueeze(0)])
    return state


PRECISION_RULE = ("the update net's products run in the inputs' own dtype ('ieee'), except: on the CPU, float32 "
                  "tile GEMMs under autocast to bfloat16 in bfloat16 where the CPU has AVX512-BF16 (cpu_bfloat16); "
                  "on CUDA (sm_80 or later), float32 on tensor cores in TF32 where torch allows TF32 for matmuls "
                  "(torch.backends.cuda.matmul.fp32_precision == 'tf32', e.g. torch.set_float32_matmul_precision"
                  "('high')), and in bfloat16 / float16 under autocast to them; accumulation, states and update "
                  "stay float32")


def product_precision(device_type: str, dtype: torch.dtype, autocast_dtype: Optional[torch.dtype] = None,
                      hidden_sizes: Sequence[int] = ()) -> str:
    """The precision (op_args.PRECISIONS) the kernel runs the update net's products of a call in, from the
    device, the inputs' dtype, autocast's dtype where autocast is on, and the update net's hidden sizes."""
    if device_type == "cpu":
        return _cpu_precision(dtype, autocast_dtype, hidden_sizes)
    if device_type == "cuda":
        return _cuda_precision(dtype, autocast_dtype)
    return "ieee"


def _cuda_precision(dtype: torch.dtype, autocast_dtype: Optional[torch.dtype]) -> str:
    """The CUDA kernels' products, following PyTorch's own switches for float32 GEMMs: tensor cores (TF32, or
    bfloat16 / float16 operands, float32 accumulation) on GPUs of compute capability 8.0 or later for float32
    inputs, where autocast asks for bfloat16 / float16, else where TF32 is allowed for matmuls
    (``torch.backends.cuda.matmul.fp32_precision == "tf32"``, which ``torch.set_float32_matmul_precision("high")``
    or ``"medium"`` and the legacy ``torch.backends.cuda.matmul.allow_tf32 = True`` set too; off by default).  The
    update net is a per-cell MLP, the products nn.Linear would run, so the matmul switch governs it, not cuDNN's
    convolution switch (on by default).  float64, the default "highest" and older GPUs: the inputs' own dtype."""
    if dtype != torch.float32 or not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return "ieee"
    if autocast_dtype in (torch.bfloat16, torch.float16):
        return "bfloat16" if autocast_dtype == torch.bfloat16 else "float16"
    return "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "ieee"


def _cpu_precision(dtype: torch.dtype, autocast_dtype: Optional[torch.dtype], hidden_sizes: Sequence[int]) -> str:
    """The CPU kernels' products: bfloat16 operands with float32 accumulation under autocast to bfloat16, where
    the call runs on the tile-GEMM engine and the CPU has AVX512-BF16 (oneDNN's bf16 kernel, about twice the f32
    rate); the inputs' own dtype otherwise (float64, float32 without autocast, the per-cell engine's small
    rules, other CPUs), as autocast does for an op without a lower-precision kernel."""
    if (autocast_dtype == torch.bfloat16 and dtype == torch.float32 and hidden_sizes
            and cpu_engine(dtype, hidden_sizes) == "tile_gemm" and _C.bf16_gemm_available()):
        return "bfloat16"
    return "ieee"


def steps_per_call(state: torch.Tensor, weights: Sequence[Optional[torch.Tensor]],
                   perception: Optional[torch.Tensor], steps: int) -> int:
    """How many steps one call of the op runs: a kernel call does not return until its steps are done, so long
    rollouts run as several calls of bounded work (CALL_WORK) and steps (MAX_STEPS_PER_CALL), and Python sees
    Ctrl-C between them.  It depends on the sizes only: the same rollout is always split the same way."""
    cells = state.numel() // state.shape[-1]
    per_cell = CELL_STEP_COST + sum(w.numel() for w in weights if w is not None)
    per_cell += 0 if perception is None else perception.numel()
    return max(1, min(steps, MAX_STEPS_PER_CALL, CALL_WORK // (cells * per_cell)))


# --- registration of the op's fake (meta) kernels, autograd formula and autocast rule ----------------------

# The op's autocast rule, stated once: on these device types, under autocast, it computes in AUTOCAST_DTYPE.  The
# op's registered autocast kernel applies it to direct calls; propagate applies it (with _autocast_input, as
# torch's own rule casts: floating tensors other than float64) before its checks, for both backends.
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")
AUTOCAST_DTYPE = torch.float32


def _autocast_input(t):
    """What the op's autocast rule does to an input: floating tensors other than float64 become AUTOCAST_DTYPE."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(AUTOCAST_DTYPE)
    return t


def _contiguous_empty(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _forward_fake(*args):
    state, call, keep = OpArgs.from_forward(args)
    torch._check(call.steps >= 1)
    life_steps = call.steps if keep and call.rule.alive_channel is not None else 0
    return (_contiguous_empty(state), state.new_empty((call.steps + 1 if keep else 0, *state.shape)),
            state.new_empty((life_steps, *state.shape[:4]), dtype=torch.uint8))


def _backward_fake(*args):
    grad_final, trajectory, _, call = OpArgs.from_backward(args)
    return tuple(_contiguous_empty(t) if t is not None else grad_final.new_empty((0,))
                 for t in (trajectory[0], *call.tensors()[:8]))


def _setup_context(ctx, inputs, output):
    state, call, keep = OpArgs.from_forward(inputs)
    final, trajectory, life = output
    ctx.kept_trajectory = keep
    ctx.call = replace(call, **{name: None for name in TENSORS})  # the tensors go to save_for_backward
    ctx.present = [t is not None for t in (state, *call.tensors()[:8])]
    ctx.save_for_backward(trajectory, life, state, *call.tensors())
    # The trajectory is what the backward recomputes from, not a result: no gradient flows into it, and
    # autograd does not build a zero-filled [steps + 1, ...] gradient for it (or for an unused final state).
    ctx.mark_non_differentiable(trajectory, life)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_final, grad_trajectory, grad_life):
    if grad_final is None:
        return (None,) * FORWARD_INPUTS
    if not ctx.kept_trajectory:
        raise RuntimeError(
            "cubecore.propagate_forward was called with keep_trajectory=False, so it cannot be differentiated; "
            "call cubecore.propagate, which keeps the trajectory whenever gradients are needed"
        )
    trajectory, life, state, *tensors = ctx.saved_tensors
    call = replace(ctx.call, **dict(zip(TENSORS, tensors)))
    if torch.is_grad_enabled():  # backward(create_graph=True): the gradient must itself be differentiable
        grads = _differentiable_backward(call, state, grad_final)
    else:
        # the kernels make inputs contiguous
        grads = torch.ops.cubecore.propagate_backward(*call.backward_args(grad_final, trajectory, life))
        grads = [g if present else None for g, present in zip(grads, ctx.present)]
    return (*grads,) + (None,) * (FORWARD_INPUTS - len(grads))


def _differentiable_backward(call: OpArgs, state: torch.Tensor, grad_final: torch.Tensor):
    """The gradients as a graph autograd can differentiate again (double backward, gradient penalties): the
    kernel's backward is not differentiable, so they come from the reference rule, recomputed from the
    saved inputs (the same values up to rounding).

    The recompute reads each input through an alias of its own (``view_as``), and the gradients are taken with
    respect to the aliases: they are then this call's partial derivatives only.  Taken with respect to the
    inputs themselves, a path from the state back through earlier op calls of a chunked rollout to the same
    weights would count those calls again (their own backward adds them); the aliases still link every gradient
    to the inputs' history, so it stays differentiable through them."""
    leaves = [t if t is None else t.view_as(t) if t.requires_grad else t.detach()
              for t in (state, *call.tensors()[:8])]
    aliased = replace(call, **dict(zip(TENSORS, leaves[1:])))
    wanted = [i for i, t in enumerate(leaves) if t is not None and t.requires_grad]
    with torch.enable_grad():
        final = propagate_reference(leaves[0], aliased.external, *aliased.weights(), steps=call.steps,
                                    perception=aliased.perception, fire_mask=call.fire_mask,
                                    dead_state=call.dead_state, rule=call.rule, precision=call.precision)
        found = torch.autograd.grad(final, [leaves[i] for i in wanted], grad_final, create_graph=True,
                                    allow_unused=True)
    grads = [None] * len(DIFFERENTIABLE)
    for i, g in zip(wanted, found):
        grads[i] = g
    return grads


if EXTENSION_ERROR is None:
    torch.library.register_fake("cubecore::propagate_forward")(_forward_fake)
    torch.library.register_fake("cubecore::propagate_backward")(_backward_fake)
    torch.library.register_autograd("cubecore::propagate_forward", _backward, setup_context=_setup_context)
    for _device_type in AUTOCAST_DEVICE_TYPES:
        torch.library.register_autocast("cubecore::propagate_forward", _device_type, AUTOCAST_DTYPE)
