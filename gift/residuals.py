"""The generated residuals of a `gift.fast.FastGIFT`, owned in one place (`GeneratedResiduals`).

GIFT's residuals depend on the weights only, never on the data: for target key ``k``, psi (d_in, r') and
the tokens T (L, d_out, r') are the same for every input until a weight changes. The model's target layers
(`gift.fast.GIFTLinear`) ask their owner for their key's pair at every call, so every entry point of the
backbone (the wrapper's forward, ``backbone(x)``, ``forward_features``, ``forward_intermediates``, a Hugging
Face ``generate``) runs the adapted model; the owner makes the pair on demand and keeps it while it is
valid. Every lookup reads the state a pair depends on from the live modules: for each GIFT parameter of the
key (``residual_parameters(key)``) and the layer's frozen weight (``target_weights(key)``), its object, its
storage address, its version counter and (GIFT parameters) whether it requires a gradient; plus the number
of optimizer steps so far (any ``torch.optim`` optimizer, fused ones included, counted by one global step
hook). So a pair is made again after an optimizer step, an in-place change (``load_state_dict``, ``copy_``, an
EMA update), a new parameter object (``module.weight = nn.Parameter(...)``, ``load_state_dict(assign=True)``
of any submodule, ``torch.func.functional_call``), a cast or move, or a ``requires_grad_`` change. Autocast
does not matter (the generator runs with autocast off and each layer casts the pair to its compute dtype).
Edits through ``.data`` that keep the storage bypass all of these: call `GeneratedResiduals.reset` after them.

* **No gradient** (``torch.no_grad``, ``torch.inference_mode``): one pair per key, made by the first layer
  that asks and shared by every later call and thread while it is valid. Nothing per call is stored, so
  concurrent inference from several threads gets the same outputs as one thread.
* **With gradient** (training): every forward pass makes its own pair, with its autograd graph, so each
  backward has a graph of its own; each thread has its own passes. A pass ends when one of its layers asks
  again or a backward has gone through the pair; the graph of a forward that never got its backward is
  dropped at that thread's next forward (or by `GeneratedResiduals.reset`). The generator runs outside any
  enclosing saved-tensor hooks (`torch.utils.checkpoint`'s, ``save_on_cpu``; `gift.memory.SavedTensorCounter`
  still counts it), so a block that ``memory="mlp"/"block"`` or the user's checkpoint recomputes takes the
  pair of its forward pass again instead of running the generator again. Reentrant checkpointing (Hugging
  Face's ``use_reentrant=True``), whose recomputed blocks each run a backward of their own, gets a fresh pair
  for each block whose last pair's backward has run.
* **Inside** `accumulate` (``FastGIFT.accumulate(k)``, owned by the thread that entered it): one pair for the
  k micro-batches of the optimizer step. The generator runs at the first micro-batch's forward; micro-batches
  1..k-1 use its tokens as a new graph root that adds their gradient to a bank; the k-th micro-batch uses the
  generator's output itself, its gradient plus the bank flowing into the generator: one generator forward and
  one backward per step, in the last micro-batch's backward (so under DDP the generator's gradients are reduced
  once, in the synchronised backward, with ``no_sync()`` for the others). psi is a parameter (or a
  concatenation of parameters) used directly by every micro-batch. Under reentrant checkpointing every
  recomputed block adds its gradient to the bank and the generator's backward runs once, when the last
  micro-batch's backward ends. A ``zero_grad()`` between the micro-batches would leave the generator with
  gradients the other parameters no longer have: the next backward raises instead.

A deepcopy, pickle or EMA copy of the model starts with an empty owner of its own.
"""
from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from .memory import innermost_saved_tensor_counter

_optimizer_steps = [0]  # optimizer steps of this process, all optimizers (a list: mutated by the hook)
_step_hook = []
_accumulating: "weakref.WeakSet[Accumulation]" = weakref.WeakSet()  # the `accumulate` blocks now running


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1
    for accumulation in list(_accumulating):
        accumulation.saw_step(optimizer)


def optimizer_steps() -> int:
    """Optimizer steps this process has taken since the first `GeneratedResiduals` (every ``torch.optim``
    optimizer: fused AdamW does not bump its parameters' version counters, so versions alone miss it)."""
    return _optimizer_steps[0]


def _watch_optimizer_steps() -> None:
    if not _step_hook:
        _step_hook.append(register_optimizer_step_post_hook(_count_optimizer_step))


