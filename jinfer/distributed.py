"""Multi-host runs with JAX's multi-controller runtime: every process runs the same program on
its own devices, `jax.distributed` connects them, and a mesh spans all of their devices.

    jinfer.distributed.initialize()  # before anything else touches JAX
    model = jinfer.load_model(..., mesh={"data": 1, "model": -1})  # every device of every host

On Cloud TPU VMs (and other clusters JAX detects: SLURM, GKE) `initialize()` needs no
arguments. Elsewhere pass the coordinator (process 0's host:port), the number of processes and
this process's id; on CPUs collectives between processes go through gloo. Every jinfer command
takes them as --coordinator_address, --num_processes and --process_id, and only process 0 prints.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np

from jinfer import validation
from jinfer.validation import check_request


def _in_detected_cluster() -> bool:
  """A multi-host environment jax.distributed.initialize() configures by itself."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1")) if "SLURM_JOB_ID" in os.environ else 1
  return "," in hosts or slurm_tasks > 1


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Joins this process to a multi-process run (call it first, once).

  With no arguments: on a detected multi-host cluster (a TPU pod slice, SLURM) JAX finds the
  coordinator itself; on one host nothing happens. Otherwise give all three.
  """
  given = [a is not None for a in (coordinator_address, num_processes, process_id)]
  if not any(given):
    if _in_detected_cluster():
      jax.distributed.initialize()
    return
  check_request(all(given), "coordinator_address, num_processes and process_id go together: "
                "pass all three (e.g. '10.0.0.1:1234', 2, 0), or none on a TPU VM.")
  validation.text("coordinator_address", coordinator_address)
  check_request(":" in coordinator_address,
                f"coordinator_address must be host:port, got {coordinator_address!r}.")
  num_processes = validation.integer("num_processes", num_processes, low=1)
  process_id = validation.integer("process_id", process_id, low=0, high=num_processes - 1)
  if jax.config.jax_platforms in (None, "", "cpu"):
    # Collectives between CPU processes (XLA's default CPU collectives are in-process only).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def is_main_process() -> bool:
  """Whether this process is the one that prints and writes results (process 0)."""
  return jax.process_index() == 0


def random_seed() -> int:
  """A random sampling seed for a request without one, the same in every process (each process
  runs the same program, so their shards must sample alike): process 0 draws, the others
  receive it."""
  seed = int(np.random.randint(0, 2**31))
  if jax.process_count() == 1:
    return seed
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(multihost_utils.broadcast_one_to_all(np.int32(seed)))
