"""How a worker runs one client's commands. No I/O: `Session.run(batch) -> replies`.

A failed op fails alone: its error is recorded against its id, ops that later use its outputs fail
with that same error (reported once, at its root), and unrelated ops in the batch still run.
"""
from __future__ import annotations

import contextlib
import logging
import time
import traceback
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ..wire import codec, ops
from ..wire.ops import short_name
from ..wire import messages as m
from ..wire.errors import WorkerPermissionError, to_info
from ..wire.messages import REMOTE_DEVICE_TYPE as _REMOTE, object_id
from .provenance import BACKWARD_OPS, Derived, Provenance
from . import checkpoints, collectives, failures
from .collectives import Groups
from .graphs import CompiledGraphs
from .optimizers import Optimizers
from .activation_checkpoints import Region
from .budget import MemoryBudget, Pool, describe
from .read_only import ReadOnlyGuard, own_alias, touches
from .releases import ReleaseDesk, ReleasedFailure
from .store import ObjectStore
from .traffic import Traffic

_CONTAINERS = (list, tuple, dict)
PRECHECK_BYTES = 1 << 20  # outputs this large are refused before the op runs when there is no room

_SENDABLE_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
                    torch.memory_format, torch.layout, m.TensorMeta, m.SameAs, slice, type(Ellipsis))


# How a worker hands a tensor to another worker in a move: (url, token, client name, tensor, the
# destination's ticket). The client package provides it (`client.session.send_to_worker`): a worker
# is then a client of the other one, and this package needs no client of its own.
SendToWorker = Callable[[str, "str | None", str, torch.Tensor, str], None]


class _Poisoned(Exception):
    """An argument is the output of an op that failed; carries that op's error."""

    def __init__(self, info: m.ErrorInfo) -> None:
        self.info = info


