"""Where the cells of a study run: here, one after another (local); as Ray tasks on this
machine or a Ray cluster (ray); or as a SLURM job array through submitit (slurm).

An executor takes the cells to run and yields each finished cell's results row as soon as it
is done, in whatever order they finish; the driver (runner.py) alone writes results.csv and
the reports. Distribution is the engine's job: Ray places tasks by their resources and
retries a task whose worker died; submitit submits and watches the job array, and the
executor resubmits a failed job. A retried cell resumes from its last epoch checkpoint, so a
lost worker costs at most one epoch of one cell.

Requirement for ray and slurm: the run folder is on storage that every worker reaches
(a shared filesystem; on one machine, any local folder).

    >>> from tempsoft.study.executors import make_executor
    >>> executor = make_executor("ray", address=None, cpus_per_cell=2)
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

from tempsoft.study.cell import CellTask, run_cell

EXECUTORS = ("local", "ray", "slurm")
Log = Callable[[str], None]
Finished = Iterator[tuple[CellTask, dict]]
# Environment variables a remote worker needs to find data and caches as the driver does.
_FORWARDED_ENV = ("TEMPSOFT_DATA_DIR", "TEMPSOFT_CACHE_DIR", "TEMPSOFT_BACKEND",
                  "TEMPSOFT_DEFERRED_CHECKS", "TRITON_INTERPRET")


def _forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}


def _default_gpus(tasks: list[CellTask]) -> float:
    """One GPU per cell when cells run on CUDA, else none."""
    import torch

    wants = {t.device or t.preset.train.get("device", "auto") for t in tasks}
    cuda = any(str(d).startswith("cuda") for d in wants) or (
        "auto" in wants and torch.cuda.is_available())
    return 1.0 if cuda else 0.0


# --------------------------------------------------------------------------------------
# local
# --------------------------------------------------------------------------------------
@dataclass
class LocalExecutor:
    """Every cell in this process, one after another (under torchrun, every rank runs every
    cell together: DDP splits each cell's batches)."""

    def run(self, tasks: list[CellTask], log: Log) -> Finished:
        from tempsoft.train import distributed_info

        dist_info = distributed_info()
        for task in tasks:
            row = run_cell(task, log)
            yield task, row
            if dist_info.active:
                import torch.distributed as dist

                dist.barrier()


# --------------------------------------------------------------------------------------
# ray
# --------------------------------------------------------------------------------------
def _run_cell_in_worker(task: CellTask) -> dict:
    # A Ray worker's stdout reaches the driver's console, one line per epoch and evaluation.
    return run_cell(task, lambda msg: print(msg, flush=True))


@dataclass
class RayExecutor:
    """Each cell a Ray task with its resources: ``gpus_per_cell`` GPUs (default 1 when the
    cells run on CUDA) and ``cpus_per_cell`` CPUs (default: the preset's run.threads, at
    least 1). Without ``address`` Ray starts on this machine and uses all of it (a 4-GPU box
    runs 4 cells at once); with one, it joins that cluster. A task whose worker dies is
    retried ``max_retries`` times and resumes from the cell's checkpoint."""

    address: Optional[str] = None
    cpus_per_cell: Optional[float] = None
    gpus_per_cell: Optional[float] = None
    max_retries: int = 2

    def run(self, tasks: list[CellTask], log: Log) -> Finished:
        try:
            import ray
        except ImportError:
            raise ImportError("the ray executor needs Ray: pip install 'tempsoft[ray]' "
                              "(or pip install ray)") from None
        if not tasks:
            return
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": _forwarded_env()}, logging_level="WARNING")
        try:
            cpus = self.cpus_per_cell or max(1, tasks[0].preset.run["threads"])
            gpus = self.gpus_per_cell if self.gpus_per_cell is not None else \
                _default_gpus(tasks)
            remote = ray.remote(num_cpus=cpus, num_gpus=gpus,
                                max_retries=self.max_retries)(_run_cell_in_worker)
            log(f"[ray] {len(tasks)} cells as tasks of {cpus:g} CPU(s) and {gpus:g} GPU(s) "
                f"each; cluster resources {ray.cluster_resources()}")
            pending = {remote.remote(replace(task, progress=False)): task for task in tasks}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    task = pending.pop(ref)
                    yield task, ray.get(ref)
        finally:
            if started_here:
                ray.shutdown()


# --------------------------------------------------------------------------------------
# slurm (submitit)
# --------------------------------------------------------------------------------------
def _run_chunk(tasks: list[CellTask]) -> list[dict]:
    """A SLURM array task: its cells one after another."""
    return [run_cell(task, lambda msg: print(msg, flush=True)) for task in tasks]


@dataclass
class SlurmExecutor:
    """The cells as a SLURM job array through submitit, ``cells_per_job`` cells per array
    task, with the partition, GPUs, CPUs and time limit given. A failed array task is
    resubmitted (up to ``max_retries`` times) and its cells resume from their checkpoints.
    ``cluster="local"`` runs the same jobs as local processes (submitit's local executor:
    tests, or a machine without SLURM)."""

    folder: Optional[str] = None
    cells_per_job: int = 1
    partition: Optional[str] = None
    gpus_per_cell: Optional[int] = None
    cpus_per_cell: Optional[int] = None
    timeout_min: int = 24 * 60
    array_parallelism: int = 256
    max_retries: int = 2
    cluster: Optional[str] = None
    poll_seconds: float = 5.0

    def run(self, tasks: list[CellTask], log: Log) -> Finished:
        try:
            import submitit
        except ImportError:
            raise ImportError("the slurm executor needs submitit: pip install "
                              "'tempsoft[slurm]' (or pip install submitit)") from None
        if not tasks:
            return
        if self.cells_per_job < 1:
            raise ValueError(f"cells_per_job must be >= 1, got {self.cells_per_job}")
        folder = Path(self.folder or Path(tasks[0].run_dir) / "slurm")
        executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=self.cluster)
        gpus = self.gpus_per_cell if self.gpus_per_cell is not None else \
            int(_default_gpus(tasks))
        cpus = self.cpus_per_cell or max(1, tasks[0].preset.run["threads"])
        params = dict(timeout_min=self.timeout_min, cpus_per_task=cpus,
                      slurm_array_parallelism=self.array_parallelism, name="tempsoft")
        if gpus:
            params["gpus_per_node"] = gpus
        if self.partition:
            params["slurm_partition"] = self.partition
        executor.update_parameters(**params)
        chunks = [[replace(t, progress=False) for t in tasks[i:i + self.cells_per_job]]
                  for i in range(0, len(tasks), self.cells_per_job)]
        with _env(_forwarded_env()):
            jobs = executor.map_array(_run_chunk, chunks)
        pending = {job: (chunk, 0) for job, chunk in zip(jobs, chunks)}
        log(f"[slurm] {len(tasks)} cells in {len(chunks)} array task(s) "
            f"({executor.cluster}; job folder {folder})")
        while pending:
            finished = [job for job in pending if job.done()]
            if not finished:
                time.sleep(self.poll_seconds)
                continue
            for job in finished:
                chunk, attempt = pending.pop(job)
                try:
                    rows = job.result()
                except Exception as exc:  # the job died or raised: resubmit its cells
                    if attempt >= self.max_retries:
                        raise RuntimeError(f"SLURM job {job.job_id} failed {attempt + 1} "
                                           f"times; last error: {exc}") from exc
                    log(f"[slurm] job {job.job_id} failed ({type(exc).__name__}); "
                        f"resubmitting its {len(chunk)} cell(s), attempt {attempt + 2}")
                    with _env(_forwarded_env()):
                        pending[executor.submit(_run_chunk, chunk)] = (chunk, attempt + 1)
                    continue
                for task, row in zip(chunk, rows):
                    yield task, row


@contextlib.contextmanager
def _env(values: dict[str, str]):
    """Environment variables set for the block (submitit copies the environment at submit)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_executor(name: str, **options):
    """The executor called ``name`` ("local", "ray", "slurm") with its options (None values
    are left at the executor's defaults)."""
    classes = {"local": LocalExecutor, "ray": RayExecutor, "slurm": SlurmExecutor}
    if name not in classes:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {name!r}")
    cls = classes[name]
    known = set(cls.__dataclass_fields__)
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"the {name} executor takes no option(s) {unknown}; it takes "
                         f"{sorted(known) or 'none'}")
    return cls(**given)


__all__ = ["EXECUTORS", "LocalExecutor", "RayExecutor", "SlurmExecutor", "make_executor"]
