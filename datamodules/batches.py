"""Making the ActivationDataModule's batches: float16 batch memory that is reused, and token batches gathered
from references into the maps (one copy per token, out of the page cache for local shards)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator

import numpy as np
import torch


class BatchBuffers:
    """Float16 batch memory, filled again once nothing uses the batch it last held.

    Fresh memory for every batch (10 MB at SD1.5 size) is page-faulted in again, 4 KiB at a time, whenever the
    allocator has handed the last batch's memory back to the system (glibc does, for blocks above its mmap
    threshold), and that costs about as much as filling it; reused memory stays mapped. A batch is handed out as
    `torch.from_numpy` of a view of a kept array: every tensor, view or numpy array made from the batch keeps that
    view alive, so a weak reference to it tells when the consumer has let go, and only then is the array filled
    again. A consumer that keeps its batches (a list of them, a prefetching loop) gets fresh memory beyond the
    `keep` arrays.

    In a DataLoader worker the batch is made in shared memory, where it must go anyway: sending it to the main
    process then passes a handle instead of copying it (`share_memory_()` would copy the bytes over). Those are
    not reused: the main process owns them.
    """

    def __init__(self, keep: int = 4):
        self.keep = keep
        """Arrays kept for reuse: a batch in the training step, one prefetched and the one being filled."""
        self.kept: list[tuple[np.ndarray, weakref.ref]] = []  # (array, weak reference to its handed-out view)

    def take(self, *shape: int) -> torch.Tensor:
        """An uninitialised float16 batch of `shape` that no earlier batch still in use shares memory with."""
        if torch.utils.data.get_worker_info() is not None:
            # the allocation torch's own `default_collate` makes in workers; 2 bytes per float16
            storage = torch.UntypedStorage._new_shared(math.prod(shape) * 2)
            return torch.empty(0, dtype=torch.float16).set_(storage, 0, shape)
        for index, (array, handed_out) in enumerate(self.kept):
            if array.shape == shape and handed_out() is None:
                del self.kept[index]  # appended again below: the list runs from least to most recently handed out
                break
        else:
            array = np.empty(shape, np.float16)
            if len(self.kept) == self.keep:  # the shape changed, or the consumer holds every kept batch
                del self.kept[0]
        view = array.view()  # [*shape]; what the handed-out batch keeps alive
        self.kept.append((array, weakref.ref(view)))
        return torch.from_numpy(view)


class TokenPool:
    """Tokens of a stream of maps `[N, d]`, handled as references (map number, row) until a batch is gathered.

    Holding references rather than token data means a token's bytes are copied once, from its map (for a local
    shard a view of the page cache) into the batch; a pool of token data would copy them twice more (into the pool,
    then out of it).
    """

    def __init__(self, maps: Iterator[np.ndarray], width: int):
        self.maps, self.width = maps, width
        self.held: dict[int, np.ndarray] = {}  # the maps references may point to, by number in the stream
        self.drawn = 0  # maps taken from the stream; the last one's rows are handed out next
        self.next_row = 0
        self.buffers = BatchBuffers()

    def fill(self, map_ids: np.ndarray, rows: np.ndarray) -> int:
        """Write references to the next tokens into `map_ids` and `rows` (views of the pool's free slots); returns
        how many were written: all, or fewer when the stream ends."""
        written = 0
        while written < len(rows):
            if self.drawn == 0 or self.next_row == len(self.held[self.drawn]):
                next_map = next(self.maps, None)
                if next_map is None:
                    break
                self.drawn, self.next_row = self.drawn + 1, 0
                self.held[self.drawn] = next_map
            count = min(len(rows) - written, len(self.held[self.drawn]) - self.next_row)
            map_ids[written:written + count] = self.drawn
            rows[written:written + count] = np.arange(self.next_row, self.next_row + count)
            written, self.next_row = written + count, self.next_row + count
        return written

    def gather(self, map_ids: np.ndarray, rows: np.ndarray) -> dict:
        """The batch `{act: [B, d]}` of the referenced tokens, ordered by map and row (the order inside a batch is
        free: the losses are batch means), so that each map gives its rows with one `np.take`."""
        references = np.sort((map_ids << 32) | rows)  # [B]; rows < 2³²
        map_ids, rows = references >> 32, references & 0xFFFFFFFF
        act = self.buffers.take(len(rows), self.width)  # [B, d]
        out = act.numpy()
        starts = np.flatnonzero(np.diff(map_ids, prepend=-1)).tolist()
        for start, end, map_id in zip(starts, [*starts[1:], len(rows)], map_ids[starts].tolist()):
            # "clip" writes to `out` unbuffered, twice as fast as the default; the rows are valid
            self.held[map_id].take(rows[start:end], axis=0, out=out[start:end], mode="clip")
        return {"act": act}

    def release(self, map_ids: np.ndarray) -> None:
        """Let go of the maps that no reference in `map_ids` points to (but the one being handed out)."""
        oldest = min(self.held)
        referenced = np.bincount(map_ids - oldest, minlength=self.drawn - oldest + 1)  # [maps held or let go]
        for map_id in [map_id for map_id in self.held if map_id != self.drawn and not referenced[map_id - oldest]]:
            del self.held[map_id]


def token_batches(samples: Iterator[dict], batch_size: int, width: int, buffer: int,
                  rng: np.random.Generator | None, partial_batches: bool) -> Iterator[dict]:
    """Batches of `batch_size` single tokens from the samples' maps.

    With `rng`, the stream is cut into chunks of `buffer` tokens (at least one batch), each dealt out in a random
    order: every batch is a uniform draw from its chunk. A batch then takes about `batch_size / buffer` of each
    map's tokens in the chunk, which it copies in long runs; a sliding pool (each batch drawn from the pool and
    replaced by the next tokens) leaves stragglers of 3.5 times as many maps in each batch (at SD1.5 size), and
    copying single rows from that many places was 1.4 times slower. The tokens a chunk leaves over (less than a
    batch) start the next one. Without `rng`, tokens come in stream order. The stream's last tokens end in one
    partial batch when `partial_batches`.
    """
    tokens = TokenPool((sample["act"] for sample in samples), width)
    size = batch_size if rng is None else max(buffer, batch_size)
    map_ids, rows = np.zeros(size, np.int64), np.zeros(size, np.int64)  # [P] each: the chunk's references
    held = 0
    while True:
        filled = tokens.fill(map_ids[held:], rows[held:])
        held += filled
        order = np.arange(held) if rng is None else rng.permutation(held)  # [held]
        dealt = held - held % batch_size
        for start in range(0, dealt, batch_size):
            chosen = order[start:start + batch_size]
            yield tokens.gather(map_ids[chosen], rows[chosen])
        left = order[dealt:]
        if held < size:  # the stream ended
            if partial_batches and len(left) > 0:
                yield tokens.gather(map_ids[left], rows[left])
            return
        map_ids[:len(left)], rows[:len(left)], held = map_ids[left], rows[left], len(left)
        tokens.release(map_ids[:held])


def collate_samples(samples: list[dict], buffers: BatchBuffers) -> dict:
    """Labelled maps → the batch `{act [B, N, d], object, style, step, key}`, its activations in `buffers`."""
    act = buffers.take(len(samples), *samples[0]["act"].shape)  # [B, N, d]
    np.stack([sample["act"] for sample in samples], out=act.numpy())
    return {"act": act,
            "object": torch.tensor([s["object"] for s in samples], dtype=torch.int64),
            "style": torch.tensor([s["style"] for s in samples], dtype=torch.int64),
            "step": torch.tensor([s["step"] for s in samples], dtype=torch.int64),
            "key": [s["key"] for s in samples]}