class _Flag:
    """A one-way flag set from an autograd hook (holds nothing, so the hook makes no reference cycle)."""

    __slots__ = ("is_set",)

    def __init__(self) -> None:
        self.is_set = False

    def set(self, grad: torch.Tensor) -> None:
        self.is_set = True


def _address(t: torch.Tensor, fake: bool) -> int:
    return 0 if fake else t.data_ptr()  # fake tensors (the planner's) have no storage to point at


def in_functorch_transform() -> bool:
    """Whether this runs inside a ``torch.func`` transform (``grad``, ``vmap``, ...): the ops then run as their
    plain-torch references, which the transform differentiates (it cannot take the kernels' autograd Functions)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _has_storage(t: torch.Tensor) -> bool:
    try:
        t.data_ptr()
    except RuntimeError:  # a torch.func transform's wrapper: no storage to identify it by
        return False
    return True


def _weight_state(weight: torch.Tensor) -> tuple:
    """(object, storage address, version) of a frozen target weight."""
    return id(weight), _address(weight, isinstance(weight, FakeTensor)), weight._version


def _pack_saved(t: torch.Tensor):
    counter = innermost_saved_tensor_counter()
    return t if counter is None else counter.pack(t)


def _unpack_saved(t: torch.Tensor) -> torch.Tensor:
    return t


def generate(model, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.make_residuals(key)`` outside any enclosing saved-tensor hooks: the generator's graph belongs to
    no checkpointed block it happens to run in (a bare backbone call whose first target layer is inside one), so
    that block's recomputation in backward neither runs it again nor finds tensors it did not save. Inside a
    ``torch.func`` transform, which takes no saved-tensor hooks (so none encloses the call), it is the plain call."""
    if in_functorch_transform():
        return model.make_residuals(key)
    with torch.autograd.graph.saved_tensors_hooks(_pack_saved, _unpack_saved):
        return model.make_residuals(key)


@dataclass
class _Entry:
    """One pair of one key and the state it was made in: ``signature`` (`GeneratedResiduals.signature`) and
    ``weights`` (`_weight_state` of each layer's frozen weight)."""

    signature: tuple
    weights: tuple
    psi: torch.Tensor
    tokens: torch.Tensor
    used: set = field(default_factory=set)  # with gradient: the layers of the current pass that took it
    consumed: _Flag | None = None           # with gradient: set once a backward went through the tokens

    def valid(self, signature: tuple, layer: int, weight: torch.Tensor) -> bool:
        return self.signature == signature and self.weights[layer] == _weight_state(weight)

    def valid_for_all(self, signature: tuple, weights: list) -> bool:
        return self.signature == signature and self.weights == tuple(map(_weight_state, weights))


class _BankedTokens(torch.autograd.Function):
    """A micro-batch's view of the step's tokens (detached) as a new graph root: the gradient a backward brings
    goes to the bank, tagged with the micro-batch, not into the generator. ``anchor`` (an empty leaf that needs
    a gradient) only makes autograd call this backward."""

    @staticmethod
    def forward(ctx, anchor, tokens, accumulation, key, micro_batch):
        ctx.accumulation, ctx.key, ctx.micro_batch = accumulation, key, micro_batch
        return tokens.view_as(tokens)

    @staticmethod
    def backward(ctx, grad):
        ctx.accumulation.deposit(ctx.key, ctx.micro_batch, grad)
        return None, None, None, None, None


class _LastMicroBatchTokens(torch.autograd.Function):
    """Micro-batch k of `accumulate`: the generator's own output; its backward adds the bank of micro-batches
    1..k-1 to this micro-batch's gradient, which then runs the generator's one backward of the step."""

    @staticmethod
    def forward(ctx, tokens, accumulation, key):
        ctx.accumulation, ctx.key = accumulation, key
        return tokens.view_as(tokens)

    @staticmethod
    def backward(ctx, grad):
        return ctx.accumulation.withdraw(ctx.key, grad), None, None


