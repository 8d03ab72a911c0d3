"""Where the Trainer's batches come from: one seam, three sources.

``Resident``  the data set held on the training device as one tensor; each batch is gathered there
              by its row indices (inside the CUDA graph when one replays the step).
``Streamed``  rows read from memory-mapped shards (``fastvae.data.open``), a CPU tensor or a
              map-style ``torch.utils.data.Dataset``: each batch is gathered into a ring of host
              buffers (on CUDA by background threads into pinned buffers, copied to the device on a
              side stream, ``prefetch`` batches in flight; on CPU by the training thread itself).
``Loaded``    a ``torch.utils.data.DataLoader``, iterated as given; batches go to the device with
              pinned memory and non_blocking copies.

Batch order. Epoch e of a set of N rows visits ``epoch_order(N, B, seed, e)``: a permutation that is a
function of (seed, epoch) only, cut into batches of B rows, each batch's rows sorted ascending (so a
batch reads each shard in one ascending run, and every source, resident or streamed, builds the
same batches in the same row order: on CPU both train bit-identical parameters). Under torchrun,
rank r of W takes the r-th of the W contiguous parts (``torch.tensor_split``) of every global batch.

The streaming rule (``decide``): stream when the data take more than half of the free memory of the
training device (CUDA: ``torch.cuda.mem_get_info``; CPU: MemAvailable of /proc/meminfo), else
hold them resident; ``TrainConfig.stream`` (CLI ``--stream`` / ``--resident``) forces either.

Host memory while streaming (anonymous, beyond what the process holds without data): the ring,
``prefetch`` x ceil(batch / ranks) x (C*H*W x itemsize + 8) bytes, plus at most 32 x N bytes for N
images (the epoch's order: 8 N held, 16 N more while it is drawn; a shard set's labels: 8 N). The
shards' pages are the kernel's page cache (file-backed, shared, reclaimable), not the process's.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from . import _checks

FRACTION = 0.5  # stream when the data take more than this fraction of the device's free memory
_MASK64 = (1 << 64) - 1


# -- the batch order -------------------------------------------------------------------------------------------------

def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """A random permutation of range(n) (CPU int64) that depends on (seed, epoch) only."""
    g = torch.Generator().manual_seed(_splitmix64((seed & _MASK64) ^ _splitmix64(epoch)))
    return torch.randperm(n, generator=g)


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> torch.Tensor:
    """The rows of epoch `epoch` in visiting order (CPU int64, (n,)): ``permutation`` cut into batches
    of `batch_size`, the rows of each batch sorted ascending."""
    perm = permutation(n, seed, epoch)
    full = n // batch_size * batch_size
    head = perm[:full].view(-1, batch_size).sort(dim=1).values.view(-1)
    return torch.cat([head, perm[full:].sort().values])


def share(size: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank `rank`'s contiguous part of a global batch of `size` rows (torch.tensor_split's cut)."""
    q, r = divmod(size, world)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


def random_seed() -> int:
    """A seed for the data order of a run with seed=None (stored in its checkpoints)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


@dataclass
class Batch:
    """One step's data for this process.

    rows: global indices of this process's rows (on the device for a resident source; None from a
    DataLoader); x: those rows as (b, input_dim) on the device, or None where the step gathers them
    from the resident data (``Resident.pixels``); offset: where this process's rows start in the
    global batch; size: rows in the global batch (all processes); labels: (b,) or None.
    """

    rows: torch.Tensor | None
    x: torch.Tensor | None
    offset: int
    size: int
    labels: torch.Tensor | None = None


# -- the rule --------------------------------------------------------------------------------------------------------

def free_memory(device: torch.device) -> int:
    """Free bytes of the training device: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def decide(nbytes: int, device: torch.device, forced: bool | None) -> tuple[bool, str]:
    """(stream?, why) for a data set of `nbytes` on `device`: forced, else the rule (module docstring)."""
    if forced is not None:
        return forced, "forced by stream=True" if forced else "forced by stream=False"
    free = free_memory(device)
    where = f"free {'device' if device.type == 'cuda' else 'host'} memory"
    if nbytes > FRACTION * free:
        return True, f"{_gib(nbytes)} > {FRACTION:g} x {where} ({_gib(free)})"
    return False, f"{_gib(nbytes)} <= {FRACTION:g} x {where} ({_gib(free)})"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


