"""What every two-pass samkernels optimizer shares: argument checks, gathering a group's tensors into
lists for the multi-tensor ops, the transient weight backups, exception-safe ``step(closure)``, and
the optimizer-wide state (noise seed and counter) in ``state_dict``.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import operator
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from samkernels import ops
from samkernels.ops import _PLAIN, _local_shards
from samkernels.optim.utils import bn_frozen, draw_seed

NONFINITE_POLICIES = ("skip", "skip_on_device", "raise", "unchecked")


class NonFiniteGradientError(FloatingPointError):
    """A pass produced inf/NaN gradients under ``nonfinite="raise"``.  When it is raised the weights
    are back at the mean and the optimizer state is as before the step."""


# --- argument checks (one line each at the call site, messages name the argument) ------------
def check_nonneg(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_beta(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_betas(betas) -> Tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_beta("betas[0]", betas[0])
    check_beta("betas[1]", betas[1])
    return tuple(betas)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


# SGD hyper-parameters torch.optim.SGD accepts outside the range where they mean anything:
# (key, in range, the range, what happens outside it)
_SGD_RANGES = (
    ("momentum", lambda v: v < 1, "[0, 1)",
     "the momentum buffer then never decays (>= 1) or grows geometrically (> 1)"),
    ("dampening", lambda v: v <= 1, "[0, 1]",
     "the gradient then enters the momentum buffer with the negative weight 1 - dampening"),
)


def warn_sgd_ranges(d: dict) -> None:
    """A UserWarning naming each SGD hyper-parameter in ``d`` (keywords or a group) that is outside
    its meaningful range, e.g. ``momentum=1.5``.  Never an error: torch.optim.SGD accepts them."""
    for key, ok, meaningful, why in _SGD_RANGES:
        if key in d and not (isinstance(d[key], (int, float)) and ok(d[key])):
            # stacklevel 3: the caller of the check (the constructor or add_param_group)
            warnings.warn(f"{key}={d[key]!r} is outside {meaningful}: {why}", UserWarning,
                          stacklevel=3)


# Parameter dtypes the fused ops take (real floating point).
_REAL_FLOATS = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})


class TwoPassOptimizer(torch.optim.Optimizer):
    """Base class.  Subclasses implement the phases; this class keeps the bookkeeping.

    Backups of the mean weights live in ``self._backups`` (keyed by parameter), outside
    ``self.state``: they are transient and never saved in checkpoints.

    Distributed data parallel (``ddp_model=model``, the ``DistributedDataParallel`` wrapper): in
    ``step(closure)`` the ascent pass runs under ``model.no_sync()``, so each rank perturbs with
    the gradient of its own shard, and the second pass all-reduces as usual.  That is m-sharpness
    with m = world size, micro-batch r = rank r's shard (docs/spec.md), at one all-reduce per step.  The
    inf/NaN decision of the ascent pass is agreed over the ranks (one 4-byte all-reduce).  For
    explicit phases run the first backward under ``model.no_sync()`` yourself.  Without
    ``ddp_model`` both passes all-reduce: SAM on the global batch (m = 1), two all-reduces a step.

    torch.compile: dynamo drops attribute assignments on an Optimizer (``self.x = ...``) made in a
    traced frame that also runs tensor ops (torch 2.13), so the phases never rebind attributes;
    they mutate the containers created in ``__init__`` in place (``list.clear()``, ``dict[k] = v``).
    """

    def __init__(self, params, defaults):
        self._layout = {"key": None, "group": None}  # see _check_sharding (add_param_group)
        super().__init__(params, defaults)
        self._backups: Dict[Tensor, Tensor] = {}
        self._perturbed: List[Tuple[List[Tensor], List[Tensor]]] = []  # (params, backups) now moved
        self._param_ids: Dict[Tensor, int] = {}
        self._extra_state: Dict[str, int] = {}
        self._grad_acc: Dict[Tensor, Tensor] = {}  # m-sharpness: summed second-pass gradients
        # the parameters with a gradient in some micro-batch of this step (a dict as an ordered
        # set): only they are zeroed and loaded, so an accumulator left over from an earlier step
        # never reaches a parameter that has no gradient now
        self._grad_touched: Dict[Tensor, None] = {}
        self.freeze_bn: Optional[torch.nn.Module] = None
        self.rho_schedule: Optional[Callable[[dict], float]] = None
        self.nonfinite = "skip"
        self.ddp_model: Optional[torch.nn.Module] = None
        self.capturable = False
        # capturable: the counters of _extra_state as 0-dim int64 tensors on the parameters'
        # device (see _counter_args); and how far each counter moved since the step in progress
        # marked it (what an abandoned step takes back)
        self._counters: Dict[str, Tensor] = {}
        self._counter_moves: Dict[str, int] = {}
        # transient: a skip decided in the first pass and waiting for second_step, the last step's
        # outcome (a bool, or the device flag under "skip_on_device"), how many GradScaler
        # stand-ins the ascent passes of this step used, and this step's device flag ("found")
        self._skip_state = {"pending": False, "last": False, "ascents": 0, "found": None,
                            "begun": False}
        self._scaler_gates: Dict[tuple, _ScalerGate] = {}
        self._memos: Dict[tuple, tuple] = {}  # see _memo
        # the step's plan (see _grouped): per with_grad, the cached grouping, the list objects it
        # hands out (id -> list), and the gradients its last validation fetched (id -> (ps, gs))
        self._plans: Dict[bool, _Plan] = {}
        self._plan_lists: Dict[int, list] = {}
        self._fresh_grads: Dict[int, Tuple[List[Tensor], List[Tensor]]] = {}

    # torch's LR schedulers warn "lr_scheduler.step() before optimizer.step()" unless
    # ``_opt_called`` is set, which their wrapper of ``step`` does; explicit phases never call
    # step(), so _finish_step sets it.  Kept in _skip_state (mutated in place) rather than as a
    # plain attribute, which dynamo would drop inside a compiled step (see the class docstring).
    @property
    def _opt_called(self) -> bool:
        return self._skip_state.get("stepped", False)

    @_opt_called.setter
    def _opt_called(self, value: bool) -> None:
        self._skip_state["stepped"] = bool(value)

    def add_param_group(self, param_group: dict) -> None:
        """torch.optim's, plus checks: real floating-point parameters that hold data, and valid
        hyper-parameters in every group (set per group or inherited).  A bad group is not added."""
        overrides = sorted(set(param_group) - {"params"}) if isinstance(param_group, dict) else []
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        try:
            if len({id(p) for p in group["params"]}) != len(group["params"]):
                raise ValueError(f"param_groups[{gi}] lists a parameter twice; it would be "
                                 "perturbed twice and its backup overwritten")
            for pi, p in enumerate(group["params"]):
                where = f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
                if not p.is_floating_point():
                    raise ValueError(f"{where} has dtype {p.dtype}; samkernels optimizers support "
                                     "real floating-point parameters only")
                if p.device.type == "meta":
                    raise ValueError(f"{where} is on the meta device and holds no data; "
                                     "materialize the model (e.g. to_empty) first")
            self._check_sharding(gi, group)
            if getattr(self, "capturable", False):  # a group added later: same device
                self._check_capturable(self.nonfinite)
            try:
                self._check_group(group)
            except ValueError as exc:
                if not overrides:
                    raise
                raise ValueError(
                    f"param_groups[{gi}] (sets {', '.join(overrides)}): {exc}") from None
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict) -> None:
        """Subclasses: raise ValueError naming the hyper-parameter that is out of range."""

    # -- FSDP2: parameters sharded as DTensors ----------------------------------------------------
    def _check_sharding(self, gi: int, group: dict) -> None:
        """Every parameter of the optimizer is laid out alike: all plain tensors, or all DTensors
        sharded over one process group (FSDP2's ``fully_shard``), so that each global quantity
        is one collective over that group.  Recorded for ``_sharded`` and ``_all_reduce``."""
        layout = self._layout
        for pi, p in enumerate(group["params"]):
            key, pg = _layout_of(p, f"param_groups[{gi}]['params'][{pi}]")
            if layout["key"] is None:
                layout.update(key=key, group=pg)
            elif key != layout["key"]:
                raise ValueError(
                    f"param_groups[{gi}]['params'][{pi}] is {_describe(key)} but the optimizer's "
                    f"first parameter is {_describe(layout['key'])}; samkernels optimizers need "
                    "all parameters laid out alike (with FSDP2, fully_shard the root module too)")

    @property
    def _sharded(self) -> bool:
        """True when the parameters are DTensor shards (FSDP2): norms, dot products and inf/NaN
        flags of the local shards are reduced over their process group."""
        layout = getattr(self, "_layout", None)  # a copied optimizer (__getstate__) has none
        return layout is not None and layout["group"] is not None

    def _over_shards(self, parts: List[Tensor]) -> List[Tensor]:
        """Per-list sums (0-dim squared norms, or ``samv_dots`` vectors) of this rank's shards ->
        ``[their total over all ranks]``, one collective; unchanged when not sharded."""
        if not self._sharded or not parts:
            return parts
        total = torch.stack(parts).sum(0)
        self._all_reduce([total])
        return [total]

    def _configure(self, freeze_bn, rho_schedule, nonfinite: str = "skip", ddp_model=None,
                   capturable: bool = False) -> None:
        if freeze_bn is not None and not isinstance(freeze_bn, torch.nn.Module):
            raise ValueError(f"freeze_bn must be the model (an nn.Module) or None, got "
                             f"{type(freeze_bn).__name__}")
        if rho_schedule is not None and not callable(rho_schedule):
            raise ValueError("rho_schedule must be a callable(group) -> rho, or None")
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        if ddp_model is not None and not (hasattr(ddp_model, "no_sync")
                                          and hasattr(ddp_model, "process_group")):
            raise ValueError("ddp_model must be the torch.nn.parallel.DistributedDataParallel "
                             f"model (it has no_sync() and process_group), got "
                             f"{type(ddp_model).__name__}")
        if ddp_model is not None and self._sharded:
            raise ValueError("ddp_model is for DistributedDataParallel models; these parameters "
                             "are FSDP2 shards (DTensors), which need no ddp_model")
        if capturable:
            self._check_capturable(nonfinite)
        self.freeze_bn, self.rho_schedule, self.nonfinite = freeze_bn, rho_schedule, nonfinite
        self.ddp_model = ddp_model
        self.capturable = bool(capturable)

    # -- capturable: counters on the device --------------------------------------------------------
    def _check_capturable(self, nonfinite: str) -> None:
        """``capturable=True`` needs a step without host syncs and its counters on one device."""
        if nonfinite not in ("skip_on_device", "unchecked"):
            raise ValueError(f"capturable=True needs nonfinite='skip_on_device' or 'unchecked', got "
                             f"{nonfinite!r}: the other policies read the inf/NaN flag on the "
                             "host, which a step replayed from a CUDA graph cannot do")
        devices = sorted({str(p.device) for g in self.param_groups for p in g["params"]})
        if len(devices) > 1:
            raise ValueError(f"capturable=True needs every parameter on one device (the step "
                             f"counters live there), got {', '.join(devices)}")

    def _counter_args(self, name: str, offset: int = 0) -> Tuple[int, Optional[Tensor]]:
        """``(step, device_step)`` of an op at counter ``name`` + ``offset``: the host value plus
        the offset and None; or, with ``capturable=True``, the offset and the counter's 0-dim
        int64 tensor on the parameters' device (made from the host value on first use), which the
        kernel adds on the device: a captured step replays with the counter's current value."""
        if not self.capturable:
            return self._extra_state[name] + offset, None
        c = self._counters.get(name)
        if c is None:
            c = self._counters[name] = torch.tensor(self._extra_state[name], dtype=torch.int64,
                                                    device=self._params_device())
        return offset, c

    def _params_device(self) -> torch.device:
        """The first parameter's device (one for every parameter where counters live there)."""
        return next(p.device for g in self.param_groups for p in g["params"])

    def _mark_counter(self, name: str) -> None:
        """A step starts drawing from counter ``name``: what ``_rewind_counter`` goes back to."""
        self._counter_moves[name] = 0

    def _advance_counter(self, name: str, k: int) -> None:
        """Counter ``name`` += k: on the host, or (capturable) on the device."""
        self._move_counter(name, k)
        self._counter_moves[name] = self._counter_moves.get(name, 0) + k

    def _rewind_counter(self, name: str) -> None:
        """Counter ``name`` back to where ``_mark_counter`` left it (an abandoned or skipped step
        draws nothing)."""
        moved = self._counter_moves.get(name, 0)
        if moved:
            self._move_counter(name, -moved)
        self._counter_moves[name] = 0

    def _move_counter(self, name: str, k: int) -> None:
        if self.capturable:
            self._counter_args(name)[1].add_(k)
        else:
            self._extra_state[name] += k

    def _counter_values(self) -> Dict[str, int]:
        """The optimizer-wide values with the device counters read back (a host sync, for
        checkpoints)."""
        extra = dict(self._extra_state)
        extra.update({name: int(c.item()) for name, c in self._counters.items()})
        return extra

    def _set_counter_values(self, extra: Dict[str, int]) -> None:
        """``_extra_state`` <- ``extra``, and the device counters filled in place (a graph that
        captured them keeps reading the same tensors)."""
        self._extra_state.update(extra)
        for name, c in self._counters.items():
            if name in extra:
                c.fill_(extra[name])

    # -- DDP: m-sharpness across ranks -----------------------------------------------------------
    def _shared_seed(self, seed) -> int:
        """``draw_seed(seed)``, one value on every rank when the parameters are shards: a drawn
        seed (``seed`` not an int) is rank 0's, broadcast over the shards' group, since every
        shard must draw from the whole parameter's stream."""
        value = draw_seed(seed)
        if self._sharded and not isinstance(seed, int):
            import torch.distributed as dist
            group = self._reduce_group()
            first = next(p for g in self.param_groups for p in g["params"])
            t = torch.tensor([value], dtype=torch.int64, device=first.device)
            dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
            value = int(t.item())
        return value

    def _reduce_group(self):
        """The process group of ``_all_reduce``: ``ddp_model``'s, else the parameters' shards'."""
        if self.ddp_model is not None:
            return self.ddp_model.process_group
        return self._layout["group"]

    def _rank_world(self) -> Tuple[int, int]:
        """(rank, world size) of ``ddp_model``'s process group; (0, 1) without one."""
        if self.ddp_model is None:
            return 0, 1
        import torch.distributed as dist
        group = self.ddp_model.process_group
        return dist.get_rank(group), dist.get_world_size(group)

    def _all_reduce(self, tensors: List[Tensor], op: str = "sum") -> None:
        """In place over ``_reduce_group()``, one collective for the whole list (flattened)."""
        import torch.distributed as dist
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX,
                        group=self._reduce_group())
        foreach_copy_(tensors, [v.view_as(t) for v, t in
                                       zip(flat.split([t.numel() for t in tensors]), tensors)])

    def _rho(self, group: dict) -> float:
        """The group's rho for this step: ``rho_schedule(group)`` when one is set.

        With a schedule the value in effect is written to ``group["rho"]`` (as LR schedulers write
        ``lr``), so logging ``param_groups[i]["rho"]`` tells the truth.  The constructor's (or the
        group's own) value is kept under ``"initial_rho"`` (as ``initial_lr``), saved with the
        group by ``state_dict()``; the schedule is called with ``group["rho"]`` set to it, so a
        schedule that scales ``group["rho"]`` sees the base value every step, as before (it does
        not compound), and a resumed run continues exactly.  To change the base value of a
        scheduled rho, set ``group["initial_rho"]``."""
        if self.rho_schedule is None:
            return group["rho"]
        group["rho"] = group.setdefault("initial_rho", group["rho"])
        rho = float(self.rho_schedule(group))
        if not rho >= 0:
            raise ValueError(f"rho_schedule returned {rho}; rho must be >= 0")
        group["rho"] = rho
        return rho

    # -- tensors -------------------------------------------------------------------------------
    def _param_id(self, p: Tensor) -> int:
        """Stable index of ``p`` over all groups (the noise counter's parameter word)."""
        if p not in self._param_ids:
            for i, q in enumerate(q for g in self.param_groups for q in g["params"]):
                self._param_ids.setdefault(q, i)
        return self._param_ids[p]

    def _memo(self, kind: str, ps: List[Tensor], build: Callable[[], Any]) -> Any:
        """``build()`` (lists derived from ``ps``: backups, state buffers) computed once per distinct
        parameter list and reused on later steps.  On many small tensors the per-tensor dict
        lookups of building them cost more than the fused kernels.  The entry holds ``ps`` itself,
        so the ids in its key cannot be reused by other tensors while it lives; load_state_dict
        (new state tensors) clears the entries.  Eager mode only: under torch.compile ``build()``
        runs every time."""
        if torch.compiler.is_compiling():
            # dynamo meets every parameter through ``ps`` before ``build`` looks them up in a dict
            # keyed by parameters: a tensor it first meets as such a key is guarded by identity
            # down to its .grad, which zero_grad frees, so each step dropped the compiled frame
            # (LookSAM's steps under nonfinite="skip" reached the recompile limit)
            for p in ps:
                p.shape  # noqa: B018 (the attribute read is what dynamo needs)
            return build()
        # a list of the step's plan (never mutated) is its own key: no per-tensor key
        planned = self._plan_lists.get(id(ps)) is ps
        key = (kind, id(ps)) if planned else (kind, tuple(map(id, ps)))
        hit = self._memos.get(key)
        if hit is not None:
            return hit[1]
        value = build()
        if value is None:  # not ready (e.g. state not created yet): nothing to remember
            return None
        if len(self._memos) >= 256:  # parameter lists that keep changing: do not grow without end
            self._memos.clear()
        self._memos[key] = (ps if planned else list(ps), value, _cpp_refs(value))
        return value

    def _backups_for(self, ps: List[Tensor]) -> List[Tensor]:
        """The backups of ``ps`` (``_backup`` of each), memoised per parameter list."""
        return self._memo("backups", ps, lambda: [self._backup(p) for p in ps])

    def _moved_are_grouped(self, moved: List[Tuple[List[Tensor], List[Tensor]]],
                           grouped: List[Tuple[dict, List[Tensor]]]) -> bool:
        """True when the parameters a phase moved (``moved``: (params, backups) pairs) are exactly,
        in order, those ``_grouped`` returns now: the usual step, where a phase needs no per-tensor
        set bookkeeping.  Eager only (False under torch.compile, which takes the general path).
        O(1) when both are lists of the current plans (the answer for a pair of plans is kept)."""
        if torch.compiler.is_compiling():
            return False
        if len(moved) == len(grouped) and all(m[0] is g[1] for m, g in zip(moved, grouped)):
            return True  # the very lists of the step's plan
        by_plan = self._plan_of([m[0] for m in moved]), self._plan_of([g[1] for g in grouped])
        if None not in by_plan:
            hit = self._memos.get(("moved_are_grouped",) + tuple(map(id, by_plan)))
            if hit is not None:
                return hit[1]
        same = [id(p) for ps, _ in moved for p in ps] == [id(p) for _, ps in grouped for p in ps]
        if None not in by_plan:  # (the entry holds both plans: their ids stay theirs)
            self._memos[("moved_are_grouped",) + tuple(map(id, by_plan))] = (by_plan, same)
        return same

    def _plan_of(self, parts: List[List[Tensor]]) -> Optional["_Plan"]:
        """The current plan whose parts are exactly ``parts``, or None."""
        for plan in self._plans.values():
            if len(plan.parts) == len(parts) and all(a is b for a, b in zip(plan.parts, parts)):
                return plan
        return None

    def _param_ids_for(self, ps: List[Tensor]) -> List[int]:
        """The noise counter's parameter words of ``ps`` (``_param_id`` of each), memoised."""
        return self._memo("param_ids", ps, lambda: [self._param_id(p) for p in ps])

    def _state_lists(self, ps: List[Tensor], *names: str) -> Optional[Tuple[List[Tensor], ...]]:
        """``[state[p][name] for p in ps]`` for each name, memoised; None while some entry is missing."""
        def build():
            sts = [self.state.get(p) for p in ps]
            if any(st is None or any(n not in st for n in names) for st in sts):
                return None
            return tuple([st[n] for st in sts] for n in names)
        return self._memo("state:" + ",".join(names), ps, build)

    def _backup(self, p: Tensor) -> Tensor:
        b = self._backups.get(p)
        if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
            b = torch.empty_like(p, memory_format=torch.preserve_format)
            self._backups[p] = b
        return b

    @staticmethod
    def _check_grad(gi: int, pi: int, p: Tensor) -> None:
        g = p.grad
        if g.is_sparse:
            raise ValueError(f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}) has a "
                             "sparse gradient; samkernels optimizers need dense gradients")
        if torch.is_complex(p) or torch.is_complex(g):
            raise ValueError(f"param_groups[{gi}]['params'][{pi}] is complex; samkernels "
                             "optimizers support real floating-point parameters only")
        if not p.is_floating_point():
            raise ValueError(f"param_groups[{gi}]['params'][{pi}] has dtype {p.dtype}; "
                             "parameters must be floating point")

    def _grouped(self, with_grad: bool = True) -> List[Tuple[dict, List[Tensor]]]:
        """Per (group, device): the parameters to work on, in group order.  ``with_grad`` keeps those
        with a gradient (checked dense and real); otherwise all that require grad.

        The grouping is the step's plan, cached (eager, plain tensors): each call checks it with a
        few C-level passes (the gradients fetched, which are None, sparse; which require grad;
        once per step, each parameter's data address, which moves with its device, dtype or
        storage) and hands
        out the same list objects while nothing changed, so that the lists derived from them
        (``_memo``, ``_flat``, ``_moved_are_grouped``) cost O(1) per step.  Any change (a
        gradient appearing or disappearing, ``p.data = ...``, ``module.to(...)``,
        ``add_param_group``, ``load_state_dict``) rebuilds it with the per-tensor checks."""
        layout = getattr(self, "_layout", None)  # (none in a copied optimizer)
        if torch.compiler.is_compiling() or layout is None or layout["key"] != ("plain",):
            return self._grouped_now(with_grad)
        plan = self._plans.get(with_grad)
        # the data addresses once per step (the first phase after a step ended or was
        # abandoned): a parameter's device or dtype cannot change inside a step, whose backups
        # were taken from the weights as they were
        epoch = self._skip_state.get("epoch", 0)
        other = self._plans.get(not with_grad)
        if plan is not None and plan.epoch != epoch and other is not None and \
                other.epoch == epoch and plan.same_addresses(other):
            plan.epoch = epoch  # the other plan's check of this step read these very addresses
        grads = None if plan is None else plan.check(self.param_groups, plan.epoch != epoch)
        if grads is None:  # no plan yet, or it changed: per-tensor checks, then a new plan
            out = self._grouped_now(with_grad)
            try:
                plan = _Plan(self.param_groups, out, with_grad)
            except RuntimeError:  # a parameter without a data address (no plan then)
                return out
            old = self._plans.get(with_grad)
            if old is not None:
                for lst in old.lists():
                    self._plan_lists.pop(id(lst), None)
            self._plans[with_grad] = plan
            for lst in plan.lists():
                self._plan_lists[id(lst)] = lst
            if other is not None:
                plan.share_addresses(other)
            grads = plan.check(self.param_groups, False)
            if grads is None:
                return out
        plan.epoch = epoch
        self._fresh_grads.clear()
        if with_grad:  # this call's gradients, for _grads and _grads_flag
            for part, gs in zip(plan.parts, grads):
                self._fresh_grads[id(part)] = (part, gs)
        return list(plan.out)

    def _grouped_now(self, with_grad: bool = True) -> List[Tuple[dict, List[Tensor]]]:
        """``_grouped`` without the plan: every parameter checked now."""
        out, real = [], _REAL_FLOATS
        for gi, group in enumerate(self.param_groups):
            ps = _all_usable(group["params"], with_grad)
            if ps is not None:  # the usual step: every parameter, no per-tensor Python
                out.extend((group, part) for part in _by_device(ps))
                continue
            ps = []
            for pi, p in enumerate(group["params"]):
                if with_grad:
                    g = p.grad
                    if g is None:
                        continue
                    # the fast test first (a few attribute reads per tensor per phase); the
                    # thorough one only to word the error.  autograd keeps g's dtype = p's.
                    if g.is_sparse or p.dtype not in real:
                        self._check_grad(gi, pi, p)
                elif not p.requires_grad:
                    continue
                ps.append(p)
            out.extend((group, part) for part in _by_device(ps))
        return out

    def _grads(self, ps: List[Tensor]) -> List[Tensor]:
        """``[p.grad for p in ps]``: for a list of this phase's plan, the gradients its check
        fetched (the phase calls ``_grouped()`` first; nothing replaces a gradient within it).
        Handed over once: the optimizer holds no gradient past its use (a gradient freed by
        ``zero_grad`` must not stay alive through the next backward)."""
        if torch.compiler.is_compiling():
            return [p.grad for p in ps]
        hit = self._fresh_grads.pop(id(ps), None)
        return hit[1] if hit is not None and hit[0] is ps else list(map(_GRAD, ps))

    def _flat(self, items) -> List[Tensor]:
        """The parameters of ``items`` (``(group, ps, ...)`` tuples, e.g. ``_grouped()``) in one
        list: the plan's own flat list when they are its parts."""
        plan = self._plans.get(True)
        if plan is not None and not torch.compiler.is_compiling() and \
                len(items) == len(plan.parts) and \
                all(it[1] is part for it, part in zip(items, plan.parts)):
            return plan.flat
        return [p for it in items for p in it[1]]

    # -- restore -------------------------------------------------------------------------------
    @property
    def is_perturbed(self) -> bool:
        """True between a perturbing phase and the update: the parameters are not the mean weights."""
        return bool(self._perturbed)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the mean weights back (exact in every dtype) and abandon the step in progress.  A
        no-op when nothing is perturbed."""
        self._restore_weights()
        self._skip_state["found"] = None
        self._skip_state["begun"] = False
        self._fresh_grads.clear()
        self._skip_state["epoch"] = self._skip_state.get("epoch", 0) + 1  # (see _grouped)

    @torch.no_grad()
    def _restore_weights(self) -> None:  # mid-step (m-sharpness): the step's flag stays
        for params, backups in self._perturbed:
            foreach_copy_(params, backups)
        self._perturbed.clear()

    def _mark_perturbed(self, params: List[Tensor], backups: List[Tensor]) -> None:
        self._perturbed.append((params, backups))
        if not torch.compiler.is_compiling():  # (dynamo 2.11 cannot trace id() of a list)
            self._fresh_grads.pop(id(params), None)  # (see _grads)

    def _take_perturbed(self) -> List[Tuple[List[Tensor], List[Tensor]]]:
        """The (params, backups) now moved, handed over: ``self._perturbed`` is emptied in place."""
        taken = list(self._perturbed)
        self._perturbed.clear()
        return taken

    @staticmethod
    def _copy_back(moved: List[Tuple[List[Tensor], List[Tensor]]], among: set,
                   outside: bool = False) -> None:
        """Restore by copy the moved parameters that are in ``among`` (``outside``: that are not):
        the ones no op put back, e.g. without a gradient in this pass or after an error.  (A set:
        torch.compile compares list items with ==.  SAM and BSAM keep their own loops: under
        torch.compile this call splits one more graph in their steps, tests/test_compile.py.)"""
        for ps, bs in moved:
            rest = [(p, b) for p, b in zip(ps, bs) if (p in among) != outside]
            if rest:
                foreach_copy_([p for p, _ in rest], [b for _, b in rest])

    def _require_unperturbed(self, what: str) -> None:
        if self._perturbed:
            raise RuntimeError(f"{what}: the parameters are still perturbed from an earlier phase; "
                               "finish the step (second_step) or call restore() first")

    def _begin_step(self) -> None:
        """The first phase of a step ran (first_step, or noise_step for RandomSAM): second_step may
        follow.  Cleared when the step finishes (``_finish_step``) or is abandoned (``restore``)."""
        self._skip_state["begun"] = True

    def _require_begun(self, first: str) -> None:
        """second_step without the step's first phase: an error (it used to take a plain base
        step silently).  ``base_step()`` is the explicit way to take one."""
        if not (self._skip_state.get("begun", False) or self.skip_pending):
            name = type(self).__name__
            raise RuntimeError(
                f"{name}.second_step: no step in progress; the phase order is {first} -> backward "
                "-> second_step (or use step(closure)).  For a plain base-optimizer step without "
                f"the perturbation (e.g. SAM every k steps), call {name}.base_step() after the "
                "backward")

    def base_step(self, zero_grad: bool = False, *, scaler=None) -> None:
        """A plain base-optimizer step with the gradient now in ``.grad``, at the current (mean)
        weights, without any perturbation.  Optimizers that have no separate base optimizer
        refuse it (see the subclass)."""
        name = type(self).__name__
        raise NotImplementedError(
            f"{name}.base_step: {name} has no plain base-optimizer step (its update is part of "
            "the algorithm and needs the step's noisy/perturbed pass); take full steps "
            "(step(closure), or the explicit phases)")

    def _require_idle(self, what: str) -> None:
        """No step in progress (nothing perturbed, no first phase waiting for second_step)."""
        self._require_unperturbed(what)
        if self._skip_state.get("begun", False) or self.skip_pending:
            raise RuntimeError(f"{what}: a step is in progress (its first phase ran); finish it "
                               "with second_step() or abandon it with restore() first")

    # -- non-finite gradients and GradScaler ------------------------------------------------------
    @property
    def step_skipped(self) -> bool:
        """True when the last finished step was skipped because a pass had inf/NaN gradients.
        (Under ``nonfinite="skip_on_device"`` this reads the device flag: a host sync.)"""
        return bool(self._skip_state["last"])

    def _found_inf(self, device: torch.device) -> Optional[Tensor]:
        """This step's device flag for the gated ops (``found_inf``), or None: nonzero when some
        pass so far had inf/NaN gradients.  Only set under ``nonfinite="skip_on_device"``."""
        found = self._skip_state["found"]
        return None if found is None else found.to(device)

    @property
    def skip_pending(self) -> bool:
        """True between a first phase that found inf/NaN gradients and ``second_step``, which then
        only finishes the skipped step (the second pass may be left out)."""
        return self._skip_state["pending"]

    def _grads_ok(self, ascent: bool, ps: List[Tensor], scaler) -> bool:
        """May a phase use the gradients of ``ps``?  With a GradScaler they are unscaled in place
        first.  False: skip the step.  ``nonfinite="raise"`` raises instead, weights at the mean."""
        if self.capturable and scaler is not None and scaler.is_enabled():
            raise ValueError(f"{type(self).__name__}: scaler= with capturable=True: a GradScaler "
                             "decides on the host whether the gradients are finite; use "
                             "nonfinite='skip_on_device' with a fixed loss scale instead")
        if not ps:
            return True
        # first-pass gradients differ per rank (DDP); shards differ in every pass (FSDP2)
        agree = (ascent and self.ddp_model is not None) or self._sharded
        if scaler is not None and scaler.is_enabled():
            # GradScaler unscales and checks once per optimizer per step, a SAM step has two passes
            # (2m with m-sharpness): each pass gets its own stand-in optimizer, all of whose checks
            # scaler.update() combines.  scaler.step(gate) calls gate.step() only if all is finite.
            key = ("ascent", self._skip_state["ascents"]) if ascent else ("descent",)
            if ascent:
                self._skip_state["ascents"] += 1
            gate = self._scaler_gates.get(key)
            if gate is None:
                gate = self._scaler_gates[key] = _ScalerGate(self)
            gate.finite = False
            scaler.step(gate)
            if not agree:
                return gate.finite
            flag = torch.tensor([0.0 if gate.finite else 1.0], device=ps[0].device)
            self._all_reduce([flag], "max")
            if gate.finite and bool(flag):  # another rank skips: this rank's scale backs off too
                poison = self._scaler_gates.get(("poison",))
                if poison is None:
                    inf = torch.full((1,), float("inf"), device=ps[0].device)
                    inf.grad = inf.clone()
                    poison = _ScalerGate(None, [{"params": [inf]}])
                    self._scaler_gates[("poison",)] = poison
                scaler.step(poison)
            return not bool(flag)
        if self.nonfinite == "unchecked":
            return True
        flag = self._grads_flag(ps)
        if agree:
            self._all_reduce([flag], "max")
        return self._flag_ok(flag, ascent)

    def _descent_ok(self, grouped: List[Tuple[dict, List[Tensor]]], scaler) -> bool:
        """``_grads_ok`` of the second pass for the ``_grouped()`` lists; an update that reduces
        the gradients anyway checks that reduction instead (the SAM variants)."""
        return self._grads_ok(False, self._flat(grouped), scaler)

    def _grads_flag(self, ps: List[Tensor]) -> Tensor:
        """``_nonfinite_flag`` of the gradients of ``ps``; for the plan's flat list, from the
        gradients its check fetched, already split by device."""
        plan = self._plans.get(True)
        # is_compiling first: dynamo (torch 2.11) cannot trace ``is`` between lists
        if not torch.compiler.is_compiling() and plan is not None and ps is plan.flat:
            fresh = [self._fresh_grads.get(id(part)) for part in plan.parts]
            if all(f is not None and f[0] is part for f, part in zip(fresh, plan.parts)):
                if len(fresh) == 1:
                    return _nonfinite_flag(None, [fresh[0][1]])
                by_device = [[] for _ in range(max(plan.part_device) + 1)]  # one check per device
                for f, d in zip(fresh, plan.part_device):
                    by_device[d].extend(f[1])
                return _nonfinite_flag(None, by_device)
        return _nonfinite_flag([p.grad for p in ps])

    def _flag_ok(self, flag: Tensor, ascent: bool) -> bool:
        """The policy's decision on a pass's inf/NaN flag (agreed over the ranks where needed):
        skip_on_device adds it to the step's device flag; skip and raise read it once."""
        if self.nonfinite == "skip_on_device":
            self._add_found(flag)
            return True
        if not bool(flag):  # the one read of the flag: free on the CPU, a scalar copy from a GPU
            return True
        if self.nonfinite == "raise":
            self.restore()
            self._finish_step(skipped=True)
            bad = [f"param_groups[{gi}]['params'][{pi}]" for gi, g in enumerate(self.param_groups)
                   for pi, p in enumerate(g["params"])
                   if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
            raise NonFiniteGradientError(
                f"{type(self).__name__}: the {'first (ascent)' if ascent else 'second'} pass gave "
                f"inf/NaN gradients in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; the "
                "weights are back at the mean and the optimizer state is unchanged (nonfinite="
                "'skip' skips such steps instead; with mixed precision use a GradScaler)")
        return False

    def _checked_norm(self, ps: List[Tensor], scaler, norm_of: Optional[Callable[[], Tensor]],
                      need_norm: bool, ascent: bool = True) -> Tuple[bool, Optional[Tensor]]:
        """A pass's inf/NaN check and its norm ``norm_of()`` (a 0-dim float64 tensor over every
        group and shard) with one read of the gradients: ``(ok, norm)``; ``ok`` False: skip the
        step (``norm`` None).  ``need_norm`` False: the pass needs no norm from here (one group:
        its op takes the norm itself), so without a check none is taken.  The ascent pass's norm,
        or (``ascent`` False) a second pass's reduction of g (GSAM's and LookSAM's <g, g>).

        Under skip, raise and skip_on_device the norm is the check: its squares are summed in
        float64, where no finite fp32/bf16/fp16 value can overflow (a square is < 2^256, a sum
        of < 2^63 of them < 2^319 < float64's 2^1024), and an inf/NaN gradient makes its term
        inf or NaN (0 * inf is NaN), so the norm is finite exactly when the gradients are.  (A
        non-finite weight under ASAM, Sigma under VSAM or float64 overflow can make it
        non-finite too; skip and raise then take the exact flag of ``_grads_ok``, a second read
        only on that rare path: they skip exactly when a gradient is inf/NaN.)  With a
        GradScaler, or no norm (``norm_of`` None), the check is ``_grads_ok``'s own read."""
        if norm_of is None or not ps or self.nonfinite == "unchecked" or (
                scaler is not None and scaler.is_enabled()):
            if not self._grads_ok(ascent, ps, scaler):
                return False, None
            return True, (norm_of() if need_norm and norm_of is not None and ps else None)
        norm = norm_of()
        agree = ascent and self.ddp_model is not None  # first-pass gradients differ per rank
        if not agree and self.nonfinite != "skip_on_device" and math.isfinite(norm.item()):
            return True, norm  # the one host read of the usual step; no flag ops (bench/RESULTS.md)
        if self.nonfinite == "skip_on_device" and not agree:
            # the flag in two ops: norm - norm is +0 for a finite norm, NaN for inf and NaN, and
            # a NaN flag is set (the ops skip on any nonzero, NaN included); float32 as the other
            # passes' flags.  (isfinite, ~ and float were six kernel launches on a GPU.)
            flag = (norm - norm).float()
        else:
            flag = (~torch.isfinite(norm)).float().reshape(1)
        if agree:
            self._all_reduce([flag], "max")
        if self.nonfinite != "skip_on_device":
            if not bool(flag):  # the one host read of the usual step
                return True, norm
            # a rank saw a non-finite norm: every rank takes the exact flag (same collectives;
            # a sharded norm is already global, but the exact flag is of this rank's shards)
            flag = self._grads_flag(ps)
            if agree or self._sharded:
                self._all_reduce([flag], "max")
        if not self._flag_ok(flag, ascent):
            return False, None
        return True, norm

    def _add_found(self, flag: Tensor) -> None:
        """skip_on_device, no host read: the flags of every pass of this step are summed on the
        device and the fused phases take their skip form when the sum is nonzero (``found_inf``).
        """
        found = self._skip_state["found"]
        self._skip_state["found"] = flag if found is None else found + flag.to(found.device)

    def _skip_first_pass(self) -> None:
        """The ascent gradients are not finite: back to the mean; second_step finishes the skip."""
        self.restore()
        self._skip_state["pending"] = True

    def _abandon_step(self) -> None:
        """A skipped step's end: the mean weights back, nothing else changed.  (The callers zero
        the gradients themselves: under torch.compile, zero_grad's graph break inside a helper
        would split one more graph.)"""
        self.restore()
        self._finish_step(skipped=True)

    def _finish_step(self, skipped: bool) -> None:
        self._fresh_grads.clear()  # (see _grads)
        self._skip_state["epoch"] = self._skip_state.get("epoch", 0) + 1  # (see _grouped)
        self._skip_state["stepped"] = True  # LR schedulers: a step happened (see _opt_called)
        self._skip_state["begun"] = False
        found = self._skip_state["found"]
        if found is not None:  # skip_on_device: the outcome stays on the device until asked for
            self._skip_state.update(pending=False, last=found, ascents=0, found=None)
        else:
            self._skip_state.update(pending=False, last=skipped, ascents=0)
            if skipped:
                self._rollback_skipped_step()
        self._counter_moves.clear()  # the step is over: nothing left to take back

    def _rollback_skipped_step(self) -> None:
        """Undo what a skipped step changed besides weights and state (BSAM: the noise counter)."""

    def _rollback_on_device(self, found: Tensor) -> None:
        """skip_on_device, before the update: undo on the device, where ``found`` is set, what the
        first phase changed outside the gated ops (VSAM: its Sigma step)."""

    # -- closure driver ------------------------------------------------------------------------
    def _run_pass(self, closure: Callable, ascent: bool, micro: Optional[int] = None,
                  at_mean: bool = False):
        """Run one forward/backward pass.  A closure that takes an argument is told which pass this
        is (``ascent=True`` for the pass whose gradient builds the perturbation), so it can use a
        different loss there (BiSAM's ascent loss, or any user loss).  With m-sharpness the closure
        gets the micro-batch index first: ``closure(i)`` or ``closure(i, ascent)``.  Positional
        parameters with a default are left alone unless named ``ascent`` (``_n_positional``).
        ``at_mean``: a descent pass at the unperturbed weights (LookSAM's one-pass steps), whose
        BatchNorm statistics update as in a first pass."""
        n = _n_positional(closure)
        frozen = self.freeze_bn is not None and not at_mean and (
            not ascent or getattr(self, "freeze_bn_noisy", False))
        # DDP: the ascent pass keeps each rank's own gradient (m-sharpness across ranks)
        local = self.ddp_model is not None and ascent
        nothing = contextlib.nullcontext
        with torch.enable_grad(), (bn_frozen(self.freeze_bn) if frozen else nothing()), \
                (self.ddp_model.no_sync() if local else nothing()):
            if micro is None:
                return closure(ascent) if n >= 1 else closure()
            if n == 0:
                raise TypeError("with m > 1 the closure must take the micro-batch index: "
                                "closure(i) or closure(i, ascent)")
            return closure(micro, ascent) if n >= 2 else closure(micro)

    # -- m-sharpness: second-pass gradients summed over micro-batches -----------------------------
    @torch.no_grad()
    def _accumulate_grads(self, first: bool) -> None:
        """acc <- grad the first time a parameter has a gradient in this step (``first``: micro-batch
        0 starts the step), acc += grad after that.  Buffers are transient."""
        if first:
            self._grad_touched.clear()
        fresh: Dict[tuple, Tuple[List[Tensor], List[Tensor]]] = {}
        again: Dict[tuple, Tuple[List[Tensor], List[Tensor]]] = {}
        for _, ps in self._grouped():
            for p in ps:
                g = p.grad
                acc = self._grad_acc.get(p)
                if acc is None or acc.shape != g.shape or acc.dtype != g.dtype \
                        or acc.device != g.device:
                    acc = self._grad_acc[p] = torch.empty_like(g)
                lists = again if p in self._grad_touched else fresh
                lists.setdefault((g.device, g.dtype), ([], []))
                lists[(g.device, g.dtype)][0].append(acc)
                lists[(g.device, g.dtype)][1].append(g)
                self._grad_touched[p] = None
        for accs, grads in fresh.values():
            foreach_copy_(accs, grads)
        for accs, grads in again.values():
            torch._foreach_add_(accs, grads)

    @torch.no_grad()
    def _load_accumulated_grads(self, scale: float) -> None:
        """.grad <- acc * scale for the parameters that had a gradient in this step.

        In place where ``.grad`` exists (it may be a DDP bucket view); the accumulator is consumed
        (scaled in place) and refilled by the next step's first touch."""
        by_key: Dict[tuple, Tuple[List[Tensor], List[Tensor]]] = {}
        for p in self._grad_touched:
            acc = self._grad_acc[p]
            if scale != 1.0:
                by_key.setdefault((acc.device, acc.dtype), ([], []))[0].append(acc)
            if p.grad is None:  # no gradient in the last micro-batch: hand the buffer over
                p.grad = self._grad_acc.pop(p)
            else:
                by_key.setdefault((acc.device, acc.dtype), ([], []))[1].append((p.grad, acc))
        for accs, pairs in by_key.values():
            if accs:
                torch._foreach_mul_(accs, scale)
            if pairs:
                foreach_copy_([g for g, _ in pairs], [a for _, a in pairs])
        self._grad_touched.clear()

    @staticmethod
    def _check_m(m) -> int:
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m must be an int >= 1 (the number of micro-batches), got {m!r}")
        return m

    def _micro_batch_passes(self, closure: Callable, m: int, scaler,
                            first_phase: Callable[[int], Any]):
        """m-sharpness (docs/spec.md): per micro-batch i, the first pass, ``first_phase(i)`` (its
        own perturbation), the second pass, its gradient accumulated and the mean weights back;
        then one ``second_step`` with the mean of the m gradients.  Returns the mean first-pass
        loss."""
        losses = []
        with self._restore_on_error():
            for i in range(m):
                losses.append(self._run_pass(closure, True, micro=i))
                first_phase(i)
                if self.skip_pending:
                    break
                self._run_pass(closure, False, micro=i)
                self._accumulate_grads(first=i == 0)
                self._restore_weights()  # back to the mean for the next micro-batch
            if not self.skip_pending:
                self._load_accumulated_grads(1.0 / m)
            self.second_step(scaler=scaler)
        return mean_loss(losses)

    def _two_passes(self, closure: Callable, scaler):
        """The m = 1 step of a two-pass optimizer: ascent pass, first_step, the second pass (left out
        when the first pass skipped the step), second_step; the mean weights back on any error."""
        with self._restore_on_error():
            loss = self._run_pass(closure, ascent=True)
            self.first_step(zero_grad=True, scaler=scaler)
            if not self.skip_pending:
                self._run_pass(closure, ascent=False)
            self.second_step(scaler=scaler)
        return loss

    @contextlib.contextmanager
    def _restore_on_error(self):
        """Any exception inside (a pass, a phase's argument check) restores the mean weights, and a
        step still in progress is undone as a skipped one is (noise counter, VSAM's Sigma): a retry
        then takes exactly the step an uninterrupted run would have taken."""
        try:
            yield
        except BaseException:
            in_progress = bool(self._perturbed) or self.skip_pending
            self.restore()
            if in_progress:
                self._rollback_skipped_step()
            raise

    # -- torch.distributed.checkpoint ------------------------------------------------------------
    def _step_without_closure(self, why: str, phases: str) -> None:
        """``step()`` without a closure: None after torch.distributed.checkpoint's call of it
        (``_checkpoint_init``), else an error naming what the step needs (``why``, may be empty)
        and the ``phases`` to call instead."""
        if self._checkpoint_init():
            return None
        raise RuntimeError(f"{type(self).__name__}.step needs a closure{why}; or call {phases} "
                           "yourself")

    def _checkpoint_init(self) -> bool:
        """True when ``step()`` came without a closure from torch.distributed.checkpoint, whose
        ``get/set_optimizer_state_dict`` call it (every gradient zero, every lr 0) to create the
        state the first step creates, so that an optimizer's state_dict has its entries before
        any step.  That step is taken here, on those zero gradients at lr 0; the weights and the
        optimizer-wide values (noise seed and counter) stay as they were.  False (nothing done)
        for any other caller."""
        frame = sys._getframe(2)  # (called by _step_without_closure)
        for _ in range(8):  # our step <- torch.optim's step wrappers <- _init_optim_state
            frame = frame.f_back
            if frame is None:
                return False
            if frame.f_code.co_name == "_init_optim_state" and \
                    frame.f_globals.get("__name__") == "torch.distributed.checkpoint.state_dict":
                break
        else:
            return False
        grads = [(p, p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]
        weights = [p.detach().clone() for p, _ in grads]
        extra = self._counter_values()

        def closure():  # each pass sees the zero gradients again
            for p, g in grads:
                p.grad = g

        self.step(closure)
        with torch.no_grad():
            foreach_copy_([p for p, _ in grads], weights)
        self._extra_state.clear()
        self._set_counter_values(extra)
        return True

    # -- state_dict: optimizer-wide values ride along under one key ------------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd["samkernels"] = dict(self._counter_values(), cls=type(self).__name__)
        if sd["param_groups"]:  # torch.distributed.checkpoint keeps only state and param_groups
            sd["param_groups"][0]["samkernels"] = dict(sd["samkernels"])
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("samkernels", None)
        groups = state_dict.get("param_groups", [])
        if groups and "samkernels" in groups[0]:  # the copy in group 0 (see state_dict)
            state_dict["param_groups"] = [dict(g) for g in groups]
            in_group = state_dict["param_groups"][0].pop("samkernels")
            extra = in_group if extra is None else extra
        if extra is not None and extra.get("cls") != type(self).__name__:
            raise ValueError(f"this state_dict was saved by {extra.get('cls')}, not "
                             f"{type(self).__name__}")
        for gi, (mine, theirs) in enumerate(zip(self.param_groups, state_dict["param_groups"])):
            if len(mine["params"]) != len(theirs["params"]):
                raise ValueError(f"param_groups[{gi}] has {len(mine['params'])} parameters but the "
                                 f"state_dict's has {len(theirs['params'])}")
        ids = [p for g in self.param_groups for p in g["params"]]
        for key, st in state_dict["state"].items():
            p = ids[key] if isinstance(key, int) and key < len(ids) else None
            for name, v in st.items():
                if p is not None and torch.is_tensor(v) and v.dim() > 0 and v.numel() != p.numel():
                    raise ValueError(f"state '{name}' of parameter {key} has {v.numel()} elements "
                                     f"but the parameter has {p.numel()} (shape {tuple(p.shape)})")
        super().load_state_dict(state_dict)
        self._memos.clear()  # the state tensors are new objects
        # torch.optim casts floating state to the parameter's dtype on load; our state is kept in
        # float32 for bf16/fp16 parameters, so put the saved tensors back losslessly.
        for key, st in state_dict["state"].items():
            if isinstance(key, int) and key < len(ids) and ids[key] in self.state:
                mine = self.state[ids[key]]
                for name, v in st.items():
                    if torch.is_tensor(v) and name in mine and mine[name].dtype != v.dtype:
                        mine[name] = v.to(device=ids[key].device, copy=True)
        if extra is not None:
            self._set_counter_values({k: v for k, v in extra.items() if k != "cls"})
        if self.capturable:
            self._check_one_step_count()

    def _check_one_step_count(self) -> None:
        """capturable: the Adam step counts of a group advance together on the device, so a
        loaded state must have one count per group."""
        for gi, g in enumerate(self.param_groups):
            counts = sorted({float(self.state[p]["step"]) for p in g["params"]
                             if p in self.state and "step" in self.state[p]})
            if len(counts) > 1:
                raise ValueError(f"param_groups[{gi}]: the state_dict's parameters are at Adam "
                                 f"steps {counts}; capturable=True needs one step count per group")


def foreach_copy_(dst: List[Tensor], src: List[Tensor]) -> None:
    """``torch._foreach_copy_``, also on DTensors (FSDP2 shards, which have no sharding rule for
    it): their local shards are copied."""
    if dst and type(dst[0]) not in _PLAIN:
        dst, src = _local_shards((dst, src))
    torch._foreach_copy_(dst, src)


def _layout_of(p: Tensor, where: str):
    """(layout key, process group to reduce over) of parameter ``p``: ("plain",) / None for a
    plain tensor, ("replicated",) / None for a DTensor that every rank holds whole, ("sharded",
    ranks) / the group for a DTensor sharded over one mesh dimension."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before its import
    if dtensor is None or not isinstance(p, dtensor.DTensor):
        return ("plain",), None
    dims = [d for d, pl in enumerate(p.placements) if pl.is_shard()]
    if any(pl.is_partial() for pl in p.placements) or len(dims) > 1:
        raise ValueError(f"{where} is a DTensor with placements {tuple(p.placements)}; samkernels "
                         "optimizers support parameters sharded over one mesh dimension (FSDP2's "
                         "fully_shard) or replicated")
    if not dims:
        return ("replicated",), None
    import torch.distributed as dist
    pg = p.device_mesh.get_group(dims[0])
    return ("sharded", tuple(dist.get_process_group_ranks(pg))), pg


def _describe(key: tuple) -> str:
    return {"plain": "a plain tensor", "replicated": "a replicated DTensor"}.get(
        key[0], f"a DTensor sharded over ranks {list(key[-1])}")


class _ScalerGate:
    """What ``GradScaler.step`` sees for one pass of a step: the optimizer's parameter groups (their
    gradients are unscaled in place and checked) and a ``step()`` that only records that the check
    passed.  The optimizer then runs its phase itself."""

    def __init__(self, opt: Optional[torch.optim.Optimizer], groups: Optional[list] = None):
        self._opt, self._groups = opt, groups
        self.finite = False

    @property
    def param_groups(self):  # the optimizer's, looked up each time (load_state_dict rebinds them)
        return self._opt.param_groups if self._opt is not None else self._groups

    def step(self) -> None:
        self.finite = True


# Per-tensor tests as C-level passes (map of an attribute getter): on thousands of small tensors
# a Python loop's per-tensor bytecode costs more than the fused kernels themselves.
_GRAD, _DEVICE = operator.attrgetter("grad"), operator.attrgetter("device")
_DTYPE, _SPARSE = operator.attrgetter("dtype"), operator.attrgetter("is_sparse")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_IS_NONE = functools.partial(operator.is_, None)

_IS_NOT_NONE = functools.partial(operator.is_not, None)
# the method itself, not methodcaller's name lookup and bound method per tensor (half the cost)
_DATA_PTR = getattr(torch._C, "TensorBase", Tensor).data_ptr


class _Plan:
    """The cached grouping of ``TwoPassOptimizer._grouped``: ``out`` its (group, part) pairs,
    ``parts`` the part lists, ``flat`` all of them in one list, and what it was built from (the
    groups and their parameter lists, which parameters were kept, every parameter's data
    address).  ``check`` tells whether it still holds."""

    def __init__(self, groups: list, out: List[Tuple[dict, List[Tensor]]], with_grad: bool):
        self.with_grad = with_grad
        self.groups = groups
        self.group_ids = [id(g) for g in groups]
        self.param_lists = [g["params"] for g in groups]
        self.lengths = [len(ps) for ps in self.param_lists]
        self.out = out
        self.parts = [ps for _, ps in out]
        self.flat = [p for ps in self.parts for p in ps]
        # each part's device, numbered densely in order of first appearance (_grads_flag makes
        # one check per number: a gap would be an empty check, a CPU zero copied to the GPU)
        devices = list(dict.fromkeys(ps[0].device for ps in self.parts))
        self.part_device = [devices.index(ps[0].device) for ps in self.parts]
        # per group: the kept mask (gradient present / requires grad) and the data addresses
        self.kept = [self._mask(ps) for ps in self.param_lists]
        self.addresses = [tuple(map(_DATA_PTR, ps)) for ps in self.param_lists]
        # per group: its parts, and whether they are the whole group in one list
        self.group_parts = [[ps for g, ps in out if g is group] for group in groups]
        self.whole = [len(gp) == 1 and len(gp[0]) == n and all(k)
                      for gp, n, k in zip(self.group_parts, self.lengths, self.kept)]
        self.epoch = None  # the step epoch of the last check of the addresses (see _grouped)

    def lists(self) -> List[list]:
        return self.parts + [self.flat]

    def share_addresses(self, other: "_Plan") -> None:
        """Take ``other``'s address tuples where they are equal to this plan's (same parameter
        lists), so that ``same_addresses`` compares them by identity."""
        if self._same_lists(other):
            self.addresses = [o if o == a else a for o, a in zip(other.addresses, self.addresses)]

    def same_addresses(self, other: "_Plan") -> bool:
        """True when ``other`` was built from the same parameter lists with the same data
        addresses (a check of ``other`` then also checks this plan's)."""
        return self._same_lists(other) and \
            all(a is b for a, b in zip(self.addresses, other.addresses))

    def _same_lists(self, other: "_Plan") -> bool:
        return other.groups is self.groups and len(other.param_lists) == len(self.param_lists) \
            and all(a is b for a, b in zip(other.param_lists, self.param_lists))

    def _mask(self, ps: List[Tensor]) -> tuple:
        if self.with_grad:
            return tuple(map(_IS_NOT_NONE, map(_GRAD, ps)))
        return tuple(map(_REQUIRES_GRAD, ps))

    def check(self, groups: list, addresses: bool) -> Optional[List[List[Tensor]]]:
        """The gradients of every part (``with_grad``; else empty lists) when the plan still
        holds for ``groups`` (``addresses``: the data addresses too), else None."""
        if groups is not self.groups or len(groups) != len(self.group_ids):
            return None
        out = []
        for gi, group in enumerate(groups):
            ps = group["params"]
            if id(group) != self.group_ids[gi] or ps is not self.param_lists[gi] or \
                    len(ps) != self.lengths[gi]:
                return None
            if self.with_grad:
                grads = list(map(_GRAD, ps))
                if tuple(map(_IS_NOT_NONE, grads)) != self.kept[gi]:
                    return None
                if self.whole[gi]:
                    got = [grads]
                else:
                    got = [list(map(_GRAD, part)) for part in self.group_parts[gi]]
                if any(any(map(_SPARSE, gs)) for gs in got):
                    return None  # the per-tensor path words the error
                out.extend(got)
            elif tuple(map(_REQUIRES_GRAD, ps)) != self.kept[gi]:
                return None
            else:
                out.extend([] for _ in self.group_parts[gi])
            if addresses and tuple(map(_DATA_PTR, ps)) != self.addresses[gi]:
                return None  # a parameter moved (device, dtype, storage)
        return out


def _cpp_refs(value) -> Any:
    """A C++-side reference to each plain tensor of ``value`` (a list of tensors, or a tuple of
    such lists), held beside a memoised value.  A tensor referenced only from Python has a C++
    use count of 1; an op call takes and drops a reference with the GIL released, and going back
    to 1 then takes the GIL to release the Python object, once per tensor and list (~0.1 us,
    as much as the rest of a CPU op on a tiny tensor).  Held here, the count never returns to 1
    during a call.  (Optimizer-owned tensors only: a parameter must keep a use count of 1 for
    ``torch.utils.swap_tensors``.)  None when there is nothing to hold."""
    lists = value if isinstance(value, tuple) else (value,)
    ts = [t for lst in lists if isinstance(lst, list) for t in lst if type(t) is Tensor]
    if not ts or _ScriptList is None:
        return None
    return _ScriptList(ts)


_ScriptList = getattr(torch._C, "ScriptList", None)


def _all_usable(params: List[Tensor], with_grad: bool) -> Optional[List[Tensor]]:
    """``params`` (a new list) when ``_grouped`` keeps every one of them: each has a dense
    gradient and a real floating dtype (``with_grad``), or requires grad.  None otherwise: the
    per-tensor loop then decides, and words the error.  Under torch.compile: None (dynamo traces
    the plain loop)."""
    if torch.compiler.is_compiling():
        return None
    if not with_grad:
        return list(params) if all(map(_REQUIRES_GRAD, params)) else None
    grads = list(map(_GRAD, params))
    if any(map(_IS_NONE, grads)) or any(map(_SPARSE, grads)) or \
            not _REAL_FLOATS.issuperset(map(_DTYPE, params)):
        return None
    return list(params)


def _by_device(ts: List[Tensor]) -> List[List[Tensor]]:
    """``ts`` split by device, in order of first appearance.  The usual case, one device, is
    tested by comparing devices: hashing a torch.device per tensor (a dict keyed by device) costs
    ~0.6 us, ten times the comparison, which adds up on thousands of small tensors."""
    if not ts:
        return []
    if not torch.compiler.is_compiling():  # (dynamo traces the plain dict below)
        devices = list(map(_DEVICE, ts))
        if devices.count(devices[0]) == len(devices):
            return [ts]
    by_dev: Dict[torch.device, List[Tensor]] = {}
    for t in ts:
        by_dev.setdefault(t.device, []).append(t)
    return list(by_dev.values())


@torch.no_grad()
def _nonfinite_flag(grads: Optional[List[Tensor]], by_device=None) -> Tensor:
    """A one-element float32 tensor on the first gradient's device: > 0 iff some entry is inf/NaN
    (0-dim for one device).

    One fused multi-tensor read per device (our ``nonfinite_flag``, in the gradients' own dtype:
    exactly "some element is inf/NaN", no sum that could overflow); nothing is read back here.
    (PyTorch's ``_amp_foreach_non_finite_check_and_unscale_`` does the same job but is ~20x
    slower on the CPU.)
    """
    by_device = _by_device(grads) if by_device is None else by_device  # (or given: the plan's)
    if len(by_device) == 1:  # the usual case: the op's 0-dim flag, no further small op (they run
        return ops.nonfinite_flag(by_device[0])  # cache-cold after a pass: bench/RESULTS.md)
    first = by_device[0][0].device
    return torch.stack([ops.nonfinite_flag(gs).to(first) for gs in by_device]).sum(0)


def closure_arity(fn: Callable) -> Optional[int]:
    """How many positional arguments a closure takes by samkernels' rule, None for ``*args``: its
    positional parameters without a default, plus one defaulted parameter named ``ascent`` right
    after them.  Other defaulted parameters are the closure's own (``def closure(inputs=x)``) and
    get nothing, so they are not overwritten with the pass flag."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 0
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    positional = [p for p in params
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    n = sum(p.default is inspect.Parameter.empty for p in positional)
    if n < len(positional) and positional[n].name == "ascent":  # def closure(i, ascent=False)
        n += 1
    return n


def _n_positional(fn: Callable) -> int:
    """How many positional arguments to pass closure ``fn``: ``closure_arity``, 2 for ``*args``."""
    n = closure_arity(fn)
    return 2 if n is None else n


def mean_loss(losses):
    """The m-sharpness step's return value: the mean of the micro-batches' first-pass losses."""
    if all(torch.is_tensor(x) for x in losses):
        return torch.stack([x.detach() for x in losses]).mean()
    if all(isinstance(x, (int, float)) for x in losses):
        return sum(losses) / len(losses)
    return losses[0]
