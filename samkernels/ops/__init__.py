"""The public multi-tensor ops: ``samkernels.ops.<name>`` for every phase of the op table.

Each function covers a whole list of tensors, and is generated from its entry in
:mod:`samkernels.ops._spec`: the arguments in table order (``found_inf=None`` where the op takes
the skip flag; ``grad_sumsq``'s ``adaptive=False, eta=0.0``), then the keyword-only ``backend``
(None: the dispatcher's choice, see :mod:`samkernels._dispatch`; else reference | cpu | triton |
cuda).  A wrapper runs the checks every backend shares, asks the dispatcher for the implementation
and forwards the arguments.  Semantics: the same-named function of :mod:`samkernels.ops.reference`
(the executable spec), quoted in each wrapper's docstring.

The shared checks come from the argument roles, and each costs O(1) per call (never per tensor):
  * every tensor list is as long as the first one (``params``; ``grads`` for ``vsam_sumsq``); an
    optional state list (role ``state?``) may also be empty;
  * ``param_ids`` holds one id per parameter;
  * a flag that needs a list is not set without it (``bsam_update_``: ``released_order`` needs
    ``accums``);
  * ``found_inf`` is None or a one-element tensor on the parameters' device;
  * ``device_step`` (the ops that take a ``step``) and ``debias_step`` (``ivon_update_``) are
    None or one-element int64 tensors on the parameters' device.
Empty lists run the reference on every backend (there is nothing to launch, and a compiled op
could not dispatch without a tensor): nothing changes, and a norm op returns its norm argument or a
zero float64 norm.
The per-tensor checks (each entry's dtype, size and device) stay in the backends, which read every
tensor anyway.  A failed shared check raises :class:`OpArgumentError`.

Sharded tensors (``DTensor``, e.g. the parameters of an FSDP2 ``fully_shard`` model): when the
lead list holds DTensors, every list is replaced by its entries' local shards and the op runs on
this rank's part only.  A returned norm or dot product is then this rank's contribution: the
caller reduces it over the parameters' mesh (the optimizers do, one collective per pass).
"""
from __future__ import annotations

import linecache
import sys
import warnings
from typing import Sequence

import torch
from torch import Tensor

from samkernels import _dispatch
from samkernels.ops import _library  # noqa: F401  (defines the schemas and fakes of the table)
from samkernels.ops import reference
from samkernels.ops._spec import PHASES, SYMINT, TENSOR_LIST, OpSpec, i64 as _i64

__all__ = list(PHASES) + ["OpArgumentError"]


class OpArgumentError(ValueError, RuntimeError):
    """A bad argument to a ``samkernels.ops`` op, named in the message.

    A ``ValueError`` since it is a bad argument, and a ``RuntimeError`` like the errors the
    compiled kernels raise for the same mistakes (which code may already catch)."""


def _lengths_error(op: OpSpec, values: Sequence) -> None:
    """Raise for the first argument whose length differs from the lead list's (the slow path of
    the generated length test, so the message costs nothing when the lengths are right)."""
    named = dict(zip(op.arg_names, values))
    lead = op.lists[0].name
    n = len(named[lead])
    for a in op.lists[1:]:
        k = len(named[a.name])
        if k != n and not (a.role == "state?" and k == 0):
            optional = " (or 0: the list is optional)" if a.role == "state?" else ""
            raise OpArgumentError(f"{op.name}: {a.name} has {k} tensors but {lead} has {n}"
                                  f"{optional}")
    if op.takes_ids and len(named["param_ids"]) != n:
        raise OpArgumentError(f"{op.name}: param_ids has {len(named['param_ids'])} entries but "
                              f"{lead} has {n}")


def _requirement_error(op: OpSpec, index: int) -> None:
    flag, needed, why = op.requires[index]
    raise OpArgumentError(f"{op.name}: {flag}=True needs {needed} ({why})")


