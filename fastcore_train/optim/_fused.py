"""What FusedAdamW and FusedSGD share: argument and parameter checks, fp32 master weights, the
two-pass step, loss-scaling protocols and checkpoint import.

A step is two passes over the gradients (fastcore_train/ops/optim_step.py):

1. ``grad_stats_`` -- only when needed: a non-finite check when the optimizer is driven by
   :class:`fastcore_train.amp.LossScaler`, and the global squared norm when a group clips.
2. One update op per parameter group (two when the group mixes parameters with and without
   master weights): unscale, clip, update on the float32 master, write the model weight.

The found-inf flag, the scale and the norm stay on the device; the update kernels read them, so
no step ever waits for the device.

State per parameter, in ``self.state`` and so in ``state_dict()``: the subclass's float32
buffers (``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``/``step`` for AdamW,
``momentum_buffer`` for SGD, the same keys and meaning as torch.optim) and ``master``, the
float32 master copy of a float16/bfloat16 parameter. The model's parameter is the master
rounded to its dtype after every step. With ``ema_decay``, also ``ema`` (the float32 EMA of the
weight, updated in the same pass) and ``ema_step`` (its update count, a float32 scalar).

Every change of the optimizer's own configuration is validated first and applied whole: a
rejected constructor argument, param group or checkpoint leaves the optimizer as it was.
"""
from __future__ import annotations

import contextlib
import copy
import numbers
from collections import defaultdict
from typing import Any, Optional

import torch

from fastcore_train.ops import optim_step as _ops

__all__ = ["FusedOptimizer"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)


def _device_scalar(x, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=torch.float32)
    return torch.tensor(float(x), dtype=torch.float32, device=device)


def _number(name: str, key: str, value, tensor_ok: bool = True) -> float:
    """``value`` as a float, after checking that it is a real number (or, where torch.optim
    takes one, a one-element tensor: read on the host, so only at configuration time)."""
    if tensor_ok and isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: a tensor {key} must have one element, got {value.numel()}")
        return float(value)
    if not isinstance(value, numbers.Real):
        what = "a number or a one-element tensor" if tensor_ok else "a number"
        raise TypeError(f"{name}: {key} must be {what}, got {type(value).__name__} {value!r}")
    return float(value)


