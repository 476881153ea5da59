"""The ``portable`` backend: standard-ops training-step graphs run by a plain ``InferenceSession``.

Works on any onnxruntime >= 1.19 (x86_64 and aarch64 wheels, Debian's armhf
package, and the InferenceSession of onnxruntime-training). Each step graph
takes the training state as inputs and returns the next state (see
``graph_names``); the backend keeps that state in ORT-owned buffers (the
parameters of a graph's ``flat.param`` in one numpy array, each parameter a
view of it) and runs each step through an IO binding, so per step only ``x``
and ``y`` are bound.
An updated parameter has two buffers that swap roles each step (ping-pong):
its old value is read by the backward pass, which ORT may schedule after the
node that writes the new value, so the step must not write the buffer it is
reading; unless the step graph is marked ``graph_names.PARAMS_IN_PLACE`` (its
builder proved every read of a parameter comes first), then a parameter has
one buffer, bound as input and output (2.3 MB less on the 2D-CNN). The optimizer state (step count, AdamW moments) is updated in place,
one buffer each: in every step graph the node that writes ``new.opt.*`` comes,
by data dependency, after the only node that reads ``opt.*`` (see
``graph_names.updated_in_place``), which saves a copy of both moments (4.7 MB
on the 2D-CNN). Nothing is copied per step.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from device_agent.bundle.archive import TrainingBundle
from device_agent.bundle.manifest import ANCHOR_PREFIX, ArtifactSetName, PortableArtifacts
from device_agent.errors import BundleError
from device_agent.npy_header import load_npz_arrays
from device_agent.training_backends import graph_names as g
from device_agent.training_backends.base import BackendName, TrainingBackend
from device_agent.training_backends.runtime import (
    BackendUnavailableError,
    has_inference_session,
    onnxruntime_module,
    release_free_heap,
    shared_cpu_arena,
)
from device_agent.training_backends.state import OptimizerState, TrainingState, fresh_optimizer


#: Models with at most this many parameters run with onnxruntime's memory pattern (see _session_options).
MEMORY_PATTERN_MAX_PARAMETERS = 1 << 13


class _Slot:
    """One state value (a parameter, an anchor, a moment vector): ORT buffers (two for ping-pong), ``current`` holds the value."""

    def __init__(self, ort: Any, value: np.ndarray, *, buffers: int = 1) -> None:
        self.buffers = [ort.OrtValue.ortvalue_from_shape_and_type(value.shape, value.dtype) for _ in range(buffers)]
        self.buffers[0].update_inplace(np.ascontiguousarray(value))
        self.current = 0
        self._ort = ort
        self._dtype = value.dtype

    def pair(self) -> None:
        """Give the slot its second buffer (when a step graph that ping-pongs it is bound)."""
        if len(self.buffers) == 1 and self._ort is not None:
            first = self.buffers[0]
            self.buffers = [first, self._ort.OrtValue.ortvalue_from_shape_and_type(first.shape(), self._dtype)]

    @classmethod
    def over(cls, buffers: list[Any]) -> _Slot:
        """A slot over existing buffers (views of a flat group's arrays); the value is in buffer 0."""
        slot = cls.__new__(cls)
        slot.buffers = buffers
        slot.current = 0
        slot._ort = None  # the group made its views in pairs, or singly, for the graph that binds them
        return slot

    def read(self) -> np.ndarray:
        return np.array(self.buffers[self.current].numpy(), copy=True)

    def write(self, value: np.ndarray) -> None:
        self.buffers[self.current].update_inplace(np.ascontiguousarray(value))

    def settle(self) -> None:
        """Move the value into buffer 0 (done when a set starts training, so all its updated slots agree)."""
        if self.current:
            self.buffers[0].update_inplace(self.buffers[1].numpy())
            self.current = 0


class _FlatGroup:
    """The parameters a step graph updates as one ``flat.param``: one flat array (two to ping-pong), each parameter's slot a view of it.

    The arrays are numpy's and the OrtValues wrap them without copying, so a parameter's
    ``param.*`` input and its piece of ``flat.param`` are the same memory.
    """

    def __init__(self, ort: Any, names: tuple[str, ...], shapes: dict[str, tuple[int, ...]], *, pairs: bool) -> None:
        self.names = names
        sizes = [int(np.prod(shapes[n], dtype=np.int64)) for n in names]
        self.arrays = [np.zeros(sum(sizes), dtype=np.float32) for _ in range(2 if pairs else 1)]
        self.slot = _Slot.over([ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays])
        self.pieces: dict[str, slice] = {}
        self.views: dict[str, list[Any]] = {}
        offset = 0
        for name, size in zip(names, sizes):
            self.pieces[name] = slice(offset, offset + size)
            self.views[name] = [ort.OrtValue.ortvalue_from_numpy(a[offset:offset + size].reshape(shapes[name])) for a in self.arrays]
            offset += size

    def adopt(self, slots: dict[str, _Slot]) -> None:
        """Copy each member's current value into array 0 and point its slot at the group's views (on activation)."""
        for name in self.names:
            slot = slots[g.param(name)]
            self.arrays[0][self.pieces[name]] = slot.buffers[slot.current].numpy().reshape(-1)
        for name in self.names:
            slot = slots[g.param(name)]
            slot.buffers, slot.current = self.views[name], 0
        self.slot.current = 0


class _StepGraph:
    """One set's step graph with its two IO bindings (ping-pong state in buffer 0 -> 1, and 1 -> 0).

    While the set trains, its ping-pong slots' ``current`` is not touched per step:
    after k steps their values are in buffer ``next`` (= k mod 2), and
    :meth:`settle_slots` writes that back before anyone else reads a slot.
    Slots updated in place have one buffer, bound as both input and output.
    """

    def __init__(self, ort: Any, path: str, options: Any) -> None:
        self.ort = ort
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        if self.inputs[:3] != [g.X, g.Y, g.LR] or self.outputs[0] != g.LOSS:
            raise BundleError(f"{os.path.basename(path)} is not a fedge portable step graph")
        self.updated = [g.updated(o) or o for o in self.outputs[1:]]
        meta = self.session.get_modelmeta().custom_metadata_map
        self.params_in_place = meta.get(g.PARAMS_IN_PLACE) == "1"
        self.ping_pong = [] if self.params_in_place else [n for n in self.updated if not g.updated_in_place(n)]
        self.bindings: list[Any] = []
        self.next = 0
        self.batch: tuple[Any, ...] = ()
        self.xy: list[Any] = []

    def bind(self, slots: dict[str, _Slot], lr: Any, loss: Any) -> None:
        """(Re)build both bindings from the slots' current buffers; updated slots must all be in buffer 0."""
        self.bindings = []
        for parity in (0, 1):
            binding = self.session.io_binding()
            binding.bind_ortvalue_input(g.LR, lr)
            for name in self.inputs[3:]:
                slot = slots[name]
                binding.bind_ortvalue_input(name, slot.buffers[parity if name in self.ping_pong else slot.current])
            binding.bind_ortvalue_output(g.LOSS, loss)
            for out, name in zip(self.outputs[1:], self.updated):
                slot = slots[name]
                binding.bind_ortvalue_output(out, slot.buffers[1 - parity] if name in self.ping_pong else slot.buffers[slot.current])
            self.bindings.append(binding)
        self.next = 0
        self.batch = ()

    def feed(self, x: np.ndarray, y: np.ndarray) -> None:
        """Copy the batch into x/y buffers bound to both bindings (rebound only when the batch shape changes)."""
        shape = (x.shape, x.dtype, y.shape, y.dtype)
        if shape != self.batch:
            self.xy = [self.ort.OrtValue.ortvalue_from_shape_and_type(a.shape, a.dtype) for a in (x, y)]
            for binding in self.bindings:
                binding.bind_ortvalue_input(g.X, self.xy[0])
                binding.bind_ortvalue_input(g.Y, self.xy[1])
            self.batch = shape
        self.xy[0].update_inplace(x)
        self.xy[1].update_inplace(y)

    def settle_slots(self, slots: dict[str, _Slot]) -> None:
        for name in self.ping_pong:
            slots[name].current = self.next


class PortableBackend(TrainingBackend):
    """Trains a bundle's portable graphs; ``state`` None starts from the bundle's initial weights."""

    name = BackendName.PORTABLE

    def __init__(self, bundle: TrainingBundle, *, threads: int | None = None, state: TrainingState | None = None) -> None:
        manifest = bundle.manifest
        if manifest.portable is None:
            raise BackendUnavailableError("this bundle carries no portable artifacts (format 1, or built for ort-training only)")
        if not has_inference_session():
            raise BackendUnavailableError("the portable backend needs onnxruntime (install fedge[device])")
        ort = onnxruntime_module()
        self._ort = ort
        self._manifest = manifest
        portable: PortableArtifacts = manifest.portable
        size = sum(int(np.prod(p.shape, dtype=np.int64)) for p in manifest.parameters)
        options = _session_options(ort, threads, memory_pattern=size <= MEMORY_PATTERN_MAX_PARAMETERS)
        state = state if state is not None else self._initial_state(bundle, portable)
        self._slots: dict[str, _Slot] = {g.param(n): _Slot(ort, v) for n, v in state.parameters.items()}
        self._slots.update({g.anchor(n): _Slot(ort, v) for n, v in state.anchors.items()})
        # Sessions open on first use: a process that only trains never pays for the eval graph, and a
        # set that never trains (finetune) never costs memory (measured: ~5 MB per session on the 2D-CNN).
        self._options = options
        self._graphs: dict[ArtifactSetName, _StepGraph] = {}
        self._graph_paths = {pset.name: os.fspath(bundle.path(pset.step_model)) for pset in portable.sets}
        self._set_slots: dict[ArtifactSetName, dict[str, _Slot]] = {}
        self._groups: dict[ArtifactSetName, _FlatGroup] = {}
        # Optimizer state of the sets whose step graph has not opened yet: the graph's inputs say how its
        # moments are laid out (see graph_names), so their slots are made when it opens.
        self._pending: dict[ArtifactSetName, OptimizerState] = {pset.name: state.optimizers[pset.name] for pset in portable.sets}
        self._steps: dict[ArtifactSetName, int] = {pset.name: state.optimizers[pset.name].step for pset in portable.sets}
        self._eval_path = os.fspath(bundle.path(portable.eval_model))
        self._eval: Any = None
        self._lr = ort.OrtValue.ortvalue_from_numpy(np.array(manifest.hyperparameters.learning_rate, dtype=np.float32))
        self._loss = ort.OrtValue.ortvalue_from_shape_and_type((), np.float32)
        self._active: ArtifactSetName | None = None

    def _initial_state(self, bundle: TrainingBundle, portable: PortableArtifacts) -> TrainingState:
        manifest = bundle.manifest
        stored = load_npz_arrays(bundle.path(portable.initial_parameters))
        params = {p.name: np.asarray(stored[p.name], dtype=np.float32) for p in manifest.parameters if p.name in stored}
        bad = [p.name for p in manifest.parameters if p.name not in params or params[p.name].shape != p.shape]
        if bad:
            raise BundleError(f"{portable.initial_parameters}: missing or misshapen parameters {bad}")
        anchors = {n: params[n].copy() for n in manifest.shared_names} if manifest.has_anchors else {}
        return TrainingState(parameters=params, anchors=anchors,
                             optimizers={s: fresh_optimizer(manifest, s) for s in manifest.set_names})

    def _settle(self) -> None:
        """Make every slot's ``current`` true again (the active set's slots lag behind while it trains)."""
        if self._active is not None:
            self._graphs[self._active].settle_slots(self._set_slots[self._active])

    def _activate(self, set_name: ArtifactSetName) -> _StepGraph:
        self._settle()
        if set_name not in self._graphs:
            graph = _StepGraph(self._ort, self._graph_paths[set_name], self._options)
            slots = {**self._slots, **self._optimizer_slots(graph, set_name)}
            if g.FLAT_PARAMS in graph.inputs:
                group = self._flat_group(graph, set_name)
                if not graph.params_in_place:
                    graph.ping_pong += [g.param(n) for n in group.names]
                slots[g.FLAT_PARAMS] = group.slot
                self._groups[set_name] = group
            self._graphs[set_name] = graph
            self._set_slots[set_name] = slots
            release_free_heap()  # the temporaries of opening it (flattened moments, first copies)
        graph = self._graphs[set_name]
        slots = self._set_slots[set_name]
        if set_name in self._groups:
            self._groups[set_name].adopt(slots)
        for name in graph.ping_pong:
            slots[name].pair()
            slots[name].settle()
        graph.bind(slots, self._lr, self._loss)
        self._active = set_name
        return graph

    def _flat_names(self, graph: _StepGraph, set_name: ArtifactSetName) -> tuple[str, ...]:
        """The set's trainable parameters without moments of their own: the layout of opt.m, opt.v and flat.param."""
        separate = {owner[1] for owner in map(g.moment_owner, graph.inputs) if owner is not None}
        return tuple(n for n in self._manifest.trainable(set_name) if n not in separate)

    def _flat_group(self, graph: _StepGraph, set_name: ArtifactSetName) -> _FlatGroup:
        shapes = {p.name: p.shape for p in self._manifest.parameters}
        group = _FlatGroup(self._ort, self._flat_names(graph, set_name), shapes, pairs=not graph.params_in_place)
        declared = next(i.shape for i in graph.session.get_inputs() if i.name == g.FLAT_PARAMS)
        if list(declared) != [group.arrays[0].size]:
            raise BundleError(f"{set_name.value} step graph: {g.FLAT_PARAMS} is {declared}, its parameters hold {group.arrays[0].size}")
        return group

    def _optimizer_slots(self, graph: _StepGraph, set_name: ArtifactSetName) -> dict[str, _Slot]:
        """Slots for the step graph's optimizer inputs, filled from the set's pending optimizer state."""
        opt = self._pending.pop(set_name)
        shared = self._flat_names(graph, set_name)
        values = {}
        for name in graph.inputs:
            if name == g.OPT_STEP:
                values[name] = np.array(opt.step, dtype=np.int64)
            elif name in (g.OPT_M, g.OPT_V):
                values[name] = _flatten(opt.m if name == g.OPT_M else opt.v, shared)
            elif (owner := g.moment_owner(name)) is not None:
                kind, param = owner
                values[name] = np.asarray((opt.m if kind == g.OPT_M else opt.v)[param], dtype=np.float32)
        return {name: _Slot(self._ort, value, buffers=2 if name in graph.ping_pong else 1) for name, value in values.items()}

    def train_step(self, set_name: ArtifactSetName, x: np.ndarray, y: np.ndarray) -> float:
        graph = self._graphs[set_name] if self._active is set_name else self._activate(set_name)
        graph.feed(x, y)
        graph.session.run_with_iobinding(graph.bindings[graph.next])
        graph.next ^= 1
        self._steps[set_name] += 1
        return float(self._loss.numpy())

    def eval_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        self._settle()
        if self._eval is None:
            self._eval = self._ort.InferenceSession(self._eval_path, self._options, providers=["CPUExecutionProvider"])
            self._eval_inputs = [i.name for i in self._eval.get_inputs()]
        binding = self._eval.io_binding()
        keep = [self._ort.OrtValue.ortvalue_from_numpy(x), self._ort.OrtValue.ortvalue_from_numpy(y)]
        binding.bind_ortvalue_input(g.X, keep[0])
        binding.bind_ortvalue_input(g.Y, keep[1])
        for name in self._eval_inputs[2:]:
            slot = self._slots[name]
            binding.bind_ortvalue_input(name, slot.buffers[slot.current])
        binding.bind_output(g.LOSS)
        binding.bind_output(g.OUTPUT)
        self._eval.run_with_iobinding(binding)
        loss, out = binding.copy_outputs_to_cpu()
        return float(loss), out

    def _slot(self, name: str) -> _Slot:
        self._settle()
        key = g.anchor(name[len(ANCHOR_PREFIX):]) if name.startswith(ANCHOR_PREFIX) else g.param(name)
        try:
            return self._slots[key]
        except KeyError:
            raise KeyError(name) from None

    def get_parameter(self, name: str) -> np.ndarray:
        return self._slot(name).read()

    def set_parameter(self, name: str, value: np.ndarray) -> None:
        self._slot(name).write(np.asarray(value, dtype=np.float32))

    def set_learning_rate(self, value: float) -> None:
        self._lr.update_inplace(np.array(value, dtype=np.float32))

    def export_state(self) -> TrainingState:
        self._settle()
        params = {p.name: self._slots[g.param(p.name)].read() for p in self._manifest.parameters}
        anchors = {n[len(g.ANCHOR):]: s.read() for n, s in self._slots.items() if n.startswith(g.ANCHOR)}
        shapes = {p.name: p.shape for p in self._manifest.parameters}
        optimizers = dict(self._pending)
        for set_name, slots in self._set_slots.items():
            trainable = self._manifest.trainable(set_name)
            m: dict[str, np.ndarray] = {}
            v: dict[str, np.ndarray] = {}
            own = [owner for owner in map(g.moment_owner, slots) if owner is not None]
            shared = tuple(n for n in trainable if (g.OPT_M, n) not in own)
            if g.OPT_M in slots:
                m.update(_unflatten(slots[g.OPT_M].read(), shared, shapes))
                v.update(_unflatten(slots[g.OPT_V].read(), shared, shapes))
            for kind, param in own:
                (m if kind == g.OPT_M else v)[param] = slots[g.own_moment(kind, param)].read()
            optimizers[set_name] = OptimizerState(step=self._steps[set_name], m=m, v=v)
        return TrainingState(parameters=params, anchors=anchors, optimizers=optimizers)


def _session_options(ort: Any, threads: int | None, *, memory_pattern: bool) -> Any:
    """Session options for the portable graphs: on the shared arena; onnxruntime's memory pattern for small models only.

    With a memory pattern onnxruntime allocates, from the second run on, one block for all of a run's
    intermediates instead of one allocation per intermediate. Measured at batch 32, one thread: the MLP's step
    (3.6k parameters, ~50 us, dispatch-bound) runs 12-15% faster per CPU-second with it and holds the same memory;
    the 1D-CNN's (16k) holds 3.5 MB more with it at the same speed, the 2D-CNN's (582k) 7 MB more (110.6 vs
    103.8 MB, from the doubling shared arena; micro-batched, 9 MB more). So models of up to
    MEMORY_PATTERN_MAX_PARAMETERS parameters use it, larger ones do not.
    """
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3
    options.enable_mem_pattern = memory_pattern
    if shared_cpu_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    return options


def _flatten(arrays: dict[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    """The graph's flat moment vector: ``names``' arrays flattened and concatenated in order."""
    return np.concatenate([arrays[n].reshape(-1) for n in names]).astype(np.float32)


def _unflatten(flat: np.ndarray, names: tuple[str, ...], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out = {}
    offset = 0
    for n in names:
        size = int(np.prod(shapes[n], dtype=np.int64))
        out[n] = flat[offset:offset + size].reshape(shapes[n]).copy()
        offset += size
    return out