def _found_inf_error(name: str, found_inf, lead: Sequence[Tensor]) -> None:
    if not isinstance(found_inf, Tensor):
        raise TypeError(f"{name}: found_inf must be None or a tensor, got "
                        f"{type(found_inf).__name__}")
    if found_inf.numel() != 1:
        raise OpArgumentError(f"{name}: found_inf must hold one element, got shape "
                              f"{list(found_inf.shape)}")
    if lead and found_inf.device != lead[0].device:
        raise OpArgumentError(f"{name}: found_inf is on {found_inf.device} but the parameters "
                              f"are on {lead[0].device}")


def _step_tensor_error(name: str, arg: str, t, lead: Sequence[Tensor]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: {arg} must be None or a tensor, got {type(t).__name__}")
    if t.numel() != 1 or t.dtype != torch.int64:
        raise OpArgumentError(f"{name}: {arg} must be a one-element int64 tensor, got "
                              f"{t.dtype} of shape {list(t.shape)}")
    if lead and t.device != lead[0].device:
        raise OpArgumentError(f"{name}: {arg} is on {t.device} but the parameters are on "
                              f"{lead[0].device}")


def _check_devices(op: OpSpec, values: Sequence) -> None:
    """Every tensor of every list on the first one's device (the reference backend only: it would
    compute across devices, where a kernel refuses)."""
    named = dict(zip(op.arg_names, values))
    lead = op.lists[0].name
    device = named[lead][0].device
    for a in op.lists:
        for i, t in enumerate(named[a.name]):
            if t.device != device:
                raise OpArgumentError(f"{op.name}: {a.name}[{i}] is on device {t.device} but "
                                      f"{lead}[0] is on {device}")


_PLAIN = (Tensor, torch.nn.Parameter)  # what the lead list usually holds: no DTensor test needed


def _local_shards(lists: tuple) -> tuple:
    """Each list with its DTensor entries replaced by their local shards (see the module
    docstring).  Reached only when the lead list's first entry is not a plain tensor."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # none exists before it is imported
    if dtensor is None:
        return lists
    cls = dtensor.DTensor
    return tuple([t._local_tensor if isinstance(t, cls) else t for t in lst] for lst in lists)


def _block_id(pid: int, blocks: int) -> int:
    """``pid`` with ``blocks`` more Philox blocks in its high 32 bits (reference.first_element),
    as the int64 the schema takes."""
    return _i64((pid & 0xFFFFFFFF) | ((((pid >> 32) + blocks) & 0xFFFFFFFF) << 32))


def _shard_ids(name: str, lead: Sequence[Tensor], param_ids: Sequence[int]):
    """(param_ids for the local shards, the indices of the entries only the reference can draw).
    A DTensor that is a part of a larger parameter draws the whole parameter's numbers from the
    shard's first element on, so the shard must be a contiguous range of the flattened
    parameter: sharded along dim 0 only.  A shard starting at a multiple of 4 gets its first
    Philox block in its id's high word (every backend); one starting elsewhere a
    ``reference.ShardId`` (``_split_call``)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    out, odd = [], []
    for i, (t, pid) in enumerate(zip(lead, param_ids)):
        if isinstance(t, DTensor) and t._local_tensor.numel() != t.numel():
            if any(pl.is_shard() and pl.dim != 0 for pl in t.placements):
                raise OpArgumentError(f"{name}: entry {i} is a DTensor sharded along a dimension "
                                      f"other than 0 ({tuple(t.placements)}); its noise needs "
                                      "shards that are contiguous ranges of the parameter")
            _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh,
                                                              t.placements)
            start = offset[0] * (t.numel() // t.shape[0])
            if _blocks_aligned(t):
                pid = _block_id(int(pid), start // 4)
            else:
                pid = reference.ShardId(pid, start)
                odd.append(i)
        out.append(pid)
    return out, odd


def _blocks_aligned(t) -> bool:
    """Whether every rank's shard of DTensor ``t`` (sharded along dim 0) starts at a whole Philox
    block, a multiple of 4 elements: then the fused kernels draw it.  Decided from the global
    layout, not this rank's offset, so that every rank splits its calls alike (the ops' argument
    errors and the collectives around them stay in step).  One Shard(0) placement: rank r
    starts at row r * ceil(rows / ranks) (torch.chunk, as FSDP2); anything else: no."""
    shards = [d for d, pl in enumerate(t.placements) if pl.is_shard()]
    if len(shards) != 1:
        return False
    rows = t.shape[0]
    ranks = t.device_mesh.size(shards[0])
    return (-(-rows // ranks) * (t.numel() // rows)) % 4 == 0


def _split_call(name: str, impl, backend, odd: Sequence[int], values: tuple):
    """A noise op on local shards of which those at ``odd`` start inside a Philox block (an
    element index that is not a multiple of 4, ``reference.ShardId``): the reference backend, the
    one that draws from there, takes those entries, and ``impl`` the others, in a second call on
    the same arguments.  Exact: the ops treat every entry on its own and only read ``found_inf``
    and the step tensors; an op that returns a norm (``ebisam_perturb_``) takes it as given,
    so with no norm passed (it would span every entry) the whole call runs on the reference.
    Under the automatic choice this warns once per op; a fused backend asked for by name
    raises, on every rank (``_blocks_aligned``)."""
    op = PHASES[name]
    whole = op.result == "norm" and dict(zip(op.arg_names, values)).get("grad_norm") is None
    if impl is not _SPEC[name]:
        if backend is not None or _dispatch.requested() != "auto":
            raise OpArgumentError(f"{name}: a DTensor shard starting inside a Philox block (at an "
                                  "element index that is not a multiple of 4) draws its noise on "
                                  "the reference backend only; run with the automatic backend "
                                  "choice (those entries on the reference, the rest fused) or "
                                  "'reference'")
        if name not in _warned_shards:
            _warned_shards.add(name)
            n = len(values[0])
            warnings.warn(f"samkernels: {name} runs "
                          + ("every entry of the call" if whole else f"{len(odd)} of {n} entries")
                          + " on the reference backend: DTensor shards that start inside a "
                          "Philox block (an element index that is not a multiple of 4; the fused "
                          "kernels start a tensor at a whole block)", RuntimeWarning, stacklevel=3)
    _check_devices(op, values)
    if impl is _SPEC[name] or whole:
        return _SPEC[name](*values)
    odd_set = set(odd)
    rest = [i for i in range(len(values[0])) if i not in odd_set]
    result = impl(*_entries(op, values, rest)) if rest else None
    done = _SPEC[name](*_entries(op, values, odd))
    return done if result is None else result


def _entries(op: OpSpec, values: tuple, idx: Sequence[int]) -> tuple:
    """``values`` with every tensor list (an empty optional state list stays empty) and
    ``param_ids`` cut to the entries ``idx``."""
    cut = []
    for a, v in zip(op.args, values):
        if (a.type == TENSOR_LIST and len(v)) or a.name == "param_ids":
            v = [v[i] for i in idx]
        cut.append(v)
    return tuple(cut)


_warned_shards: set = set()


def _source(op: OpSpec) -> str:
    """The wrapper's Python source: real parameters (so calls bind at C speed, and
    ``inspect.signature`` / ``help`` show them), the O(1) checks inline, one dispatcher call."""
    lead = op.lists[0].name
    names = ", ".join(op.arg_names)
    params = ", ".join(a.name if a.default is None else f"{a.name}={a.default}" for a in op.args)
    same = [f"len({a.name}) != n" for a in op.lists[1:] if a.role != "state?"]
    same += [f"len({a.name}) not in (0, n)" for a in op.lists[1:] if a.role == "state?"]
    same += ["len(param_ids) != n"] if op.takes_ids else []
    body = [f"def {op.name}({params}, *, backend=None):",
            f"    n = len({lead})"]
    # a counter past the int64 range: its low 64 bits (what the kernels use), as SymInt takes it
    body += [f"    {a.name} = _i64({a.name})" for a in op.args if a.type == SYMINT]
    lists = ", ".join(a.name for a in op.lists)
    body += ["    odd = None"] if op.takes_ids else []
    body += [f"    if n and type({lead}[0]) not in _PLAIN:  # DTensors: run on the local shards"]
    if op.takes_ids:
        body += [f"        param_ids, odd = _shard_ids({op.name!r}, {lead}, param_ids)"]
    body += [f"        {lists}, = _local_shards(({lists},))"]
    if same:
        body += [f"    if {' or '.join(same)}:",
                 f"        _lengths_error(PHASES[{op.name!r}], ({names},))"]
    for i, (flag, needed, _) in enumerate(op.requires):
        body += [f"    if {flag} and not {needed}:",
                 f"        _requirement_error(PHASES[{op.name!r}], {i})"]
    if op.takes_found_inf:  # the test inline (no call when the flag is fine)
        body += ["    if found_inf is not None and (not isinstance(found_inf, Tensor) or "
                 f"found_inf.numel() != 1 or (n and found_inf.device != {lead}[0].device)):",
                 f"        _found_inf_error({op.name!r}, found_inf, {lead})"]
    for t in op.step_tensors:
        body += [f"    if {t} is not None and (not isinstance({t}, Tensor) or "
                 f"{t}.numel() != 1 or {t}.dtype != _INT64 or "
                 f"(n and {t}.device != {lead}[0].device)):",
                 f"        _step_tensor_error({op.name!r}, {t!r}, {t}, {lead})"]
    # empty lists: nothing to run a kernel on (and no tensor to dispatch on): the reference's
    # result on every backend (no change; a norm op returns its norm argument, or a zero norm)
    pick = f"_dispatch.implementation({op.name!r}, "
    body += [f"    impl = {pick}{lead}[0].device, backend) if n else {pick}_CPU, 'reference')"]
    if op.takes_ids:  # shards starting inside a Philox block: those on the reference
        body += ["    if odd:",
                 f"        return _split_call({op.name!r}, impl, backend, odd, ({names},))"]
    body += [
             # the kernels check every tensor's device; the spec does not
             f"    if n and impl is _SPEC[{op.name!r}]:",
             f"        _check_devices(PHASES[{op.name!r}], ({names},))"]
    body.append(f"    return impl({names})" if op.returns != "()" else f"    impl({names})")
    return "\n".join(body) + "\n"


def _docstring(op: OpSpec) -> str:
    spec = getattr(reference, op.name).__doc__ or ""
    writes = ", ".join(op.written) or "nothing"
    returns = "a 0-dim float64 norm" if op.result == "norm" else \
        "a float64 tensor of 3 dot products" if op.result == "dots" else \
        "a 0-dim float32 flag" if op.result == "flag" else (
        "None" if op.returns == "()" else op.returns)
    return (f"{spec.strip()}\n\nFused: writes {writes} in place; returns {returns}.  ``backend`` "
            f"forces a backend (reference | cpu | triton | cuda); the semantics are "
            f":func:`samkernels.ops.reference.{op.name}`'s.\n")


_CPU = torch.device("cpu")
_INT64 = torch.int64
_SPEC = {name: getattr(reference, name) for name in PHASES}  # the reference backend's callables


def _define(op: OpSpec) -> None:
    """Define the wrapper of ``op`` in this module.  Its globals are this module's (the names the
    source uses: _dispatch, PHASES, Tensor, _CPU, _SPEC and the checks), as torch.compile resolves
    a function's globals through its module."""
    source = _source(op)
    filename = f"<samkernels.ops.{op.name}>"
    exec(compile(source, filename, "exec"), globals())  # noqa: S102 (source built from the table)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    globals()[op.name].__doc__ = _docstring(op)


for _op in PHASES.values():
    _define(_op)
del _op