# -- row readers: gather rows into a host buffer (on a reader thread or the training thread) ----------------------------

def is_shardset(data: Any) -> bool:
    """A ``fastvae.data.open`` set (duck-typed: memory-mapped shards and their offsets)."""
    return hasattr(data, "shards") and hasattr(data, "offsets") and hasattr(data, "shape")


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor viewing a (read-only, memory-mapped) array; fastvae never writes through it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class ArrayRows:
    """Rows of one or more 2-D arrays (memory-mapped shards, or a CPU tensor's numpy view) stacked end to end."""

    def __init__(self, arrays: Sequence[np.ndarray], labels: torch.Tensor | None, sample_shape: tuple[int, ...]) -> None:
        self.arrays = [a.reshape(a.shape[0], -1) for a in arrays]
        self.offsets = np.cumsum([0, *(a.shape[0] for a in self.arrays)]).astype(np.int64)
        self.count = int(self.offsets[-1])
        self.sample_shape = sample_shape
        self.dtype = _tensor(self.arrays[0][:0]).dtype if self.arrays else torch.uint8
        self.labels = None if labels is None else labels.to(torch.int64).numpy()
        self.has_labels = self.labels is not None

    def gather(self, rows: np.ndarray, out: np.ndarray, labels_out: np.ndarray | None) -> None:
        """out[j] = row rows[j] (rows ascending): one np.take per shard run (it releases the GIL)."""
        cuts = np.searchsorted(rows, self.offsets[1:-1]) if len(self.arrays) > 1 else ()
        start = 0
        for s, stop in enumerate([*cuts, len(rows)]):
            if stop > start:
                local = rows[start:stop] - self.offsets[s] if s else rows[start:stop]
                np.take(self.arrays[s], local, axis=0, out=out[start:stop], mode="clip")
            start = stop
        if labels_out is not None:
            np.take(self.labels, rows, out=labels_out, mode="clip")


