"""Which process of a multi-process job this one is, known before any Trainer exists.

Ranks come from the cluster environments Lightning chooses among (torchrun, SLURM, LSF, MPI), or,
without one, from the variables Lightning's own launcher gives the processes it starts for
`trainer.devices` > 1. Only the job's global rank 0 surveys, resolves and writes; the others read
what it wrote. Processes that start together (torchrun, srun, nodes started by hand) share the run
named by `--run` or by their scheduler's job id; processes Lightning starts later inherit the run
from rank 0 through `RUN_VARIABLE`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Iterator

from lightning.fabric.plugins.environments import (
    ClusterEnvironment,
    LSFEnvironment,
    MPIEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

from labelcomp.errors import LabelcompError

_logger = logging.getLogger(__name__)

RUN_VARIABLE = "LABELCOMP_RUN"
WAIT_SECONDS = 3600  # for rank 0 to survey, resolve and write the run's files


def cluster_environment() -> ClusterEnvironment | None:
    """The cluster environment Lightning's Trainer will detect, in its order; None outside one."""
    for environment in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        if environment.detect():
            return environment()
    return None


def is_global_zero() -> bool:
    environment = cluster_environment()
    if environment is not None:
        return environment.global_rank() == 0
    # Lightning's launcher sets LOCAL_RANK for the processes it starts; other nodes are started by
    # hand with NODE_RANK (GROUP_RANK in torch's naming)
    return all(os.environ.get(key, "0") == "0" for key in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK"))


def job_run_id(experiment: str) -> str | None:
    """A run id that every process of this job derives alike from its scheduler, or None: a SLURM
    array's tasks share their array's run, a multi-process SLURM job or a torchrun rendezvous its own."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{experiment}-array{array}"
    environment = cluster_environment()
    if environment is None or environment.world_size() <= 1:
        return None
    if isinstance(environment, SLURMEnvironment):
        return f"{experiment}-slurm{environment.job_id()}"
    rendezvous = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return None if rendezvous == "none" else f"{experiment}-{rendezvous[:8]}"


def shared_run_id(experiment: str, run_id: str | None) -> str | None:
    """The run this process works on: the one named, the one rank 0 passed down, or the job's."""
    run_id = run_id or os.environ.get(RUN_VARIABLE) or job_run_id(experiment)
    if run_id is None and not is_global_zero():
        raise LabelcompError(
            "this process is one of several started together (torchrun, srun or another node) and cannot "
            "tell which run they share; name it with --run NAME on every process"
        )
    return run_id


@contextlib.contextmanager
def passed_down(run_id: str) -> Iterator[None]:
    """Within the block, processes that Lightning's launcher starts join run `run_id`."""
    before = os.environ.get(RUN_VARIABLE)
    os.environ[RUN_VARIABLE] = run_id
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(RUN_VARIABLE, None)
        else:
            os.environ[RUN_VARIABLE] = before


def wait_for(path: Path, seconds: float = WAIT_SECONDS) -> None:
    """Until rank 0 has written `path` (it writes atomically)."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise LabelcompError(f"{path}: not written by rank 0 within {seconds:.0f} s; did it stop? see its output")
        time.sleep(0.5)


def array_fold() -> int:
    """The fold of a scheduler's array task (`--folds array`): SLURM_ARRAY_TASK_ID."""
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is None or not task.isdigit():
        raise LabelcompError(
            f"--folds array: SLURM_ARRAY_TASK_ID is {task!r}; submit the job as an array, e.g. sbatch --array=0-4, "
            "or name the folds, e.g. --folds 0,1"
        )
    return int(task)