class Session:
    """One client's view of a worker: its namespace, its failed ops, the device it computes on."""

    def __init__(self, store: ObjectStore, client_id: str, *, device: torch.device | str = "cpu",
                 peer: str = "", log: logging.Logger | None = None,
                 max_client_bytes: int | None = None, budget: MemoryBudget | None = None,
                 allow_code: bool = False, releases: ReleaseDesk | None = None, is_owner: bool = False,
                 checkpoint_dir: str | None = None,
                 send_to_worker: SendToWorker | None = None, groups: Groups | None = None,
                 graphs: CompiledGraphs | None = None, timed: bool = False) -> None:
        self.store = store
        self.connected_at = time.time()
        self.traffic = Traffic(timed)  # counted for the owner's console and metrics (`timed`: latencies too)
        self._groups = groups
        self.graphs = graphs if graphs is not None else CompiledGraphs(device, log)
        # the worker's own ops: tr.compile's graphs, and collectives between workers
        self._worker_ops = {**self.graphs.ops(), **(groups.ops() if groups is not None else {})}
        self.send_to_worker = send_to_worker
        self.client_id = client_id
        self.device = torch.device(device)
        self.peer = peer
        self.log = log or logging.getLogger("torchremote.worker")
        self.command_log = self.log.getChild("commands")  # every command, with --verbose
        self.objects = store.open_namespace(client_id)
        self.failed: dict[int, m.ErrorInfo] = {}
        self.max_client_bytes = max_client_bytes
        self.allow_code = allow_code
        self.checkpoint_dir = checkpoint_dir  # where checkpoints on the worker's disk go (None: none)
        self.provenance = Provenance(store.no_get_storages)
        self._worker_ops.update(Optimizers(self.provenance).ops())  # tr.compile(optimizer), this session's own
        self.releases = releases if releases is not None else ReleaseDesk(self.log)
        self.is_owner = is_owner  # holds the owner token: may list and decide release requests
        self.budget = budget if budget is not None else MemoryBudget(None, self.device)
        # memory is counted where there is a limit to keep: the client's own, or the worker's
        self._accounting = max_client_bytes is not None or any(limit for _, _, limit in self.budget.rows())
        self.held_bytes = 0  # memory behind this client's objects (and its sends arriving), each storage once
        self.peak_bytes = 0  # the most it has held at once (torch.remote.max_memory_allocated)
        self._storages: dict[int, list] = {}  # storage -> [bytes, objects using it, its budget pool]
        self._held_keys: dict[m.ClientRef, int] = {}  # object -> its storage, when accounted
        self._reserved: dict[int, tuple[Pool, int]] = {}  # a chunked send arriving -> the room it holds
        self._unsettled: dict[Pool, int] = {}  # taken (or given back, < 0) in this batch: see `_settle`
        self.budget.holders[client_id] = self
        self._handlers: dict[type, Callable[[Any, list], None]] = {
            m.Put: self._put, m.Call: self._call, m.Fetch: self._fetch, m.Release: self._release,
            m.Search: self._search, m.ListObjects: self._list, m.ManualSeed: self._seed,
            m.Sync: self._sync, m.PutBegin: self._put_begin, m.Chunk: self._chunk, m.Run: self._run_code,
            m.Expect: self._expect, m.Push: self._push, m.Handover: self._handover,
            m.RequestRelease: self._request_release, m.ReleaseStatus: self._release_status,
            m.ListReleases: self._list_releases, m.Decide: self._decide, m.MemoryReport: self._memory,
            m.SaveCheckpoint: self._save_checkpoint, m.LoadCheckpoint: self._load_checkpoint,
            m.CheckpointRegion: self._checkpoint_region, m.FetchMock: self._fetch_mock,
        }
        self._region: Region | None = None  # the client's activation-checkpointing region, if in one
        self._incoming: dict[int, tuple[codec.Assembly, bool, str]] = {}
        self._aliases: dict[int, torch.Tensor] = {}  # published object -> this session's alias of it
        # what this session may not write into (the owner's own sessions may)
        self._protected = {} if is_owner else store.read_only_storages

    def run(self, commands: list) -> list:
        """Run a batch in order; returns the replies and failures to send back (maybe none)."""
        out: list = []
        verbose = self.command_log.isEnabledFor(logging.INFO)
        traffic = self.traffic
        timed = traffic.timed
        for cmd in commands:
            if verbose:
                self.command_log.info("%s %s: %s", self.peer, self.client_id, _describe(cmd))
            kind = type(cmd)
            if timed:
                started = time.perf_counter()
            try:
                self._handlers[kind](cmd, out)
            except Exception as e:  # a handler's own bug must not take the connection down
                out.append(m.Failure(_reply_id(cmd), getattr(cmd, "op_id", None),
                                     to_info(e, tb=traceback.format_exc())))
            if kind is m.Call or kind is m.Run:
                traffic.ops += 1
                if timed:
                    traffic.op_seconds.observe(time.perf_counter() - started)
        if self._unsettled:
            self._settle()
        return out

    def _settle(self) -> None:
        """Pass what this batch took and gave back on to the worker's budget: once a batch, not
        once an op (a lock each). Its own checks count it meanwhile."""
        unsettled, self._unsettled = self._unsettled, {}
        for pool, n in unsettled.items():
            self.budget.charge(pool, n)

    def close(self) -> int:
        self.releases.forget_client(self.client_id)
        self._settle()
        self._incoming.clear()
        for send_id in list(self._reserved):
            self._unreserve(send_id)
        for nbytes, _, pool in self._storages.values():
            self.budget.credit(pool, nbytes)
        self._storages.clear()
        self._held_keys.clear()
        self.held_bytes = 0
        self.budget.holders.pop(self.client_id, None)
        return self.store.close_namespace(self.client_id)

    def _allow_release(self, objects: Iterable[tuple[m.Ref, torch.Tensor]], what: str) -> None:
        """Let these objects' values leave the worker (together), if they derive from no private
        data or their release was approved; otherwise raise `ApprovalRequired`, naming a request."""
        derived = []
        for ref, t in objects:
            d = self.provenance.of(t)
            if d is not None:
                derived.append((ref, t, d))
        if derived:
            try:
                self.releases.release(self.client_id, derived, what)
            except ReleasedFailure as failure:  # what the owner let go is an op's error
                raise _Poisoned(failure.info) from None

    # --- what this client holds, within its own limit and the worker's budget (budget.py) ---
    def _measure(self, tensors: list[torch.Tensor]) -> list:
        """For each tensor, (storage key, bytes, budget pool) of the memory behind it, or None where
        that is published data (the owner's, never counted to a client)."""
        published = self.store.published_storages
        host = self.budget.host if self.budget.gpu is None else None
        measured = []
        for t in tensors:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            measured.append(None if key in published else (key, storage.nbytes(), host or self.budget.pool(storage)))
        return measured

    def _check_room(self, tensors: list[torch.Tensor], what: str = "", *, op: str = "") -> list | None:
        """After an op: refuse outputs that would take this client or the worker past a limit
        (`op`, or `what` in words, names what asked). Returns what `_measure` says of them, for
        `_hold`."""
        if not self._accounting or not tensors:
            return None
        measured = self._measure(tensors)
        if len(measured) == 1:  # the common case, without the bookkeeping of shared storages
            entry = measured[0]
            if entry is not None and entry[0] not in self._storages:
                self._check_pool(entry[2], entry[1], what, op)
            return measured
        new: dict[Pool, int] = {}
        seen = set()
        for entry in measured:
            if entry is not None and entry[0] not in self._storages and entry[0] not in seen:
                seen.add(entry[0])
                new[entry[2]] = new.get(entry[2], 0) + entry[1]
        for pool, n in new.items():
            self._check_pool(pool, n, what, op)
        return measured

    def _check_new_bytes(self, new: int, what: str = "", device: torch.device | str | None = None,
                         before: bool = False, *, op: str = "") -> None:
        """Refuse, before anything is allocated, `new` bytes more on `device` (the worker's)."""
        if self._accounting and new:
            self._check_pool(self.budget.pool_for(device or self.device), new, what, op, before)

    def _check_pool(self, pool: Pool, new: int, what: str, op: str = "", before: bool = False) -> None:
        """Refuse `new` bytes more in `pool` past the client's limit or the worker's budget. The
        message names `op` (shortened, only when refusing) or else `what`."""
        limit = self.max_client_bytes
        pending = self._unsettled.get(pool, 0) if self._unsettled else 0
        if (limit is None or self.held_bytes + new <= limit) and \
                (pool.limit is None or pool.used + pending + new <= pool.limit):
            return
        what = (short_name(op) if op else what) + (" (checked before it ran)" if before else "")
        try:
            if limit is not None and self.held_bytes + new > limit:
                raise torch.OutOfMemoryError(
                    f"{what} needs {describe(new)} more, which would make this client hold "
                    f"{describe(self.held_bytes + new)} on the worker, over its limit of "
                    f"{describe(limit)} (--max-client-bytes): free some pointers (del x)")
            self.budget.check(pool, new, what, f"this client ({self.client_id})", self.held_bytes, pending)
        except torch.OutOfMemoryError as e:  # the owner's log shows who asked for too much
            self.log.warning("%s %s: refused: %s", self.peer, self.client_id, e)
            raise

    def _reserve(self, send_id: int, nbytes: int, device: torch.device | str) -> None:
        """Room for a chunked send, held from its first message: its chunks arrive over time."""
        self._check_new_bytes(nbytes, "this send", device)
        if self._accounting:
            pool = self.budget.pool_for(device)
            self.budget.charge(pool, nbytes)
            self.held_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.held_bytes)
            self._reserved[send_id] = (pool, nbytes)

    def _unreserve(self, send_id: int) -> None:
        entry = self._reserved.pop(send_id, None)
        if entry is not None:
            self.budget.credit(*entry)
            self.held_bytes -= entry[1]

    def _hold(self, ref: m.ClientRef, t: torch.Tensor, measured: tuple | None | bool = False,
              settled: bool = False) -> None:
        """`t` is this client's object `ref` from now on, counted against its limits (`measured`:
        what `_measure` said of it, if known; `settled`: charged to the budget at once, for a
        tensor handed over from another thread)."""
        self._drop(ref)
        self.objects[ref] = t
        if not self._accounting:
            return  # no limit: nothing to account (a storage lookup per op saved)
        if measured is False:
            measured = self._measure([t])[0]
        if measured is None:  # published memory
            return
        key = measured[0]
        self._held_keys[ref] = key  # so that dropping it needs no storage lookup
        entry = self._storages.get(key)
        if entry is None:
            pool = measured[2]
            entry = self._storages[key] = [measured[1], 0, pool]
            self.held_bytes += entry[0]
            if self.held_bytes > self.peak_bytes:
                self.peak_bytes = self.held_bytes
            if settled:
                self.budget.charge(pool, entry[0])
            else:
                self._unsettled[pool] = self._unsettled.get(pool, 0) + entry[0]
        entry[1] += 1

    def _hold_handed_over(self, ref: m.ClientRef, t: torch.Tensor) -> None:
        """What a move from another worker delivers (on the mover's thread, not this session's)."""
        self._hold(ref, t, settled=True)

    def _drop(self, ref: m.ClientRef) -> None:
        if self.objects.pop(ref, None) is None or not self._accounting:
            return
        key = self._held_keys.pop(ref, None)
        entry = self._storages.get(key) if key is not None else None
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                del self._storages[key]
                self.held_bytes -= entry[0]
                pool = entry[2]
                self._unsettled[pool] = self._unsettled.get(pool, 0) - entry[0]

    # --- resolving references ---
    def _tensor(self, ref: m.Ref) -> torch.Tensor:
        if isinstance(ref, m.PublishedRef):
            alias = self._aliases.get(ref.pub_id)
            if alias is None:
                published = self.store.published(ref)
                if not published.allow_get:
                    self.provenance.watching = True  # from now on, this session's values are tracked
                alias = self._aliases[ref.pub_id] = own_alias(published.tensor)
            return alias
        t = self.objects.get(ref)
        if t is not None:
            return t
        if ref.op_id in self.failed:
            raise _Poisoned(self.failed[ref.op_id])
        raise LookupError(f"object {object_id(ref)} does not exist on this worker "
                          f"(it was released, or was never created)")

    def _resolve(self, value: Any, refs: dict[int, m.Ref], inputs: dict[int, torch.Tensor]) -> Any:
        """Replace references by the tensors they name (and remote devices by this worker's)."""
        if type(value) is tuple and not any(isinstance(v, _CONTAINERS) for v in value):
            return tuple(self._leaf(v, refs, inputs) for v in value)  # the common case, without pytree
        if type(value) is dict and not value:
            return value
        return tree_map(lambda v: self._leaf(v, refs, inputs), value)

    def _leaf(self, v: Any, refs: dict[int, m.Ref], inputs: dict[int, torch.Tensor]) -> Any:
        if isinstance(v, (m.ClientRef, m.PublishedRef)):
            t = self._tensor(v)
            refs[id(t)] = v
            inputs[id(t)] = t
            return t
        if isinstance(v, torch.device) and v.type == _REMOTE:
            return self.device
        if isinstance(v, torch.Tensor) and v.device != self.device:
            return v.to(self.device)
        return v

    # --- commands ---
    def _put_begin(self, cmd: m.PutBegin, out: list) -> None:
        try:
            self._reserve(cmd.op_id, cmd.header.nbytes, cmd.device or self.device)
            self._incoming[cmd.op_id] = (codec.Assembly(cmd.header), cmd.requires_grad, cmd.device)
        except Exception as e:
            self._unreserve(cmd.op_id)
            self._send_failed(cmd.op_id, e, out)

    def assembly(self, send_id: int) -> codec.Assembly | None:
        """The tensor a large send is filling, for its chunks to be read straight into."""
        entry = self._incoming.get(send_id)
        return entry[0] if entry is not None else None

    def _chunk(self, cmd: m.Chunk, out: list) -> None:
        entry = self._incoming.get(cmd.id)
        if entry is None:
            if cmd.id not in self.failed:  # chunks of a refused send are dropped quietly
                out.append(m.Failure(None, cmd.id, to_info(LookupError("a chunk for no pending send"))))
            return
        assembly, requires_grad, device = entry
        try:
            if not assembly.add(cmd):
                return
        except Exception as e:
            del self._incoming[cmd.id]
            self._unreserve(cmd.id)
            self._send_failed(cmd.id, e, out)
            return
        del self._incoming[cmd.id]
        self._unreserve(cmd.id)  # from here on held as the object it became
        self._store_sent(cmd.id, assembly.tensor(), device, requires_grad, out)

    def _put(self, cmd: m.Put, out: list) -> None:
        try:
            self._check_room([cmd.tensor], "this send")
        except torch.OutOfMemoryError as e:
            self._send_failed(cmd.op_id, e, out)
            return
        self._store_sent(cmd.op_id, cmd.tensor, cmd.device, cmd.requires_grad, out)

    def _store_sent(self, op_id: int, tensor: torch.Tensor, device: str, requires_grad: bool,
                    out: list) -> None:
        """Where a send ends, whole or chunked: on the device asked for, as `ClientRef(op_id, 0)`."""
        try:
            t = tensor.to(device or self.device)
        except Exception as e:  # a device this worker does not have
            self._send_failed(op_id, e, out)
            return
        self._hold(m.ClientRef(op_id, 0), t.requires_grad_(True) if requires_grad else t)

    def _send_failed(self, op_id: int, error: Exception, out: list) -> None:
        """A send that failed: later ops on its pointer fail with this error, reported once."""
        self.failed[op_id] = info = to_info(error, op="send")
        out.append(m.Failure(None, op_id, info))

    def _run_code(self, cmd: m.Run, out: list) -> None:
        self._execute(cmd.op_id, "code sent by the client", lambda _: self._unpickle(cmd.code), cmd.args,
                      cmd.kwargs, cmd.grad_enabled, cmd.autocast, reply=True, out=out)

    def _unpickle(self, code: bytes) -> Any:
        if not self.allow_code:
            raise WorkerPermissionError(
                "this worker runs torch ops only: running a client's own code (worker.run, @tr.remote) "
                "needs a worker started with --allow-code (and a token)")
        import cloudpickle  # only ever imported by a worker whose owner allowed code
        return cloudpickle.loads(code)

    def _call(self, cmd: m.Call, out: list) -> None:
        worker_op = self._worker_ops.get(cmd.op) if type(cmd.op) is str else None
        load = ops.resolve if worker_op is None else lambda _: worker_op
        self._execute(cmd.op_id, cmd.op, load, cmd.args, cmd.kwargs,
                      cmd.grad_enabled, cmd.autocast, reply=cmd.reply, out=out, out_bytes=cmd.out_bytes)

    def _execute(self, op_id: int, op: str, load: Callable[[str], Callable], wire_args: tuple,
                 wire_kwargs: dict, grad_enabled: bool, autocast: torch.dtype | None, *, reply: bool,
                 out: list, out_bytes: int = 0) -> None:
        """Run one op (or client function); its tensor outputs become `ClientRef(op_id, k)`.
        `load(op)` gives the callable; `autocast`, the dtype of the client's autocast region, applied
        with this worker's device's rules; `out_bytes`, the memory the client's plan says its new
        outputs take (refused before the op runs if there is no room; checked again after)."""
        refs: dict[int, m.Ref] = {}  # id(tensor) -> the reference it was named by
        inputs: dict[int, torch.Tensor] = {}  # ... -> the tensor, kept alive while the op runs
        req_id = op_id if reply else None
        derived = None
        running = False  # inside the op itself: what fails there may depend on the values
        try:
            func = run = load(op)
            if out_bytes >= PRECHECK_BYTES:  # smaller outputs: the check after the op suffices
                self._check_new_bytes(out_bytes, op=op, before=True)
            args = self._resolve(wire_args, refs, inputs)
            kwargs = self._resolve(wire_kwargs, refs, inputs) if wire_kwargs else wire_kwargs
            if self.provenance.watching:
                tensors = list(inputs.values())
                derived = self.provenance.combine(op, tensors)
                if derived is not None:
                    versions = [t._version for t in tensors]
                    if reply and load is ops.resolve:  # a value, or a data-dependent shape: a release
                        self._allow_release(zip(refs.values(), tensors), short_name(op))  # all it reads
                    elif op in collectives.RELEASES:  # its input leaves for the other workers
                        try:
                            self._allow_release(zip(refs.values(), tensors), "a collective with other workers")
                        except WorkerPermissionError as e:  # every rank is told, so none waits for this one
                            kwargs = {**kwargs, "refusal": e}
            protected = self._protected
            if protected and (load is not ops.resolve or touches(protected, inputs.values())):
                run = _guarded(func, protected, short_name(op))
            region = self._region
            running = True
            with region.hooks() if region is not None else contextlib.nullcontext():
                if autocast is not None:
                    with torch.set_grad_enabled(grad_enabled), torch.autocast(self.device.type, autocast):
                        result = run(*args, **kwargs)
                elif grad_enabled is torch.is_grad_enabled():
                    result = run(*args, **kwargs)
                else:
                    with torch.set_grad_enabled(grad_enabled):
                        result = run(*args, **kwargs)
            running = False
            if isinstance(result, torch.Tensor):
                leaves = [result]
            elif result is None:
                leaves = []
            else:
                leaves = [leaf for leaf in tree_flatten(result)[0] if isinstance(leaf, torch.Tensor)]
            for k, leaf in enumerate(leaves):
                if leaf.layout != torch.strided:
                    raise NotImplementedError(
                        f"{op} returned a {leaf.layout} tensor: torchremote supports strided tensors "
                        f"only (convert with .to_dense() on the worker first)")
                if leaf._is_zerotensor():  # autograd's storage-less zeros: held as real ones
                    leaves[k] = torch.zeros_like(leaf)
            if region is not None:
                region.record(run, args, kwargs, grad_enabled, autocast, leaves)
            measured = self._check_room(leaves, op=op)
            if derived is not None:
                written = _written_by_schema(func, args, kwargs) if isinstance(func, torch._ops.OpOverload) else []
                self._track(op, derived, leaves + written, tensors, versions,
                            None if load is ops.resolve else result)
        except _Poisoned as p:  # reported where it happened; only answer if asked
            if op in collectives.RELEASES and self._groups is not None and wire_args:
                self._groups.decline(wire_args[0], self.device)  # the other ranks stop waiting for it
            self.failed[op_id] = p.info
            if reply:
                out.append(m.Failure(req_id, op_id, p.info))
            return
        except Exception as e:
            if running and isinstance(e, torch.OutOfMemoryError) and self.device.type == "cuda":
                torch.cuda.empty_cache()  # the device's own OOM: hand its cache back, serve on
            tb = "" if isinstance(e, (WorkerPermissionError, torch.OutOfMemoryError)) else traceback.format_exc(limit=-4)
            info = to_info(e, op=op, tb=tb)
            if derived is not None and running and not isinstance(e, WorkerPermissionError):
                if load is ops.resolve and not reply:  # reply: its inputs' release was approved
                    if self._fail_unseen(op_id, op, func, args, kwargs, grad_enabled, autocast, derived,
                                         info, list(inputs.values()), out):
                        return
                # its message may quote the data: the owner's log has it, the client gets its type
                self.log.info("%s %s: op %s on private-derived data failed: %s", self.peer, self.client_id, op, e)
                info = m.ErrorInfo(info.type, f"{op} failed on data derived from private data; the "
                                   f"worker's owner withholds the message ({info.type})", op)
            self.failed[op_id] = info
            if not isinstance(e, WorkerPermissionError):
                self.log.debug("%s %s: op %s failed: %s", self.peer, self.client_id, op, e)
            out.append(m.Failure(req_id, op_id, info))
            return
        for k, leaf in enumerate(leaves):
            self._hold(m.ClientRef(op_id, k), leaf, measured[k] if measured is not None else False)
        if reply:
            try:
                out.append(m.Reply(req_id, _describe_result(result, refs)))
            except TypeError as e:
                out.append(m.Failure(req_id, op_id, to_info(e, op=op)))

    def _fail_unseen(self, op_id: int, op: str, func: Callable, args: tuple, kwargs: dict, grad_enabled: bool,
                     autocast: torch.dtype | None, derived: Derived, info: m.ErrorInfo,
                     inputs: list[torch.Tensor], out: list) -> bool:
        """An op on private-derived data failed: let it fail unseen (`failures.py`), its outputs
        stand-ins that carry the error. Where a fake run fails too, that error knows no values: it
        is reported, with its own message. False where that fake run cannot tell at all."""
        outcome = failures.backward_outcome(op, args, kwargs) if op in BACKWARD_OPS else \
            failures.stand_in_outcome(func, args, kwargs, grad_enabled,
                                      None if autocast is None else (self.device.type, autocast))
        if isinstance(outcome, Exception):
            if not failures.knows_no_values(outcome):
                return False
            self.failed[op_id] = failure = to_info(outcome, op=op)
            out.append(m.Failure(None, op_id, failure))
            return True
        try:
            self._check_room(outcome.outputs, op=op)
        except torch.OutOfMemoryError as e:  # the stand-ins' sizes are the op's, whatever the values
            self.failed[op_id] = failure = to_info(e, op=op)
            out.append(m.Failure(None, op_id, failure))
            return True
        self.log.warning("%s %s: op %s failed on data derived from private data (%s: %s); the client is "
                         "not told: its results carry the error to any release request", self.peer,
                         self.client_id, op, info.type, info.message)
        failed = derived.failed(m.ErrorInfo(info.type, info.message, op))
        for t in [*outcome.outputs, *outcome.written]:
            self.provenance.mark(t, failed)
        if op in BACKWARD_OPS:
            failures.give_missing_grads(inputs)
            self.provenance.mark_gradients([*self.objects.values(), *inputs], failed)
        for k, leaf in enumerate(outcome.outputs):
            self._hold(m.ClientRef(op_id, k), leaf)
        return True

    def _track(self, op: str, derived: Derived, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
               versions: list[int], result: Any) -> None:
        """Record what an op on private-derived data made or changed; refuse what `worker.run`
        would hand back as plain values."""
        mark = self.provenance.mark
        for t in outputs:
            mark(t, derived)
        for t, version in zip(inputs, versions):
            if t._version != version:  # changed in place: add_, out=, copy_, running stats
                mark(t, derived)
        if op in BACKWARD_OPS:
            self.provenance.mark_gradients([*self.objects.values(), *inputs], derived)
        if result is not None and any(not isinstance(v, torch.Tensor) and v is not None
                                      for v in tree_flatten(result)[0]):
            raise WorkerPermissionError(
                "this function returned plain values computed from private data: return tensors, and "
                "request the release of those you need")

    @contextlib.contextmanager
    def _answering(self, req_id: int, out: list, op: str | None = None) -> Iterator[None]:
        """A request's failure becomes its answer: an argument's failed op with that op's error,
        anything else with its own (`op` names what failed)."""
        try:
            yield
        except _Poisoned as p:
            out.append(m.Failure(req_id, None, p.info))
        except Exception as e:
            out.append(m.Failure(req_id, None, to_info(e, op=op)))

    def _fetch(self, cmd: m.Fetch, out: list) -> None:
        with self._answering(cmd.req_id, out):
            t = self._tensor(cmd.ref)
            self._allow_release([(cmd.ref, t)], "get")
            _reply_with_tensor(cmd.req_id, t.detach(), out)

    def _fetch_mock(self, cmd: m.FetchMock, out: list) -> None:
        """The stand-in the owner published beside real data: anyone may have it."""
        with self._answering(cmd.req_id, out):
            published = self.store.published(cmd.ref)
            if published.mock is None:
                name = published.tags[0] if published.tags else object_id(cmd.ref)
                raise LookupError(f"the owner published no mock of {name!r}: only its real data, "
                                  f"which you compute on through the pointer")
            _reply_with_tensor(cmd.req_id, published.mock, out)

    def _release(self, cmd: m.Release, out: list) -> None:
        for ref in cmd.refs:
            self._drop(ref)
            self.failed.pop(ref.op_id, None)

    def _search(self, cmd: m.Search, out: list) -> None:
        out.append(m.Reply(cmd.req_id, self.store.search(cmd.tags)))

    def _list(self, cmd: m.ListObjects, out: list) -> None:
        out.append(m.Reply(cmd.req_id, self.store.rows(self.client_id)))

    def _checkpoint_region(self, cmd: m.CheckpointRegion, out: list) -> None:
        self._region = Region(self.device) if cmd.region else None

    def _seed(self, cmd: m.ManualSeed, out: list) -> None:
        # this machine's own generators only: torch.manual_seed would also seed the workers this
        # process is a client of (the `remote` device), this one among them when it is in-process
        torch.random.default_generator.manual_seed(cmd.seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(cmd.seed)
        out.append(m.Reply(cmd.req_id, None))

    # --- checkpoints on the worker's disk (checkpoints.py) ---
    def _save_checkpoint(self, cmd: m.SaveCheckpoint, out: list) -> None:
        with self._answering(cmd.req_id, out, "save on the worker"):
            path = checkpoints.path_for(self.checkpoint_dir, cmd.name)
            if len(cmd.keys) != len(cmd.refs) or len(set(cmd.keys)) != len(cmd.keys):
                raise ValueError("a checkpoint needs one distinct name per tensor")
            tensors = {key: self._tensor(ref) for key, ref in zip(cmd.keys, cmd.refs)}
            derived = {key: d for key, t in tensors.items() if (d := self.provenance.of(t)) is not None}
            size = checkpoints.save(path, tensors, derived)
            self.log.info("%s %s: saved checkpoint %s (%d tensors, %d bytes%s)", self.peer, self.client_id,
                          path.name, len(tensors), size, ", private-derived" if derived else "")
            out.append(m.Reply(cmd.req_id, path.name))

    def _load_checkpoint(self, cmd: m.LoadCheckpoint, out: list) -> None:
        with self._answering(cmd.req_id, out, "load on the worker"):
            path = checkpoints.path_for(self.checkpoint_dir, cmd.name)
            if path.is_file():
                self._check_new_bytes(path.stat().st_size, f"loading {path.name}", before=True)
            tensors, derived = checkpoints.load(path, self.device)
            measured = self._check_room(list(tensors.values()), f"loading {path.name}")
            for k, (key, t) in enumerate(tensors.items()):
                self._hold(m.ClientRef(cmd.req_id, k), t, measured[k] if measured is not None else False)
                if key in derived:
                    self.provenance.watching = True
                    self.provenance.mark(t, derived[key])
            out.append(m.Reply(cmd.req_id, (tuple(tensors), tuple(m.TensorMeta.of(t) for t in tensors.values()))))

    def _memory(self, cmd: m.MemoryReport, out: list) -> None:
        self._settle()
        clients = sorted(self.budget.holders) if self.is_owner else [self.client_id]
        out.append(m.Reply(cmd.req_id, self.budget.report(clients, self.max_client_bytes)))

    def _sync(self, cmd: m.Sync, out: list) -> None:
        out.append(m.Reply(cmd.req_id, None))

    # --- moves between workers: Expect (at the destination), Push (at the source), Handover ---
    def _expect(self, cmd: m.Expect, out: list) -> None:
        out.append(m.Reply(cmd.req_id, self.store.issue_ticket(self.client_id, m.ClientRef(cmd.req_id, 0),
                                                                   self._hold_handed_over)))

    def _push(self, cmd: m.Push, out: list) -> None:
        with self._answering(cmd.req_id, out, "move"):
            if self.send_to_worker is None:
                raise RuntimeError(f"worker {self.store.owner!r} cannot reach other workers: it was started "
                                   f"without a client to send with (use torchremote.start_worker)")
            t = self._tensor(cmd.ref)
            self._allow_release([(cmd.ref, t)], "a move to another worker")
            # the source acts as a client of the destination
            self.send_to_worker(cmd.url, cmd.token, f"{self.store.owner}-move", t.detach(), cmd.ticket)
            out.append(m.Reply(cmd.req_id, None))

    def _handover(self, cmd: m.Handover, out: list) -> None:
        try:
            t = self._tensor(cmd.ref)
            self.store.hand_over(cmd.ticket, t)
            self._drop(cmd.ref)
            out.append(m.Reply(cmd.req_id, None))
        except Exception as e:
            out.append(m.Failure(cmd.req_id, None, to_info(e, op="move")))


    # --- releases of private-derived data ---
    def _request_release(self, cmd: m.RequestRelease, out: list) -> None:
        t = self._tensor(cmd.ref)
        derived = self.provenance.of(t)
        if derived is None:  # open data: nothing to approve
            out.append(m.Reply(cmd.req_id, m.ReleaseInfo(0, self.client_id, object_id(cmd.ref), cmd.reason,
                                                         tuple(t.shape), t.dtype, t.numel(), "", 0, "open")))
            return
        request = self.releases.file(self.client_id, cmd.ref, t, derived, cmd.reason)
        out.append(m.Reply(cmd.req_id, request.row()))

    def _release_status(self, cmd: m.ReleaseStatus, out: list) -> None:
        out.append(m.Reply(cmd.req_id, self.releases.status(self.client_id, cmd.request_id)))

    def _owner_only(self, what: str) -> None:
        if not self.is_owner:
            raise WorkerPermissionError(f"only the worker's owner may {what}: connect with the owner token")

    def _list_releases(self, cmd: m.ListReleases, out: list) -> None:
        self._owner_only("list release requests")
        out.append(m.Reply(cmd.req_id, [r.row(for_owner=True) for r in self.releases.requests()]))

    def _decide(self, cmd: m.Decide, out: list) -> None:
        self._owner_only("approve or deny release requests")
        by = f"owner ({self.client_id})"
        decided = (self.releases.approve(cmd.request_id, by=by) if cmd.approve
                   else self.releases.deny(cmd.request_id, cmd.reason, by=by))
        out.append(m.Reply(cmd.req_id, decided.row(for_owner=True)))


def _reply_with_tensor(req_id: int, t: torch.Tensor, out: list) -> None:
    """A tensor's value as a reply: whole when small, else a header and then its chunks."""
    if t.numel() * t.element_size() <= m.CHUNK_BYTES:
        out.append(m.Reply(req_id, t))
        return
    header, chunks = codec.split_for_transfer(t)
    out.append(m.Reply(req_id, header))
    out.extend(m.Chunk(req_id, offset, data) for offset, data in chunks)


def _guarded(func: Callable, protected: dict[int, str], op: str) -> Callable:
    """`func`, refusing any write into protected (published read-only) memory."""
    def run(*args: Any, **kwargs: Any) -> Any:
        with ReadOnlyGuard(protected, op):
            return func(*args, **kwargs)
    return run


def _reply_id(cmd: Any) -> int | None:
    """The id a client waits on for this command, if it waits at all."""
    if isinstance(cmd, m.Run) or isinstance(cmd, m.Call) and cmd.reply:
        return cmd.op_id
    return getattr(cmd, "req_id", None)


def _written_by_schema(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors an ATen op's schema says it writes (`Tensor(a!)`). Version counters miss some:
    the fused optimizer kernels (`_fused_adam_`, ...) change their inputs without a bump."""
    written = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(t, torch.Tensor):
                written.append(t)
    return written


def _describe_result(result: Any, inputs: dict[int, m.Ref]) -> Any:
    """The reply for a synchronous call: tensors become metadata (or the input they are)."""
    def leaf(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            ref = inputs.get(id(v))
            return m.SameAs(ref) if ref is not None else m.TensorMeta.of(v)
        if not isinstance(v, _SENDABLE_LEAVES):
            raise TypeError(f"a result of type {type(v).__qualname__} cannot be sent back")
        return v
    return tree_map(leaf, result)


def _describe(cmd: Any) -> str:
    if isinstance(cmd, m.Call):
        return f"call {cmd.op} (op {cmd.op_id}{', reply' if cmd.reply else ''})"
    if isinstance(cmd, m.Put):
        return f"put {tuple(cmd.tensor.shape)} {cmd.tensor.dtype} as {cmd.op_id}"
    if isinstance(cmd, m.Fetch):
        return f"fetch {object_id(cmd.ref)}"
    if isinstance(cmd, m.Release):
        return f"release {len(cmd.refs)} object(s)"
    if isinstance(cmd, m.Search):
        return f"search {list(cmd.tags)}"
    return type(cmd).__name__.lower()