class FusedOptimizer(torch.optim.Optimizer):
    """Base of the fused mixed-precision optimizers.

    Group options shared by all of them, besides torch.optim's:

    * ``master_weights`` -- ``None`` (default): a float32 master copy for float16/bfloat16
      parameters and none for float32 ones; ``True``/``False`` force it on/off. Without a
      master, a half-precision parameter is updated in float32 and rounded back every step,
      so updates smaller than half an ulp of the weight are lost.
    * ``max_grad_norm`` -- clip to this global norm (over every gradient of the optimizer,
      unscaled), as ``torch.nn.utils.clip_grad_norm_`` would; ``None`` disables it.
    * ``ema_decay``, ``ema_warmup`` -- keep an exponential moving average of the weights,
      updated inside the step (no extra pass over the parameters):
      ``ema <- lerp(ema, w, 1 - decay_t)`` on the new float32 weight ``w`` (the master), as
      ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))`` computes it when
      built before training and updated after each step: its first update copies ``w``.
      ``decay_t`` is ``ema_decay``, or with ``ema_warmup`` timm's ModelEmaV3 warmup
      ``min(ema_decay, 1 - (1 + n)^(-2/3))`` after ``n`` EMA updates (timm's ``step = n + 1``,
      its ``num_updates`` after this optimizer step). Skipped with the step on overflow.
      :meth:`ema_weights` swaps the EMA into the model; ``None`` (default): no EMA.

    torch.optim's implementation switches ``foreach`` and ``fused`` are accepted and ignored
    (the step is always this fused one; both True is refused, as torch.optim does);
    ``capturable=True`` and ``differentiable=True`` are refused at construction.

    Works with :class:`fastcore_train.amp.LossScaler` (one check pass fused with the norm, skip
    on device) and with ``torch.amp.GradScaler`` (``_step_supports_amp_scaling``: the scaler
    sets ``grad_scale`` and ``found_inf`` and the kernels unscale and skip on the device).

    The master copy is the reference for the weight once it exists: after loading weights into
    the model by other means than this optimizer's ``load_state_dict`` (which carries the
    masters), call :meth:`sync_masters_from_params`, or the next step overwrites them.

    Like torch.optim's in-place updates, a step bumps the version counter of every tensor it
    writes (parameters, state), so a graph that saved a parameter before the step raises
    "modified by an inplace operation" in backward instead of using the new value.
    """

    # torch.amp.GradScaler: set grad_scale / found_inf on us and call step() without syncing.
    _step_supports_amp_scaling = True
    # float32 per-element state of the subclass (besides "master")
    _buffer_keys: tuple = ()
    # the torch.optim class this one replaces, named in errors
    _torch_name: str = "Optimizer"

    def __init__(self, params, defaults: dict):
        self._check_group(defaults)
        # our hyperparameters (torch adds its own keys to self.defaults on load)
        self._group_defaults = dict(defaults)
        super().__init__(params, defaults)

    # ---- subclass hooks ----------------------------------------------------------------------

    def _check_group(self, group: dict) -> None:
        """Raises on hyperparameters the fused step does not support. Never mutates."""
        name, torch_name = type(self).__name__, self._torch_name
        lr = _number(name, "lr", group["lr"])
        if not lr >= 0.0:
            raise ValueError(f"{name}: invalid learning rate {group['lr']}")
        if not _number(name, "weight_decay", group["weight_decay"]) >= 0.0:
            raise ValueError(f"{name}: invalid weight_decay {group['weight_decay']}")
        mgn = group.get("max_grad_norm")
        if mgn is not None and not _number(name, "max_grad_norm", mgn, tensor_ok=False) > 0.0:
            raise ValueError(f"{name}: max_grad_norm must be None or > 0, got {mgn}")
        ema = group.get("ema_decay")
        if ema is not None and not 0.0 <= _number(name, "ema_decay", ema, tensor_ok=False) <= 1.0:
            raise ValueError(f"{name}: ema_decay must be None or in [0, 1], got {ema}")
        if group.get("ema_warmup", False) not in (True, False):
            raise ValueError(f"{name}: ema_warmup must be True or False, got "
                             f"{group.get('ema_warmup')!r}")
        if group.get("master_weights") not in (None, True, False):
            raise ValueError(f"{name}: master_weights must be None, True or False, got "
                             f"{group.get('master_weights')!r}")
        if group.get("foreach") and group.get("fused"):
            raise RuntimeError(f"{name}: `fused` and `foreach` cannot be `True` together (as in "
                               f"torch.optim.{torch_name}); {name} is always fused, leave both "
                               "at None")
        if group.get("capturable", False):
            raise ValueError(
                f"{name} does not support capturable=True: its step keeps the step counts, the "
                "bias corrections and the overflow skip on the device without a host sync, but "
                "it has not been validated under CUDA-graph capture; to capture the step in a "
                f"CUDA graph use torch.optim.{torch_name}(capturable=True)")
        if group.get("differentiable", False):
            raise ValueError(
                f"{name} does not support differentiable=True (autograd through the optimizer "
                f"step, e.g. for meta-learning); use torch.optim.{torch_name}"
                "(differentiable=True)")

    def _check_state(self, group: dict, p: torch.Tensor, state: dict, where: str) -> None:
        """Raises when a loaded per-parameter state lacks what the group's step needs."""

    def _init_state(self, group: dict, p: torch.Tensor, state: dict) -> None:
        """Adds the missing per-parameter buffers to ``state``."""
        raise NotImplementedError

    def _update(self, group, params, grads, states, masters, grad_scale, found_inf, sq_norm):
        """Runs the update op on one group's parameters (all with masters, or none)."""
        raise NotImplementedError

    # ---- param groups ------------------------------------------------------------------------

    def _check_params(self, params: list, group_index: int) -> None:
        """The dtypes the kernels take, and one device for the whole optimizer."""
        name = type(self).__name__
        device = next((p.device for g in self.param_groups for p in g["params"]), None)
        first: dict = {}
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                continue  # torch.optim's add_param_group names the problem
            where = f"parameter {i} of param group {group_index}"
            # torch.optim warns ("in future, this will cause an error") and updates such a
            # parameter twice per step; one fused pass cannot update a tensor twice
            if id(p) in first:
                raise ValueError(f"{name}: {where} is parameter {first[id(p)]} again; list each "
                                 "parameter once")
            first[id(p)] = i
            if p.dtype not in _DTYPES:
                raise TypeError(f"{name}: {where} is {p.dtype}; fused optimizers support "
                                "float32, float16 and bfloat16 parameters (use "
                                f"torch.optim.{self._torch_name} for {p.dtype})")
            if p.layout != torch.strided:
                raise TypeError(f"{name}: {where} is sparse ({p.layout}); fused optimizers "
                                "update dense parameters")
            if device is None:
                device = p.device
            elif p.device != device:
                raise ValueError(f"{name}: {where} is on {p.device} but other parameters are on "
                                 f"{device}; a fused optimizer steps tensors on one device (use "
                                 "one optimizer per device)")

    def add_param_group(self, param_group: dict) -> None:
        """torch.optim's ``add_param_group``, with every check made before the group is added:
        a rejected group leaves the optimizer unchanged."""
        if not isinstance(param_group, dict) or "params" not in param_group:
            return super().add_param_group(param_group)  # torch.optim's own error
        params = param_group["params"]
        if isinstance(params, set):
            return super().add_param_group(param_group)  # torch.optim's own error
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        options = {k: v for k, v in param_group.items() if k != "params"}
        self._check_group({**self.defaults, **options})
        self._check_params(tensors, len(self.param_groups))
        param_group["params"] = params  # a generator would be exhausted by now
        super().add_param_group(param_group)

    @staticmethod
    def _wants_master(group: dict, p: torch.Tensor) -> bool:
        mw = group.get("master_weights")
        return p.dtype in _HALF if mw is None else bool(mw)

    @staticmethod
    def _zeros(p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)

    @staticmethod
    def _lr_args(group: dict, device) -> tuple[float, Optional[torch.Tensor]]:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            return 0.0, lr.detach().to(device=device, dtype=torch.float32)
        return float(lr), None

    def _param_state(self, group: dict, p: torch.Tensor) -> dict:
        state = self.state[p]
        self._init_state(group, p, state)
        want = self._wants_master(group, p)
        if want and "master" not in state:
            state["master"] = p.detach().to(torch.float32, copy=True)
        elif not want and "master" in state:
            del state["master"]
        if group.get("ema_decay") is None:
            state.pop("ema", None)
            state.pop("ema_step", None)
        elif "ema" not in state:
            # the weight before this step (its first EMA update copies the new one)
            state["ema"] = self._zeros(p).copy_(state.get("master", p).detach())
            state["ema_step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        elif "ema_step" not in state:  # an EMA loaded without its count has started
            state["ema_step"] = torch.ones((), dtype=torch.float32, device=p.device)
        return state

    @staticmethod
    def _ema_args(group: dict, states: list) -> dict:
        """The update ops' EMA arguments for one group's parameters."""
        decay = group.get("ema_decay")
        if decay is None:
            return {}
        return dict(emas=[s["ema"] for s in states], ema_steps=[s["ema_step"] for s in states],
                    ema_decay=float(decay), ema_warmup=bool(group.get("ema_warmup", False)))

    @contextlib.contextmanager
    def ema_weights(self):
        """Context manager: the model's parameters hold their EMA (cast to their dtype) inside
        the block, for evaluation or saving, and their own values again after it (also on an
        exception). Master weights and optimizer state are not touched; a parameter without an
        EMA yet (no step taken) keeps its value, which is its EMA. Do not step inside the block.
        The writes are ``copy_`` under ``torch.no_grad()``, which bump version counters as any
        in-place write does: run forward passes inside the block, not across its edges.
        """
        if not any(g.get("ema_decay") is not None for g in self.param_groups):
            raise RuntimeError(f"{type(self).__name__}.ema_weights(): this optimizer keeps no "
                               "EMA of the weights; construct it with ema_decay=...")
        pairs = [(p, self.state[p]["ema"]) for g in self.param_groups for p in g["params"]
                 if "ema" in self.state.get(p, {})]
        saved = []
        try:
            with torch.no_grad():
                for p, ema in pairs:
                    saved.append(p.detach().clone())
                    p.copy_(ema)
            yield
        finally:
            with torch.no_grad():
                for (p, _), value in zip(pairs, saved):
                    p.copy_(value)

    @torch.no_grad()
    def sync_masters_from_params(self) -> int:
        """Copies each parameter's current value into its float32 master weight.

        Call it after writing weights into the model by any other way than this optimizer's
        ``load_state_dict`` -- ``model.load_state_dict(...)``, restoring the best epoch,
        loading pretrained weights -- when the optimizer has already stepped (masters are
        created at the first step). Otherwise the next step updates the stale masters and
        writes them back, undoing the load. Returns the number of masters refreshed.
        :class:`fastcore_train.EarlyStopping` and :func:`fastcore_train.transfer.load_pretrained`
        call it when they know the optimizer.
        """
        n = 0
        for group in self.param_groups:
            for p in group["params"]:
                master = self.state.get(p, {}).get("master")
                if master is not None:
                    master.copy_(p.detach())
                    n += 1
        return n

    # ---- the step ----------------------------------------------------------------------------

    def _gather(self):
        """The parameters with a gradient, per group, after checking them."""
        name = type(self).__name__
        work, device = [], None
        for gi, group in enumerate(self.param_groups):
            params = []
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                where = f"parameter {i} of param group {gi}"
                if g.layout != torch.strided:
                    raise TypeError(f"{name}: {where} has a sparse gradient; fused optimizers "
                                    "need dense gradients")
                if p.dtype not in _DTYPES:  # changed since construction, e.g. model.double()
                    raise TypeError(f"{name}: {where} is {p.dtype}; fused optimizers support "
                                    "float32, float16 and bfloat16 parameters (use "
                                    f"torch.optim.{self._torch_name} for {p.dtype})")
                if g.dtype != p.dtype:
                    raise TypeError(f"{name}: the gradient of {where} is {g.dtype} but the "
                                    f"parameter is {p.dtype}")
                if device is None:
                    device = p.device
                if p.device != device or g.device != device:
                    other = p.device if p.device != device else g.device
                    raise ValueError(f"{name}: {where} or its gradient is on {other} but other "
                                     f"parameters are on {device}; a fused optimizer steps "
                                     "tensors on one device (use one optimizer per device)")
                params.append(p)
            if params:
                work.append((group, params))
        return work, device

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: Optional[torch.Tensor] = None,
             found_inf: Optional[torch.Tensor] = None):
        """One optimizer step.

        ``grad_scale``: the gradients are scaled by it (they are unscaled on the fly, never
        written). ``found_inf``: skip the step, on the device, when it is non-zero. Both default
        to the attributes that ``torch.amp.GradScaler`` (and :class:`~fastcore_train.amp.
        LossScaler`) set on optimizers which declare ``_step_supports_amp_scaling``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check_finite = False
        if grad_scale is None and found_inf is None:
            grad_scale = getattr(self, "grad_scale", None)
            found_inf = getattr(self, "found_inf", None)
            # LossScaler's protocol: found_inf is a zeroed flag for this step to set
            check_finite = getattr(self, "_found_inf_is_output", False)
        self._fused_step(grad_scale=grad_scale, found_inf=found_inf, check_finite=check_finite)
        return loss

    @torch.no_grad()
    def _fused_step(self, grad_scale=None, found_inf=None, check_finite=False) -> None:
        """The step proper. With ``check_finite`` the statistics pass sets ``found_inf`` (a
        float32 scalar on the parameters' device, written in place) when a gradient has an
        inf/NaN, and the update skips on it; otherwise ``found_inf`` is only read."""
        work, device = self._gather()
        if not work:
            return
        if grad_scale is not None:
            grad_scale = _device_scalar(grad_scale, device)
        if found_inf is not None and not check_finite:
            found_inf = _device_scalar(found_inf, device)
        clip = any(group.get("max_grad_norm") is not None for group, _ in work)
        sq_norm = torch.zeros((), dtype=torch.float32, device=device) if clip else None
        if (check_finite and found_inf is not None) or clip:
            grads = [p.grad for _, params in work for p in params]
            _ops.grad_stats_(grads, found_inf if check_finite else None, sq_norm)
        for group, params in work:
            states = [self._param_state(group, p) for p in params]
            for with_master in (True, False):
                idx = [i for i, s in enumerate(states) if ("master" in s) == with_master]
                if not idx:
                    continue
                ps = [params[i] for i in idx]
                ss = [states[i] for i in idx]
                masters = [s["master"] for s in ss] if with_master else []
                self._update(group, ps, [p.grad for p in ps], ss, masters, grad_scale,
                             found_inf, sq_norm if group.get("max_grad_norm") else None)

    # ---- checkpoints -------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a checkpoint of this optimizer or of the matching torch.optim one.

        Everything is checked before anything changes (group count and sizes, the groups'
        hyperparameters, each state's keys, shapes and types): on an error the optimizer is
        untouched. Unlike torch.optim, state tensors are not cast to the parameter's dtype:
        buffers and master weights stay float32 (a bfloat16 master would defeat its purpose).
        Every tensor is copied, so the loaded optimizer never shares memory with
        ``state_dict``. A master missing from the checkpoint is recreated from the parameter
        at the next step.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"{type(self).__name__}.load_state_dict: expected a dict (from "
                            f"optimizer.state_dict()), got {type(state_dict).__name__}")
        state_dict = state_dict.copy()  # shallow, as torch.optim (pre-hooks may edit it)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups, state = self._validated_state(state_dict)
        self.__setstate__({"state": state, "param_groups": groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _validated_state(self, state_dict: dict) -> tuple[list, defaultdict]:
        """The param groups and state ``state_dict`` describes, built without touching ours."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError(f"{name}.load_state_dict: expected a dict with 'state' and "
                             "'param_groups' (from optimizer.state_dict())")
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: the state dict has {len(saved_groups)} "
                             f"parameter groups but the optimizer has {len(self.param_groups)}")
        groups, owner = [], {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{name}.load_state_dict: parameter group {gi} of the state dict "
                                 f"has {len(saved['params'])} parameters but the optimizer's has "
                                 f"{len(group['params'])}")
            new = dict(saved)
            new["params"] = group["params"]
            if "param_names" in group and "param_names" not in new:
                new["param_names"] = group["param_names"]
            for k, v in self._group_defaults.items():  # missing from torch.optim's groups
                new.setdefault(k, v)
            try:
                self._check_group(new)
            except (ValueError, TypeError, RuntimeError) as e:
                raise type(e)(f"{e} (parameter group {gi} of the state dict)") from None
            groups.append(new)
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                owner[pid] = (p, new, f"parameter {i} of param group {gi}")
        state: defaultdict = defaultdict(dict)
        for pid, saved in state_dict["state"].items():
            if pid not in owner:
                state[pid] = saved  # not ours: kept as is, as torch.optim does
                continue
            p, group, where = owner[pid]
            state[p] = self._import_state(p, saved, where)
            self._check_state(group, p, state[p], where)
        return groups, state

    def _import_state(self, p: torch.Tensor, saved, where: str) -> dict:
        name = type(self).__name__
        if not isinstance(saved, dict):
            raise TypeError(f"{name}.load_state_dict: the state of {where} must be a dict, got "
                            f"{type(saved).__name__}")
        out: dict[str, Any] = {}
        for k, v in saved.items():
            if k in ("step", "ema_step"):
                if not isinstance(v, (torch.Tensor, numbers.Real)) or \
                        torch.as_tensor(v).numel() != 1:
                    raise ValueError(f"{name}.load_state_dict: state {k!r} of {where} must be a "
                                     f"number or a one-element tensor, got {v!r}")
                out[k] = torch.as_tensor(v).detach().to(device=p.device, dtype=torch.float32,
                                                         copy=True).reshape(())
            elif k in self._buffer_keys or k in ("master", "ema"):
                if v is None:
                    continue
                if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                    raise TypeError(f"{name}.load_state_dict: state {k!r} of {where} must be a "
                                    f"floating-point tensor, got {type(v).__name__}")
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"{name}.load_state_dict: state {k!r} of {where} has shape "
                                     f"{list(v.shape)} but its parameter has shape "
                                     f"{list(p.shape)}")
                out[k] = self._zeros(p).copy_(v)
            elif isinstance(v, torch.Tensor):
                out[k] = v.detach().to(device=p.device, copy=True)
            else:
                out[k] = copy.deepcopy(v)
        return out