class Accumulation:
    """The state of one `accumulate` block: the generator's tokens of the step (per key), the bank of the
    gradients of micro-batches 1..k-1, and the micro-batch in progress. Made and dropped by
    `GeneratedResiduals.begin_accumulation` / `end_accumulation` (``FastGIFT.accumulate``); forward calls count
    only from the thread that made it (``thread``)."""

    def __init__(self, owner: "GeneratedResiduals", micro_batches: int):
        self.owner, self.micro_batches = owner, micro_batches
        self.thread = threading.get_ident()
        self.other_threads: set[int] = set()  # threads whose forwards with gradient ran outside the block meanwhile
        parameters = [p for key in owner.keys() for p in owner.model.residual_parameters(key)]
        self.parameter_ids = {id(p) for p in parameters}
        self.stepped = False  # an optimizer holding one of the model's GIFT parameters stepped inside the block
        self.anchor: torch.Tensor | None = None          # an empty leaf on the tokens' device (`_BankedTokens`)
        self.tokens: dict[str, torch.Tensor] = {}      # the generator's output, with its graph
        self.bank: dict[str, torch.Tensor] = {}        # sum of the tokens' gradients banked so far
        self.banked: dict[str, set[int]] = {}          # the micro-batches whose gradient is in the bank, per key
        self.withdrawn: set[str] = set()               # keys whose generator backward ran
        self.forwards = 0                              # micro-batches begun
        self.current: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}    # this micro-batch's pairs (forward)
        self.recomputed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # and those of its recomputations
        self.used: set[tuple[str, int]] = set()
        self.task: int | None = None                   # the backward whose recomputations this micro-batch had
        self.flush_queued = False
        self.grads: dict[int, tuple] = {}              # id(p) -> (p.grad, its version) after p's last accumulation
        self.hooks = []
        for p in parameters:
            if p.requires_grad:
                self.hooks.append(p.register_hook(self._grad_arrives(p)))
                self.hooks.append(p.register_post_accumulate_grad_hook(self._grad_accumulated))

    # ---------------------------------------------------------------- checks
    def saw_step(self, optimizer) -> None:
        if any(id(p) in self.parameter_ids for group in optimizer.param_groups for p in group["params"]):
            self.stepped = True

    def _check_steps(self) -> None:
        if self.stepped:
            raise RuntimeError(f"optimizer.step() ran inside FastGIFT.accumulate({self.micro_batches}); step "
                               f"after the block, once its {self.micro_batches} micro-batches are done.")

    def _grad_arrives(self, p: torch.Tensor):
        def check(grad: torch.Tensor) -> None:
            seen = self.grads.get(id(p))
            if seen is not None and (p.grad is not seen[0] or p.grad._version != seen[1]):
                k = self.micro_batches
                raise RuntimeError(
                    f"a GIFT parameter's .grad was zeroed, replaced or changed between the micro-batches of "
                    f"FastGIFT.accumulate({k}) (zero_grad() inside the block?): the generator's gradient would "
                    f"still hold the earlier micro-batches. Call optimizer.zero_grad() after the block, with the step.")
        return check

    def _grad_accumulated(self, p: torch.Tensor) -> None:
        self.grads[id(p)] = (p.grad, p.grad._version)

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks, self.grads = [], {}

    # ---------------------------------------------------------------- pairs
    def begin_pass(self, keys: list[str]) -> None:
        """The wrapper's forward begins a micro-batch: its pairs made here, outside any checkpointed block."""
        self._check_steps()
        if self.used or self.forwards == 0 or self.task is not None:
            self._next_micro_batch()
        for key in keys:
            if key not in self.current:
                self.current[key] = self._pair(key)

    def lookup(self, key: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_steps()
        task = torch._C._current_graph_task_id()
        if task != -1:
            return self._recomputed_pair(key, task)
        if (key, layer) in self.used or self.forwards == 0 or self.task is not None:
            self._next_micro_batch()
        self.used.add((key, layer))
        if key not in self.current:
            self.current[key] = self._pair(key)
        return self.current[key]

    def _recomputed_pair(self, key: str, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer recomputed in a backward: its forward's values as a banked graph root. A non-reentrant
        checkpoint only takes their values (its recomputed graph is dropped); a reentrant one runs a backward
        through each recomputed block, each adding its gradient to the bank."""
        if self.forwards == 0 or (self.task is not None and self.task != task):
            self._next_micro_batch()  # a micro-batch whose forward ran without gradient (reentrant checkpointing)
        self.task = task
        if key not in self.recomputed:
            tokens = self._tokens(key)
            if tokens.requires_grad:
                tokens = self._banked(key, tokens)
                if self.forwards == self.micro_batches and not self.flush_queued:
                    self.flush_queued = True
                    torch.autograd.Variable._execution_engine.queue_callback(self._flush)
            self.recomputed[key] = (self.owner.model.make_psi(key), tokens)
        return self.recomputed[key]

    def _next_micro_batch(self) -> None:
        k = self.micro_batches
        if self.forwards and not all(self.forwards in self.banked.get(key, ()) or key in self.withdrawn
                                     for key in self.current if self.tokens[key].requires_grad):
            raise RuntimeError(f"FastGIFT.accumulate({k}): micro-batch {self.forwards + 1}'s forward began before "
                               f"the backward of micro-batch {self.forwards}; call loss.backward() on each "
                               f"micro-batch before the next forward (each target layer runs once per forward).")
        if self.forwards == k:
            raise RuntimeError(f"FastGIFT.accumulate({k}): a forward after the {k} micro-batches of the step; "
                               f"accumulate({k}) takes exactly {k} forwards (and backwards).")
        self.forwards += 1
        self.current, self.recomputed, self.used, self.task = {}, {}, set(), None

    def values(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's pair without a graph, for a forward under ``no_grad`` inside the block."""
        with torch.enable_grad():
            tokens = self._tokens(key)
        return self.owner.model.make_psi(key), tokens.detach()

    def _tokens(self, key: str) -> torch.Tensor:
        if key not in self.tokens:
            _, self.tokens[key] = generate(self.owner.model, key)
        return self.tokens[key]

    def _banked(self, key: str, tokens: torch.Tensor) -> torch.Tensor:
        if self.anchor is None:
            self.anchor = torch.empty(0, device=tokens.device, requires_grad=True)
        return _BankedTokens.apply(self.anchor, tokens.detach(), self, key, self.forwards)

    def _pair(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self._tokens(key)
        if tokens.requires_grad:  # a frozen generator (psi or head only training) needs no bank
            if self.forwards < self.micro_batches:
                tokens = self._banked(key, tokens)
            else:
                tokens = _LastMicroBatchTokens.apply(tokens, self, key)
        return self.owner.model.make_psi(key), tokens

    # ---------------------------------------------------------------- gradients
    def deposit(self, key: str, micro_batch: int, grad: torch.Tensor) -> None:
        if key in self.withdrawn:
            k = self.micro_batches
            raise RuntimeError(f"FastGIFT.accumulate({k}): a backward of micro-batch {micro_batch} ran after the "
                               f"generator's backward in micro-batch {k}'s; call loss.backward() on each micro-batch "
                               f"in turn.")
        self.bank[key] = grad if key not in self.bank else self.bank[key] + grad
        self.banked.setdefault(key, set()).add(micro_batch)

    def _check_banked(self, key: str, want: set[int]) -> None:
        k, done = self.micro_batches, self.banked.get(key, set())
        if done != want:
            raise RuntimeError(f"FastGIFT.accumulate({k}): the backward of micro-batch {k} ran after the backwards of "
                               f"micro-batches {sorted(done)} of the {k - 1} before it; call loss.backward() on each "
                               f"micro-batch in turn.")

    def withdraw(self, key: str, grad: torch.Tensor) -> torch.Tensor:
        if key in self.withdrawn:  # another backward of the last micro-batch (retain_graph, several losses)
            return grad
        self._check_banked(key, set(range(1, self.micro_batches)))
        self.withdrawn.add(key)
        return grad + self.bank.pop(key) if key in self.bank else grad

    def _flush(self) -> None:
        """End of the last micro-batch's backward under reentrant checkpointing: the generator's one backward."""
        keys = [key for key in self.recomputed if key not in self.withdrawn and self.tokens[key].requires_grad]
        for key in keys:
            self._check_banked(key, set(range(1, self.micro_batches + 1)))
        self.withdrawn.update(keys)
        if keys:
            torch.autograd.backward([self.tokens[key] for key in keys], [self.bank.pop(key) for key in keys])

    def check_complete(self) -> None:
        """Raise when the block did not run its k forwards and k backwards through every key it used."""
        k = self.micro_batches
        trained = [key for key, tokens in self.tokens.items() if tokens.requires_grad]
        if self.forwards != k or not self.tokens or set(trained) != self.withdrawn:
            backwards = min([len(self.banked.get(key, ())) + (key in self.withdrawn) for key in trained] or [0])
            raise RuntimeError(f"FastGIFT.accumulate({k}): {self.forwards} micro-batch forward(s) with gradient and "
                               f"{backwards} backward(s) ran inside the block; it needs {k} of each (forward, then "
                               f"loss.backward(), per micro-batch).")


class GeneratedResiduals:
    """The owner of one model's generated residuals (see the module docstring for when a pair is reused).

    ``model``: the `gift.fast.FastGIFT` whose layers ask; it provides ``merged``, ``check_merged_use()``,
    ``make_residuals(key)`` -> (psi (d_in, r'), tokens (L, d_out, r')), ``make_psi(key)``,
    ``residual_parameters(key)`` (the key's GIFT parameters) and ``target_weights(key)`` (its L frozen weights).
    """

    def __init__(self, model) -> None:
        _watch_optimizer_steps()
        self.model = model
        self.disabled = 0
        self._lock = threading.Lock()
        self._inference: dict[str, _Entry] = {}
        self._local = threading.local()  # .training: {key: _Entry} of this thread's passes with gradient
        self._latest: dict[str, _Entry] = {}  # the latest training entry of any thread (a backward on a device thread)
        self.accumulation: Accumulation | None = None
        self.traced: dict | None = None  # under torch.compile: the pairs FastGIFT.forward made in its graph

    # copies start empty, bound to the copy of the model
    def __deepcopy__(self, memo) -> "GeneratedResiduals":
        return GeneratedResiduals(copy.deepcopy(self.model, memo))

    def __getstate__(self) -> dict:
        return {"model": self.model}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"])

    def reset(self) -> None:
        """Forget every pair, in every thread (the next call makes new ones): after edits through ``.data``."""
        with self._lock:
            self._inference, self._local, self._latest = {}, threading.local(), {}

    @property
    def _training(self) -> dict[str, _Entry]:
        """{key: `_Entry`} of this thread's passes with gradient."""
        entries = getattr(self._local, "training", None)
        if entries is None:
            entries = self._local.training = {}
        return entries

    def signature(self, key: str) -> tuple:
        """What ``key``'s pair depends on besides the frozen weights, read from the live parameters: the optimizer
        steps so far, the GIFT parameters' dtype and device, and for each of them (object, storage address,
        version, requires_grad)."""
        params = list(self.model.residual_parameters(key))
        first = params[0]
        fake = isinstance(first, FakeTensor)
        return (optimizer_steps(), first.dtype, first.device,
                tuple((id(p), _address(p, fake), p._version, p.requires_grad) for p in params))

    def cachable(self, key: str) -> bool:
        """Whether ``key``'s pair may be kept: not inside a ``torch.func`` transform (``grad``, ``vmap``: a pair
        belongs to that call's wrapped parameters), and every parameter and frozen weight it is made from has storage
        to identify it by (fake tensors, the planner's, stand for theirs)."""
        if in_functorch_transform():
            return False
        tensors = [*self.model.residual_parameters(key), *self.model.target_weights(key)]
        return all(isinstance(t, FakeTensor) or _has_storage(t) for t in tensors)

    def _make(self, key: str, signature: tuple, weights: list, **state) -> _Entry:
        psi, tokens = generate(self.model, key)
        return _Entry(signature, tuple(map(_weight_state, weights)), psi, tokens, **state)

    def _accumulation_of_this_call(self, in_backward: bool) -> Accumulation | None:
        """The `accumulate` block a call belongs to: a forward of the thread that entered it, or a recomputation in
        a backward on any thread but one whose own forwards ran outside the block (on CUDA a backward runs on an
        autograd device thread, which made no forward)."""
        accumulation = self.accumulation
        if accumulation is None:
            return None
        thread = threading.get_ident()
        if thread == accumulation.thread or (in_backward and thread not in accumulation.other_threads):
            return accumulation
        if not in_backward:
            accumulation.other_threads.add(thread)
        return None

    @torch.compiler.disable
    def lookup(self, key: str, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(psi (d_in, r'), tokens (L, d_out, r')) for ``layer`` of ``key``, or None when the layer runs plain
        (merged: its weight holds the residual; inside ``disable_adapter()``)."""
        if self.disabled:
            return None
        if self.model.merged:
            self.model.check_merged_use(key)
            return None
        if not self.cachable(key):  # made for this call alone
            return generate(self.model, key)
        if not torch.is_grad_enabled():
            accumulation = self._accumulation_of_this_call(False)
            if accumulation is not None and not torch.is_inference_mode_enabled():
                with self._lock:  # a forward under no_grad inside the block (reentrant checkpointing): the step's
                    return accumulation.values(key)  # tokens, so the generator runs once per step all the same
            return self._lookup_inference(key, layer)
        in_backward = torch._C._current_graph_task_id() != -1
        accumulation = self._accumulation_of_this_call(in_backward)
        if accumulation is not None:
            with self._lock:
                return accumulation.lookup(key, layer)
        return self._lookup_training(key, layer, in_backward)

    @torch.compiler.disable
    def begin_pass(self) -> None:
        """A forward pass with gradient begins (the wrapper's forward): each key's pair is made here, outside any
        block that ``memory="mlp"/"block"`` recomputes, for the layers of this pass to share. Nothing to do in a
        backward (the whole model checkpointed around the wrapper): the layers take their forward's pairs."""
        if (self.disabled or self.model.merged or not torch.is_grad_enabled()
                or torch._C._current_graph_task_id() != -1):
            return
        keys = self.keys()
        accumulation = self._accumulation_of_this_call(False)
        if accumulation is not None:
            with self._lock:
                accumulation.begin_pass(keys)
            return
        entries = self._training
        for key in keys:
            if not self.cachable(key):
                continue
            signature, weights = self.signature(key), self.model.target_weights(key)
            entry = entries.get(key)
            if (entry is None or entry.used or not entry.valid_for_all(signature, weights)
                    or (entry.consumed is not None and entry.consumed.is_set)):
                self._store_training(key, self._make(key, signature, weights))

    def _lookup_inference(self, key: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        signature, weights = self.signature(key), self.model.target_weights(key)
        entry = self._inference.get(key)
        if entry is None or not entry.valid(signature, layer, weights[layer]):
            entry = self._make(key, signature, weights)
            with self._lock:
                self._inference[key] = entry
        return entry.psi, entry.tokens

    def _lookup_training(self, key: str, layer: int, in_backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
        signature, weights = self.signature(key), self.model.target_weights(key)
        entries = self._training
        with self._lock:
            entry = entries.get(key)
            if entry is None and in_backward:  # a backward on an autograd device thread: the latest pass's pair
                entry = self._latest.get(key)
            if entry is not None and entry.valid(signature, layer, weights[layer]):
                if entry.consumed is None:  # no graph (no GIFT parameter needs a gradient): like inference
                    return entry.psi, entry.tokens
                if not entry.consumed.is_set and (in_backward or layer not in entry.used):
                    entry.used.add(layer)
                    return entry.psi, entry.tokens
        entry = self._make(key, signature, weights, used={layer})
        self._store_training(key, entry)
        return entry.psi, entry.tokens

    def _store_training(self, key: str, entry: _Entry) -> None:
        if entry.tokens.requires_grad:
            entry.consumed = _Flag()
            entry.tokens.register_hook(entry.consumed.set)
        entries = self._training
        with self._lock:
            entries[key] = entry
            self._latest[key] = entry

    @property
    def accumulating(self) -> bool:
        return self.accumulation is not None

    def keys(self) -> list[str]:
        return [group.key for group in self.model.target_groups]

    def parameter_versions(self, key: str) -> int:
        """The sum of the version counters of ``key``'s GIFT parameters (it grows with every in-place change)."""
        return sum(p._version for p in self.model.residual_parameters(key))

    @contextlib.contextmanager
    def disabled_adapter(self):
        """While inside, every layer runs plain (`lookup` returns None): model-wide, in every thread."""
        with self._lock:
            self.disabled += 1
        try:
            yield
        finally:
            with self._lock:
                self.disabled -= 1

    def begin_accumulation(self, micro_batches: int) -> None:
        with self._lock:
            if self.accumulation is not None:
                raise RuntimeError("FastGIFT.accumulate() blocks do not nest; one block per optimizer step.")
            self.accumulation = Accumulation(self, micro_batches)
            _accumulating.add(self.accumulation)

    def end_accumulation(self, check: bool) -> None:
        """Drop the block's state (its tokens, graph, bank and hooks); with ``check`` first raise when it was
        incomplete."""
        with self._lock:
            accumulation, self.accumulation = self.accumulation, None
        if accumulation is not None:
            _accumulating.discard(accumulation)
            accumulation.remove_hooks()
        if check and accumulation is not None:
            accumulation.check_complete()
