"""The generated residuals of a `gift.fast.FastGIFT`, owned in one place (`GeneratedResiduals`).

GIFT's residuals depend on the weights only, never on the data: for target key ``k``, psi (d_in, r') and
the tokens T (L, d_out, r') are the same for every input until a weight changes. The model's target layers
(`gift.fast.GIFTLinear`) ask their owner for their key's pair at every call, so every entry point of the
backbone (the wrapper's forward, ``backbone(x)``, ``forward_features``, ``forward_intermediates``, a Hugging
Face ``generate``) runs the adapted model; the owner makes the pair on demand and keeps it while it is
valid. When it is valid depends on the call:

* **No gradient** (``torch.no_grad``, ``torch.inference_mode``): one pair per key, made by the first layer
  that asks and shared by every later call and thread until it is stale: after an optimizer step (any
  ``torch.optim`` optimizer, fused ones included, counted by one global step hook), an in-place change of
  a GIFT parameter of the key or of the layer's frozen weight (their version counters: ``load_state_dict``,
  ``copy_``, an EMA update), a new parameter object or another dtype or device (autocast does not matter: the
  generator runs with autocast off and each layer casts the pair to its compute dtype). Nothing per call is stored,
  so concurrent inference from several threads gets the same outputs as one thread. Edits through
  ``.data`` bypass version counters: call `GeneratedResiduals.reset` after them.
* **With gradient** (training): every forward pass makes its own pair, with its autograd graph, so each
  backward has a graph of its own. A pass ends when one of its layers asks again or a backward has gone
  through the pair. Inside a backward (a block recomputed by ``memory="mlp"/"block"``), a layer gets the
  latest pair (the same values) until that pair's backward has run, then a fresh one: reentrant
  checkpointing, whose recomputations each run their own backward, stays correct.
* **Inside** `accumulate` (``FastGIFT.accumulate(k)``): one pair for the k micro-batches of the optimizer
  step. The generator runs at the first micro-batch's forward; micro-batches 1..k-1 use its tokens as a new
  graph root that adds their gradient to a bank; the k-th micro-batch uses the generator's output itself,
  its gradient plus the bank flowing into the generator: one generator forward and one backward per step,
  in the last micro-batch's backward (so under DDP the generator's gradients are reduced once, in the
  synchronised backward, with ``no_sync()`` for the others). psi is a parameter (or a concatenation of
  parameters) used directly by every micro-batch.

A deepcopy, pickle or EMA copy of the model starts with an empty owner of its own.
"""
from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

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


@dataclass
class _Entry:
    """One pair of one key and the state it was made in: ``signature`` (optimizer steps, the sum of the
    key's GIFT parameter versions, dtype and device) and ``weights`` ((id, version) of each layer's frozen weight)."""

    signature: tuple
    weights: tuple
    psi: torch.Tensor
    tokens: torch.Tensor
    used: set = field(default_factory=set)  # with gradient: the layers of the current pass that took it
    consumed: _Flag | None = None           # with gradient: set once a backward went through the tokens
    creator: int | None = None              # with gradient: the layer whose call made it (PASS: `begin_pass`)

    def valid(self, signature: tuple, layer: int, weight: torch.Tensor) -> bool:
        return self.signature == signature and self.weights[layer] == (id(weight), weight._version)

    def valid_for_all(self, signature: tuple, weights: list) -> bool:
        return self.signature == signature and self.weights == tuple((id(w), w._version) for w in weights)


PASS = -1  # `_Entry.creator` of a pair made by `GeneratedResiduals.begin_pass`


