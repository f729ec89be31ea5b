"""`DataParallelEngine`: serving over a mesh's data axis, as vLLM's data-parallel engine cores
and JetStream's replicas do: one `Engine` per data row of the mesh, each tensor parallel over
its row's model axis with its own slots, KV pool and scheduler, and a router in front.

Replicas share nothing while they decode, so no step waits on another row's collectives; each
request goes to the replica with the fewest unfinished sequences. `step()` steps the replicas
in threads (JAX releases the GIL while a program runs, so their device work overlaps). The API
is `Engine`'s, so `LLM` and a server drive either. One process only for now (a multi-host data
axis would give each process its own replicas).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
from typing import AsyncIterator, Optional

import jax
import numpy as np

from jinfer import sharding
from jinfer.decoding.sampling import SamplingParams
from jinfer.engine.engine import Engine, RequestOutput
from jinfer.validation import Prompt, check_request


def row_meshes(mesh: jax.sharding.Mesh) -> list[jax.sharding.Mesh]:
  """The 1 x model sub-mesh of each data row of `mesh`."""
  devices = np.asarray(mesh.devices)
  return [sharding.make_mesh(jax.sharding.Mesh(devices[i:i + 1], sharding.MESH_AXES,
                                               axis_types=mesh.axis_types))
          for i in range(devices.shape[0])]


class DataParallelEngine:
  """`Engine`'s API over one engine per data row of `model.mesh` (engine settings are each
  replica's: `max_num_seqs` slots per replica)."""

  def __init__(self, model, **engine_kwargs):
    check_request(model.mesh is not None, "DataParallelEngine needs a model sharded over a mesh "
                  "(load_model(..., mesh={'data': 2, 'model': -1})); use Engine otherwise.")
    self.model = model
    self.replicas = [Engine(model.shard(row), **engine_kwargs) for row in row_meshes(model.mesh)]
    self._owner: dict[str, Engine] = {}
    self._remaining: dict[str, int] = {}  # sequences of a request not finished yet
    self._ids = itertools.count()
    self._lock = threading.Lock()
    self._threads = concurrent.futures.ThreadPoolExecutor(len(self.replicas),
                                                          thread_name_prefix="jinfer-replica")

  def add_request(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                  request_id: Optional[str] = None) -> str:
    """Queues a request on the least-loaded replica; returns its id."""
    with self._lock:
      if request_id is None:
        request_id = f"req-{next(self._ids)}"
      check_request(isinstance(request_id, str) and request_id not in self._owner,
                    f"request_id {request_id!r} must be a new string.")
      replica = self._least_loaded()
      replica.add_request(prompt, params, request_id)
      self._owner[request_id] = replica
      self._remaining[request_id] = (params or SamplingParams()).n
    return request_id

  def abort(self, request_id: str) -> None:
    """Aborts `request_id` on the replica that holds it (an unknown id is ignored)."""
    replica = self._owner.get(request_id)
    if replica is not None:
      replica.abort(request_id)

  def has_unfinished(self) -> bool:
    """Whether any replica still has requests to run."""
    return any(r.has_unfinished() for r in self.replicas)

  def step(self) -> list[RequestOutput]:
    """One step of every replica with work, at once; their outputs together."""
    busy = [r for r in self.replicas if r.has_unfinished()]
    outputs = [out for outs in self._threads.map(lambda r: r.step(), busy) for out in outs]
    with self._lock:
      for out in outputs:
        if out.finish_reason is not None and out.request_id in self._remaining:
          self._remaining[out.request_id] -= 1
          if not self._remaining[out.request_id]:
            del self._remaining[out.request_id], self._owner[out.request_id]
    return outputs

  async def stream(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                   request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
    """`Engine.stream` on the least-loaded replica (which then steps itself); `abort` reaches
    it by its id."""
    with self._lock:
      if request_id is None:
        request_id = f"req-{next(self._ids)}"
      check_request(isinstance(request_id, str) and request_id not in self._owner,
                    f"request_id {request_id!r} must be a new string.")
      replica = self._owner[request_id] = self._least_loaded()
    try:
      async for out in replica.stream(prompt, params, request_id):
        yield out
    finally:
      with self._lock:
        self._owner.pop(request_id, None)

  def _least_loaded(self) -> Engine:
    def load(replica: Engine) -> int:
      m = replica.metrics()
      return m["num_running"] + m["num_waiting"]
    return min(self.replicas, key=load)

  def warmup(self) -> float:
    """Compiles every replica's programs (in parallel); returns the seconds it took."""
    return max(self._threads.map(lambda r: r.warmup(), self.replicas))

  def slots(self) -> dict[tuple[str, int], tuple[int, int]]:
    """(replica, slot) of each sequence that holds a slot, keyed by (request_id, index)."""
    return {key: (i, slot) for i, r in enumerate(self.replicas) for key, slot in r.slots().items()}

  def metrics(self) -> dict:
    """Every replica's metrics summed (pages and counts), with the per-replica dicts under
    'replicas'; the prefix-cache hit rate is their mean."""
    each = [r.metrics() for r in self.replicas]
    total = {k: sum(m[k] for m in each) for k in each[0] if k != "prefix_cache_hit_rate"}
    total["prefix_cache_hit_rate"] = float(np.mean([m["prefix_cache_hit_rate"] for m in each]))
    return {**total, "replicas": each}