class DatasetRows:
    """Rows of a map-style ``torch.utils.data.Dataset`` whose items are a tensor or (tensor, label)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.count = len(dataset)
        if self.count == 0:
            raise ValueError("the Dataset is empty (len(dataset) == 0); pass a data set with at least one sample")
        x, label = self.item(0)
        self.sample_shape, self.dtype = tuple(x.shape), x.dtype
        self.has_labels = label is not None  # the items are (tensor, label); gathered where the model is conditional

    def item(self, i: int) -> tuple[torch.Tensor, int | None]:
        got = self.dataset[i]
        label = None
        if isinstance(got, (tuple, list)):
            if len(got) != 2:
                raise TypeError(f"dataset[{i}] returned a {type(got).__name__} of {len(got)} items; a Dataset for fastvae returns "
                                "a tensor or (tensor, label)")
            got, label = got
            if isinstance(label, torch.Tensor) and label.numel() == 1:
                label = label.item()
            if not isinstance(label, (int, np.integer)) or isinstance(label, bool):
                raise TypeError(f"dataset[{i}] returned the label {label!r} ({type(label).__name__}); labels must be class indices (int)")
            label = int(label)
        if isinstance(got, np.ndarray):
            got = torch.from_numpy(got)
        if not isinstance(got, torch.Tensor):
            raise TypeError(f"dataset[{i}] returned {type(got).__name__}; a Dataset for fastvae returns a torch.Tensor (C, H, W) "
                            "(uint8 pixels or floats) or (tensor, label): convert the item in __getitem__ (e.g. torch.from_numpy(np.asarray(img)))")
        if not (got.dtype == torch.uint8 or got.is_floating_point()):
            raise TypeError(f"dataset[{i}] returned a {got.dtype} tensor; return uint8 pixels or floats")
        if got.dim() == 0:
            raise ValueError(f"dataset[{i}] returned a 0-d tensor; return one sample (C, H, W), (H, W) or (D,)")
        return got, label

    def gather(self, rows: np.ndarray, out: np.ndarray, labels_out: np.ndarray | None) -> None:
        target = torch.from_numpy(out)
        for j, r in enumerate(rows.tolist()):
            x, label = self.item(r)
            if tuple(x.shape) != self.sample_shape or x.dtype != self.dtype:
                raise ValueError(f"dataset[{r}] returned {x.dtype} {tuple(x.shape)} but dataset[0] was {self.dtype} {self.sample_shape}; "
                                 "every item must have the same shape and dtype (resize in __getitem__)")
            target[j] = x.reshape(-1)
            if labels_out is not None:
                if label is None:
                    raise ValueError(f"dataset[{r}] returned no label but dataset[0] did; return (tensor, label) for every item")
                labels_out[j] = label


# -- the sources -----------------------------------------------------------------------------------------------------

class _Source:
    """What the sources share: ``batches(epoch, seed)`` iterates an epoch; ``running()`` closes the epoch a step
    left by an exception (its readers stop at once, not when the garbage collector finds the generator)."""

    _epoch: Iterator[Batch] | None = None

    def batches(self, epoch: int, seed: int) -> Iterator[Batch]:
        self._epoch = self._batches(epoch, seed)
        return self._epoch

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        try:
            yield
        finally:
            if self._epoch is not None:
                self._epoch.close()
                self._epoch = None

    def _batches(self, epoch: int, seed: int) -> Iterator[Batch]:
        raise NotImplementedError

    def pixels(self, batch: Batch) -> torch.Tensor:
        """The batch's rows (b, input_dim) on the device."""
        raise NotImplementedError

    def step_input(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a step that gathers its own rows reads (fastvae.mlp_step's C++ op): (the resident data set, the
        batch's indices), or (the batch's rows, None)."""
        return self.pixels(batch), None


class Resident(_Source):
    """The data set as one (N, input_dim) tensor on the device; batches are index tensors into it."""

    resident = True

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None, batch_size: int, sample_shape: tuple[int, ...],
                 rank: int = 0, world: int = 1, why: str = "") -> None:
        self.data, self.labels, self.batch_size, self.rank, self.world = data, labels, batch_size, rank, world
        self.count, self.sample_shape, self.why = data.shape[0], sample_shape, why

    @property
    def steps(self) -> int:
        return math.ceil(self.count / self.batch_size)

    def _batches(self, epoch: int, seed: int) -> Iterator[Batch]:
        order = epoch_order(self.count, self.batch_size, seed, epoch).to(self.data.device)
        for start in range(0, self.count, self.batch_size):
            size = min(self.batch_size, self.count - start)
            lo, hi = share(size, self.rank, self.world)
            rows = order[start + lo:start + hi]
            yield Batch(rows, None, lo, size, self.labels[rows] if self.labels is not None else None)

    def pixels(self, batch: Batch) -> torch.Tensor:
        """The batch's rows (b, input_dim): gathered from the device data (on CPU, index_select is 15x faster than data[rows] for uint8)."""
        return batch.x if batch.x is not None else torch.index_select(self.data, 0, batch.rows)

    def step_input(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (self.data, batch.rows) if batch.x is None else (batch.x, None)

    def describe(self) -> str:
        return f"resident on {self.data.device} ({self.why})" if self.why else f"resident on {self.data.device}"


class Streamed(_Source):
    """Rows read by background threads into a ring of host buffers, copied to the device ahead of the step.

    The ring has `prefetch` slots (rounded up to a multiple of `threads`); batch i goes to slot
    i % prefetch, and reader thread t fills the batches i with i % threads == t, in order. A slot is
    handed over with two plain locks (acquire and release run in C, so the training thread spends
    no Python on a handoff): `filled` (the reader is done) and `free` (the step is done with it),
    released `burst` = prefetch / 2 slots at a time, so a reader wakes once per `burst` steps (each
    wake-up takes a core from the step's own threads on a small CPU).
    On CUDA the host slots are pinned; a batch's copy to its device slot runs on a side stream as
    soon as its rows are gathered (several in flight), the training stream waits on the copy's event
    (no host sync), a device slot is overwritten only after the step that read it (an event the
    side stream waits on) and a host slot only after the copy that read it (the reader waits).
    On CPU the step reads the host slot itself, and by default (threads=0) the training thread
    fills it just before: from the page cache a gather is ~10 us, cheaper than a reader thread
    whose wake-ups take a core from the step's OpenMP threads (2 cores, vs resident: 1.03x
    inline, 0.91-0.98x with 2 readers; benchmarks/stream.py measures both). threads > 0 overlaps disk reads.
    """

    resident = False

    def __init__(self, reader: ArrayRows | DatasetRows, batch_size: int, device: torch.device, *, rank: int = 0, world: int = 1,
                 prefetch: int = 4, threads: int | None = None, why: str = "") -> None:
        if threads is None:
            threads = 2 if device.type == "cuda" else 0
        self.reader, self.batch_size, self.device, self.rank, self.world = reader, batch_size, device, rank, world
        self.count, self.why, self.threads, self.sample_shape = reader.count, why, threads, reader.sample_shape
        self.data = None
        self.labels = None  # per batch, from the reader
        self.prefetch = math.ceil(max(2, prefetch) / max(1, threads)) * max(1, threads)
        width = math.prod(reader.sample_shape)
        rows = math.ceil(batch_size / world)
        cuda = device.type == "cuda"
        self.host = torch.empty((self.prefetch, rows, width), dtype=reader.dtype, pin_memory=cuda)
        self.host_labels = torch.empty((self.prefetch, rows), dtype=torch.int64, pin_memory=cuda) if reader.has_labels else None
        self._host_np = self.host.numpy()
        self._labels_np = self.host_labels.numpy() if self.host_labels is not None else None
        if cuda:
            self.dev = torch.empty((self.prefetch, rows, width), dtype=reader.dtype, device=device)
            self.dev_labels = torch.empty((self.prefetch, rows), dtype=torch.int64, device=device) if self.host_labels is not None else None
            self.side = torch.cuda.Stream(device)
            self.copied = [torch.cuda.Event() for _ in range(self.prefetch)]
            self.freed = [torch.cuda.Event() for _ in range(self.prefetch)]
        self._used = [False] * self.prefetch  # CUDA: the slot went through a copy (and a step) that a refill must wait for
        self.burst = max(1, self.prefetch // 2)

    @property
    def steps(self) -> int:
        return math.ceil(self.count / self.batch_size)

    def nbytes_ring(self) -> int:
        """Host bytes of the ring (the bound in the module docstring, less the order)."""
        n = self.host.numel() * self.host.element_size()
        return n + (self.host_labels.numel() * 8 if self.host_labels is not None else 0)

    def describe(self) -> str:
        why = f", {self.why}" if self.why else ""
        readers = f"{self.threads} reader thread{'s' if self.threads > 1 else ''}" if self.threads else "gathered on the training thread"
        return f"streamed to {self.device} ({self.prefetch} batches in flight, {readers}{why})"

    def _batches(self, epoch: int, seed: int) -> Iterator[Batch]:
        order = epoch_order(self.count, self.batch_size, seed, epoch).numpy()
        cuda, steps, S = self.device.type == "cuda", self.steps, self.prefetch
        plan = []
        for start in range(0, self.count, self.batch_size):
            size = min(self.batch_size, self.count - start)
            lo, hi = share(size, self.rank, self.world)
            plan.append((order[start + lo:start + hi], lo, size))
        filled = [threading.Lock() for _ in range(S)]
        free = [threading.Lock() for _ in range(S)]
        for lock in filled:
            lock.acquire()
        errors: list[BaseException] = []
        stop = threading.Event()
        done: list[int] = []  # slots the steps are done with, handed back `burst` at a time

        def fill(i: int) -> None:
            """Gather batch i's rows into its host slot."""
            slot, rows = i % S, plan[i][0]
            if cuda and self._used[slot]:
                self.copied[slot].synchronize()  # the copy that last read this host slot has finished
            self.reader.gather(rows, self._host_np[slot, :len(rows)], self._labels_np[slot, :len(rows)] if self._labels_np is not None else None)

        def read(t: int) -> None:
            for i in range(t, steps, self.threads):
                slot = i % S
                free[slot].acquire()  # no timeout: a waiting reader costs no wake-ups (the epoch's end releases it)
                if stop.is_set():
                    return
                try:
                    fill(i)
                except BaseException as exc:  # noqa: BLE001 - handed to the training thread, which raises it
                    errors.append(exc)
                    stop.set()
                    filled[slot].release()
                    return
                filled[slot].release()

        def take(i: int) -> None:
            """Batch i's slot, once it is filled (inline: filled here, on the training thread)."""
            if not self.threads:
                fill(i)
                return
            slot = i % S
            while not filled[slot].acquire(timeout=0.05):
                if errors:  # a reader failed (and the others stopped): its error, not a wait for a batch that never comes
                    raise errors[0]
            if errors:
                raise errors[0]

        readers = [threading.Thread(target=read, args=(t,), name=f"fastvae-stream-{t}", daemon=True) for t in range(self.threads)]
        for r in readers:
            r.start()
        issued = 0  # CUDA: batches whose host-to-device copy is enqueued

        def issue(j: int) -> None:
            slot, b = j % S, len(plan[j][0])
            with torch.cuda.stream(self.side):
                if self._used[slot]:
                    self.side.wait_event(self.freed[slot])  # the step that read this device slot has finished
                self.dev[slot, :b].copy_(self.host[slot, :b], non_blocking=True)
                if self.dev_labels is not None:
                    self.dev_labels[slot, :b].copy_(self.host_labels[slot, :b], non_blocking=True)
                self.copied[slot].record(self.side)
            self._used[slot] = True

        try:
            for i in range(steps):
                slot = i % S
                rows, lo, size = plan[i]
                b = len(rows)
                if cuda:
                    if issued == i:
                        take(i)
                        issue(i)
                        issued += 1
                    while self.threads and issued < min(i + S, steps) and filled[issued % S].acquire(blocking=False):
                        if errors:
                            raise errors[0]
                        issue(issued)
                        issued += 1
                    torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
                    x, labels = self.dev[slot, :b], (self.dev_labels[slot, :b] if self.dev_labels is not None else None)
                else:
                    take(i)
                    x, labels = self.host[slot, :b], (self.host_labels[slot, :b] if self.host_labels is not None else None)
                yield Batch(torch.from_numpy(rows), x, lo, size, labels)
                if cuda:
                    self.freed[slot].record(torch.cuda.current_stream(self.device))
                if self.threads:  # inline, the slot is refilled by this thread: nothing to hand back
                    done.append(slot)
                    if len(done) >= self.burst:
                        for s in done:
                            free[s].release()
                        done.clear()
        finally:
            stop.set()
            for lock in free:  # wake the readers waiting for a slot: they see `stop` and return
                try:
                    lock.release()
                except RuntimeError:  # not held
                    pass
            for r in readers:
                r.join()  # no reader writes a slot after the epoch ends

    def pixels(self, batch: Batch) -> torch.Tensor:
        return batch.x

    def head(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first n rows (n, input_dim) and their labels (or None) on the device (pictures of the inputs)."""
        rows = np.arange(min(n, self.count), dtype=np.int64)
        out = np.empty((len(rows), self.host.shape[2]), dtype=self._host_np.dtype)
        labels = np.empty(len(rows), dtype=np.int64) if self.reader.has_labels else None
        self.reader.gather(rows, out, labels)
        return torch.from_numpy(out).to(self.device), torch.from_numpy(labels).to(self.device) if labels is not None else None


class Loaded(_Source):
    """A user's DataLoader, iterated as given (its sampler, its batch size, its workers) each epoch."""

    resident = False
    data = labels = None

    def __init__(self, loader: Any, device: torch.device, input_dim: int, with_labels: bool) -> None:
        self.loader, self.device, self.input_dim, self.with_labels = loader, device, input_dim, with_labels
        try:
            self._steps = len(loader)
        except TypeError:
            self._steps = None
        if self._steps == 0:
            raise ValueError("the DataLoader yields no batches (len(loader) == 0); give it a non-empty data set "
                             "(with drop_last=True it needs at least batch_size samples)")
        self.batch_size = loader.batch_size
        self.count = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None
        self.sample_shape: tuple[int, ...] | None = None  # known from the first batch

    @property
    def steps(self) -> int | None:
        return self._steps

    def describe(self) -> str:
        pinned = "pinned by the loader" if getattr(self.loader, "pin_memory", False) else "pinned here" if self.device.type == "cuda" else "CPU"
        return f"a DataLoader ({self.loader.num_workers} workers, {pinned}) to {self.device}"

    def _batches(self, epoch: int, seed: int) -> Iterator[Batch]:
        sampler = getattr(self.loader, "sampler", None)
        for s in (sampler, getattr(self.loader, "batch_sampler", None)):
            if hasattr(s, "set_epoch"):
                s.set_epoch(epoch)  # DistributedSampler's shuffle follows the epoch
        cuda, n = self.device.type == "cuda", 0
        for i, item in enumerate(self.loader):
            what = f"batch {i} of the DataLoader"
            x, labels = split_item(item, what)
            if x.dim() < 2 or math.prod(x.shape[1:]) != self.input_dim:
                raise ValueError(f"{what} has shape {tuple(x.shape)}: not (B, ...) with input_dim={self.input_dim} "
                                 "values per sample; build the model for the loader's samples")
            if not self.with_labels:
                labels = None
            elif not isinstance(labels, torch.Tensor):
                raise TypeError(f"{what}: the model is conditional but the labels are {type(labels).__name__}, not a tensor; "
                                "yield (images, labels tensor)")
            moved = []
            for t in (x, labels):
                if t is not None and cuda and t.device.type == "cpu" and not t.is_pinned():
                    t = t.pin_memory()  # so the copy below is asynchronous
                moved.append(t.to(self.device, non_blocking=True) if t is not None else None)
            x, labels = moved
            n += 1
            self.sample_shape = tuple(x.shape[1:])
            yield Batch(None, x.reshape(x.shape[0], -1), 0, x.shape[0], labels)
        if n == 0:
            raise ValueError("the DataLoader yielded no batches this epoch; give it a non-empty data set")

    def pixels(self, batch: Batch) -> torch.Tensor:
        return batch.x


def split_item(item: Any, what: str) -> tuple[torch.Tensor, Any]:
    """(x, labels or None) of a DataLoader batch: a tensor, or (tensor, labels, ...) as torchvision's data sets give."""
    labels = None
    if isinstance(item, (tuple, list)):
        if not item:
            raise TypeError(f"{what} is an empty {type(item).__name__}; yield a tensor or (tensor, labels)")
        item, labels = item[0], (item[1] if len(item) > 1 else None)
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"{what} is {type(item).__name__}; a DataLoader for fastvae yields tensors (B, ...) or (tensor, labels)")
    if not (item.dtype == torch.uint8 or item.is_floating_point()):
        raise TypeError(f"{what} is a {item.dtype} tensor; yield uint8 pixels or floats")
    return item, labels


# -- what the Trainer calls ------------------------------------------------------------------------------------------

def sample_shape(data: Any) -> tuple[int, ...]:
    """One sample's shape: (C, H, W) of a shard set, a tensor's shape[1:]."""
    return tuple(int(s) for s in data.shape) if is_shardset(data) else tuple(data.shape[1:])


def image_shape(shape: Sequence[int]) -> tuple[int, int, int] | None:
    """(C, H, W) of a sample shape that is an image ((H, W) or (C, H, W) with C in 1, 3, 4), else None."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 3 and shape[0] in (1, 3, 4):
        return shape
    return None


def source(data: Any, *, input_dim: int, likelihood: str, batch_size: int, device: torch.device, stream: bool | None,
           labels: torch.Tensor | None, conditional: bool, rank: int = 0, world: int = 1, prefetch: int = 4, threads: int | None = None
           ) -> Resident | Streamed | Loaded:
    """The batch source for `data` (a tensor, a shard set, a Dataset or a DataLoader), after its checks."""
    from torch.utils.data import DataLoader, Dataset

    def fits_model(shape: tuple[int, ...], what: str) -> None:
        if math.prod(shape) != input_dim:
            raise ValueError(f"{what} has samples of shape {shape} ({math.prod(shape)} values) but the model's input_dim is {input_dim}; "
                             f"build the model for these samples (input_dim={math.prod(shape)}, or ConvVAE(image_shape={shape}))")

    if isinstance(data, np.ndarray):
        data = _tensor(data)  # a (memory-mapped) array is read as a tensor, without a copy
    if isinstance(data, DataLoader):
        if world > 1:
            raise ValueError("a DataLoader cannot be split into the ranks' shares under torchrun; pass its Dataset (each rank then "
                             "streams its share of every batch) or a shard set from fastvae.data.open")
        if labels is not None:
            raise ValueError("labels= goes with a tensor of images; a DataLoader's labels come from its batches (tensor, labels)")
        if stream is False:
            raise ValueError("stream=False (resident) needs the data as a tensor or a shard set; a DataLoader is iterated as given")
        return Loaded(data, device, input_dim, conditional)
    if isinstance(data, torch.Tensor) or is_shardset(data):
        shardset = is_shardset(data)
        if isinstance(data, torch.Tensor):
            if data.dim() < 2 or data.shape[0] == 0:
                raise ValueError(f"images must be a non-empty batch (N, ...), got shape {tuple(data.shape)}")
            fits_model(tuple(data.shape[1:]), "images")
            nbytes = data.numel() * data.element_size()
            on_device = data.device == device
        else:
            if len(data) == 0:
                raise ValueError(f"{data.path}: the shard set holds no images; prepare a folder that holds some")
            fits_model(tuple(data.shape), str(data.path))
            nbytes, on_device = data.nbytes, False
        if labels is not None and shardset:
            raise ValueError("labels= goes with a tensor of images; a shard set carries its own labels (from its sub-folder names)")
        if shardset and conditional:
            if data.labels is None:
                raise ValueError(f"{data.path} has no labels but the model is conditional; prepare a folder with one sub-folder per class")
            labels = data.labels
        if conditional and labels is None:
            raise ValueError("the model is conditional: pass labels=... (one per image) to the Trainer")
        streaming, why = (False, "already on the device") if on_device and stream is None else decide(nbytes, device, stream)
        if not streaming:
            images = _load(data, device) if shardset else prepare_data(data, input_dim, likelihood).to(device)
            return Resident(images, labels.to(device) if labels is not None else None, batch_size, sample_shape(data), rank, world, why)
        if shardset:
            reader = ArrayRows(data.shards, labels, tuple(data.shape))
        else:
            if data.device.type != "cpu":
                raise ValueError(f"stream=True streams from host memory; the images are on {data.device}: pass them on the CPU or use stream=False")
            if labels is not None and (labels.is_floating_point() or labels.dim() != 1):
                raise ValueError("streamed labels must be class indices (N,); pass condition vectors with stream=False")
            flat = prepare_data(data, input_dim, likelihood)
            reader = ArrayRows([flat.contiguous().numpy()], labels, tuple(data.shape[1:]))
        return Streamed(reader, batch_size, device, rank=rank, world=world, prefetch=prefetch, threads=threads, why=why)
    if isinstance(data, (Dataset, Sequence)) and not isinstance(data, (str, bytes)):
        if labels is not None:
            raise ValueError("labels= goes with a tensor of images; a Dataset's labels come from its items (tensor, label)")
        if stream is False:
            raise ValueError("stream=False (resident) needs the data as a tensor or a shard set; a Dataset is read item by item each epoch")
        reader = DatasetRows(data)
        fits_model(reader.sample_shape, "the Dataset")
        if conditional and not reader.has_labels:
            raise ValueError("the model is conditional but the Dataset's items carry no label; return (tensor, label) from __getitem__")
        reader.has_labels = conditional
        return Streamed(reader, batch_size, device, rank=rank, world=world, prefetch=prefetch, threads=threads, why="a Dataset, read each epoch")
    raise TypeError(f"data must be a torch.Tensor of images, a shard set (fastvae.data.open), a torch.utils.data.Dataset or a DataLoader; "
                    f"got {type(data).__name__}")


def prepare_data(images: torch.Tensor, input_dim: int, likelihood: str) -> torch.Tensor:
    """Validate a dataset once and flatten it to (N, input_dim), keeping uint8 as uint8."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() < 2 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch (N, ...), got shape {tuple(images.shape)}")
    if math.prod(images.shape[1:]) != input_dim:
        raise ValueError(f"images have {math.prod(images.shape[1:])} features per sample but the model's input_dim is {input_dim}; build the model with input_dim={math.prod(images.shape[1:])}")
    flat = images.reshape(images.shape[0], input_dim)
    if flat.dtype == torch.uint8:
        return flat
    _checks.floating("images", flat)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("images contain NaN or Inf; clean the data before training")
    if likelihood == "bernoulli" and bool(((flat < 0) | (flat > 1)).any()):
        raise ValueError("images must lie in [0, 1] for the Bernoulli likelihood; rescale them or use likelihood='gaussian'")
    return flat


def _load(data: Any, device: torch.device) -> torch.Tensor:
    """A shard set as one (N, C*H*W) uint8 tensor on `device`, shard by shard (no whole host copy for CUDA)."""
    width = math.prod(data.shape)
    if device.type == "cpu":
        return data.tensor().reshape(len(data), width)
    out = torch.empty((len(data), width), dtype=torch.uint8, device=device)
    for s, shard in enumerate(data.shards):
        out[int(data.offsets[s]):int(data.offsets[s + 1])].copy_(_tensor(shard).reshape(-1, width))
    return out


@dataclass
class ShardView:
    """The first `count` images of a shard set, read like one (``first``): the same memory maps, cut."""

    path: Any
    shape: tuple[int, int, int]
    shards: list
    offsets: np.ndarray
    labels: torch.Tensor | None
    label_names: list[str] | None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def count(self) -> int:
        return len(self)

    @property
    def nbytes(self) -> int:
        return len(self) * math.prod(self.shape)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, labels = next(in_order(self, 1, start=i))
        return x[0], int(labels[0]) if labels is not None else -1

    def tensor(self) -> torch.Tensor:
        return torch.cat([_tensor(s) for s in self.shards]) if self.shards else torch.empty(0, *self.shape, dtype=torch.uint8)


def first(data: Any, n: int) -> Any:
    """The first `n` images of a shard set (all if it holds fewer), without reading them."""
    if n >= len(data):
        return data
    shards, offsets = [], [0]
    for s, shard in enumerate(data.shards):
        take = min(shard.shape[0], n - offsets[-1])
        if take <= 0:
            break
        shards.append(shard[:take])
        offsets.append(offsets[-1] + take)
    return ShardView(data.path, tuple(data.shape), shards, np.asarray(offsets, dtype=np.int64),
                     data.labels[:n] if data.labels is not None else None, data.label_names)


# -- reading a data set in order (score, reconstruct, pictures, fit's first batch) ------------------------------------

def head(data: Any, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first `n` samples (fewer if the set is smaller) as a tensor of their shape, and their labels or None."""
    for x, labels in in_order(data, n):
        return x, labels
    raise ValueError("the data set is empty")


def in_order(data: Any, batch_size: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(x, labels or None) batches of `data` (tensor, shard set, Dataset or DataLoader) from row `start`
    (a DataLoader: from its start), CPU tensors of the samples' shape."""
    from torch.utils.data import DataLoader

    if isinstance(data, (torch.Tensor, np.ndarray)):
        for start in range(start, data.shape[0], batch_size):
            yield torch.as_tensor(data[start:start + batch_size]), None
    elif is_shardset(data):
        reader = ArrayRows(data.shards, data.labels, tuple(data.shape))
        for start in range(start, reader.count, batch_size):
            rows = np.arange(start, min(start + batch_size, reader.count), dtype=np.int64)
            out = np.empty((len(rows), math.prod(data.shape)), dtype=np.uint8)
            labels = np.empty(len(rows), dtype=np.int64) if reader.has_labels else None
            reader.gather(rows, out, labels)
            yield torch.from_numpy(out).view(len(rows), *data.shape), torch.from_numpy(labels) if labels is not None else None
    elif isinstance(data, DataLoader):
        for i, item in enumerate(data):
            x, labels = split_item(item, f"batch {i} of the DataLoader")
            yield x, labels if isinstance(labels, torch.Tensor) else None
    else:
        reader = DatasetRows(data)
        for start in range(start, reader.count, batch_size):
            rows = np.arange(start, min(start + batch_size, reader.count), dtype=np.int64)
            out = np.empty((len(rows), math.prod(reader.sample_shape)), dtype=torch.empty(0, dtype=reader.dtype).numpy().dtype)
            labels = np.empty(len(rows), dtype=np.int64) if reader.has_labels else None
            reader.gather(rows, out, labels)
            yield torch.from_numpy(out).view(len(rows), *reader.sample_shape), torch.from_numpy(labels) if labels is not None else None


def describe_shape(shape: Sequence[int] | None) -> dict[str, list[int] | None]:
    """What a checkpoint stores of its data ("data"): one sample's shape and, for images, (C, H, W)."""
    if shape is None:
        return {"shape": None, "image_shape": None}
    image = image_shape(shape)
    return {"shape": [int(s) for s in shape], "image_shape": list(image) if image is not None else None}