class _BankedTokens(torch.autograd.Function):
    """Micro-batch i < k of `accumulate`: the step's tokens (detached) as a new graph root; the gradient a
    backward brings goes to the bank, not into the generator. ``anchor`` (an empty leaf that needs a
    gradient) only makes autograd call this backward."""

    @staticmethod
    def forward(ctx, anchor, tokens, accumulation, key):
        ctx.accumulation, ctx.key = accumulation, key
        return tokens.view_as(tokens)

    @staticmethod
    def backward(ctx, grad):
        ctx.accumulation.deposit(ctx.key, grad)
        return None, None, None, None


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
    `GeneratedResiduals.begin_accumulation` / `end_accumulation` (``FastGIFT.accumulate``)."""

    def __init__(self, owner: "GeneratedResiduals", micro_batches: int):
        self.owner, self.micro_batches = owner, micro_batches
        self.parameter_ids = {id(p) for key in self.owner.keys() for p in owner.model.residual_parameters(key)}
        self.stepped = False  # an optimizer holding one of the model's GIFT parameters stepped inside the block
        self.anchor: torch.Tensor | None = None          # an empty leaf on the tokens' device (`_BankedTokens`)
        self.tokens: dict[str, torch.Tensor] = {}      # the generator's output, with its graph
        self.bank: dict[str, torch.Tensor] = {}        # sum of the tokens' gradients of micro-batches < k
        self.deposits: dict[str, int] = {}             # backwards of micro-batches < k, per key
        self.withdrawn: set[str] = set()               # keys whose last micro-batch's backward ran
        self.forwards = 0                              # micro-batches begun
        self.current: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.used: set[tuple[str, int]] = set()
        self.backed: set[str] = set()                  # keys whose gradient came back in this micro-batch
        self.creator: tuple[str, int, int] | None = None  # (key, layer, micro-batch) of a layer call that ran the
                                                          # generator (a bare backbone call: no begin_pass)

    def saw_step(self, optimizer) -> None:
        if any(id(p) in self.parameter_ids for group in optimizer.param_groups for p in group["params"]):
            self.stepped = True

    def _check_steps(self) -> None:
        if self.stepped:
            raise RuntimeError(f"optimizer.step() ran inside FastGIFT.accumulate({self.micro_batches}); step "
                               f"after the block, once its {self.micro_batches} micro-batches are done.")

    def begin_pass(self, keys: list[str]) -> None:
        """The wrapper's forward begins a micro-batch: its pairs made here, outside any checkpointed block."""
        self._check_steps()
        if self.used or self.forwards == 0:
            self._next_micro_batch()
        for key in keys:
            if key not in self.current:
                self.current[key] = self._pair(key)

    def lookup(self, key: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_steps()
        if torch._C._current_graph_task_id() != -1 and key in self.current:
            if self.creator == (key, layer, self.forwards):  # its forward made the tokens in a checkpointed block:
                return self._pair(key, again=True)          # the recomputation repeats that, tensor for tensor
            return self.current[key]  # a block of this micro-batch recomputed in its backward
        if (key, layer) in self.used or self.forwards == 0:
            self._next_micro_batch()
        self.used.add((key, layer))
        if key not in self.current:
            if key not in self.tokens:
                self.creator = (key, layer, self.forwards)
            self.current[key] = self._pair(key)
        return self.current[key]

    def _next_micro_batch(self) -> None:
        k = self.micro_batches
        if self.forwards and not set(self.current) <= self.backed:
            raise RuntimeError(f"FastGIFT.accumulate({k}): micro-batch {self.forwards + 1}'s forward began before "
                               f"the backward of micro-batch {self.forwards}; call loss.backward() on each "
                               f"micro-batch before the next forward (each target layer runs once per forward).")
        if self.forwards == k:
            raise RuntimeError(f"FastGIFT.accumulate({k}): a forward after the {k} micro-batches of the step; "
                               f"accumulate({k}) takes exactly {k} forwards (and backwards).")
        self.forwards += 1
        self.current, self.used, self.backed = {}, set(), set()

    def _pair(self, key: str, again: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.owner.model
        if key not in self.tokens or again:
            _, tokens = model.make_residuals(key)
            self.tokens.setdefault(key, tokens)
        tokens = self.tokens[key]
        if self.forwards < self.micro_batches:
            if self.anchor is None:
                self.anchor = torch.empty(0, device=tokens.device, requires_grad=True)
            tokens = _BankedTokens.apply(self.anchor, tokens.detach(), self, key)
        else:
            tokens = _LastMicroBatchTokens.apply(tokens, self, key)
        return model.make_psi(key), tokens

    def deposit(self, key: str, grad: torch.Tensor) -> None:
        self.bank[key] = grad if key not in self.bank else self.bank[key] + grad
        self.deposits[key] = self.deposits.get(key, 0) + 1
        self.backed.add(key)

    def withdraw(self, key: str, grad: torch.Tensor) -> torch.Tensor:
        k, done = self.micro_batches, self.deposits.get(key, 0)
        if done != k - 1:
            raise RuntimeError(f"FastGIFT.accumulate({k}): the backward of micro-batch {k} ran after {done} of the "
                               f"{k - 1} backwards before it; call loss.backward() on each micro-batch in turn.")
        self.withdrawn.add(key)
        self.backed.add(key)
        return grad + self.bank.pop(key) if key in self.bank else grad

    def check_complete(self) -> None:
        """Raise when the block did not run its k forwards and k backwards through every key it used."""
        k = self.micro_batches
        if self.forwards != k or not self.tokens or set(self.tokens) != self.withdrawn:
            backwards = min([self.deposits.get(key, 0) + (key in self.withdrawn) for key in self.tokens] or [0])
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
        self._training: dict[str, _Entry] = {}
        self._parameters: dict[str, tuple[list, list]] = {}
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
        """Forget every pair (the next call makes new ones): after edits that bypass version counters."""
        with self._lock:
            self._inference, self._training, self._parameters = {}, {}, {}

    def _signature(self, key: str) -> tuple[tuple, list]:
        params_weights = self._parameters.get(key)
        if params_weights is None:
            params_weights = self._parameters[key] = (list(self.model.residual_parameters(key)),
                                                      list(self.model.target_weights(key)))
        params, weights = params_weights
        first = params[0]
        return (optimizer_steps(), sum(p._version for p in params), first.dtype, first.device), weights

    def _make(self, key: str, signature: tuple, weights: list, **state) -> _Entry:
        psi, tokens = self.model.make_residuals(key)
        return _Entry(signature, tuple((id(w), w._version) for w in weights), psi, tokens, **state)

    @torch.compiler.disable
    def lookup(self, key: str, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(psi (d_in, r'), tokens (L, d_out, r')) for ``layer`` of ``key``, or None when the layer runs plain
        (merged: its weight holds the residual; inside ``disable_adapter()``)."""
        if self.disabled:
            return None
        if self.model.merged:
            self.model.check_merged_use(key)
            return None
        if not torch.is_grad_enabled():
            return self._lookup_inference(key, layer)
        if self.accumulation is not None:
            with self._lock:
                return self.accumulation.lookup(key, layer)
        return self._lookup_training(key, layer)

    @torch.compiler.disable
    def begin_pass(self) -> None:
        """A forward pass with gradient begins (the wrapper's forward): each key's pair is made here, outside any
        block that ``memory="mlp"/"block"`` recomputes, for the layers of this pass to share."""
        if self.disabled or self.model.merged or not torch.is_grad_enabled():
            return
        keys = self.keys()
        if torch._C._current_graph_task_id() != -1:  # the whole model recomputed in a backward (checkpointed
            for key in keys:                         # around it): repeat what this made, tensor for tensor
                entry = self._training.get(key)
                if entry is not None and entry.creator == PASS and not entry.consumed.is_set:
                    self.model.make_residuals(key)
            return
        if self.accumulation is not None:
            with self._lock:
                self.accumulation.begin_pass(keys)
            return
        for key in keys:
            signature, weights = self._signature(key)
            entry = self._training.get(key)
            if (entry is None or entry.used or not entry.valid_for_all(signature, weights)
                    or (entry.consumed is not None and entry.consumed.is_set)):
                self._store_training(key, self._make(key, signature, weights, creator=PASS))

    def _lookup_inference(self, key: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        signature, weights = self._signature(key)
        entry = self._inference.get(key)
        if entry is None or not entry.valid(signature, layer, weights[layer]):
            entry = self._make(key, signature, weights)
            with self._lock:
                self._inference[key] = entry
        return entry.psi, entry.tokens

    def _lookup_training(self, key: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        in_backward = torch._C._current_graph_task_id() != -1
        signature, weights = self._signature(key)
        with self._lock:
            entry = self._training.get(key)
            if entry is not None and entry.valid(signature, layer, weights[layer]):
                if entry.consumed is None:  # no graph (no GIFT parameter needs a gradient): like inference
                    return entry.psi, entry.tokens
                if not entry.consumed.is_set and in_backward:
                    if layer == entry.creator:  # this layer's forward call ran the generator inside a checkpointed
                        return self.model.make_residuals(key)  # block: its recomputation repeats that
                    return entry.psi, entry.tokens
                if not entry.consumed.is_set and layer not in entry.used:
                    entry.used.add(layer)
                    return entry.psi, entry.tokens
        if in_backward:
            entry = self._make(key, signature, weights)
        else:
            entry = self._make(key, signature, weights, used={layer}, creator=layer)
        self._store_training(key, entry)
        return entry.psi, entry.tokens

    def _store_training(self, key: str, entry: _Entry) -> None:
        if entry.tokens.requires_grad:
            entry.consumed = _Flag()
            entry.tokens.register_hook(entry.consumed.set)
        with self._lock:
            self._training[key] = entry

    @property
    def accumulating(self) -> bool:
        return self.accumulation is not None

    def keys(self) -> list[str]:
        return [group.key for group in self.model.target_groups]

    def parameter_versions(self, key: str) -> int:
        """The sum of the version counters of ``key``'s GIFT parameters (it grows with every in-place change)."""
        return self._signature(key)[0][1]

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
        """Drop the block's state (its tokens, graph and bank); with ``check`` first raise when it was incomplete."""
        with self._lock:
            accumulation, self.accumulation = self.accumulation, None
        if accumulation is not None:
            _accumulating.discard(accumulation)
        if check and accumulation is not None:
            accumulation.check_complete()
