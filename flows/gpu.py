"""One GPU, one job: GPU stages take a slot of a Prefect global concurrency limit while they run.

`pixart-pipeline serve` creates the limit `gpu` (one slot per card; `--gpu-slots`). Every GPU
stage (recaption, embed, train, evaluate, and the recaption flow's captioning) runs inside
`gpu_slot(stage)`. When no slot is free, the flow run's state turns to `AwaitingGPU`, with a
message naming the stage and the limit, and back to `Running` once it holds the slot; its
logs say the same. Without the limit (the CLI's own short-lived server) stages do not wait.

A global concurrency limit rather than a task tag limit: a task waiting on a tag limit just sits
in Pending, while a flow-level slot lets the run's state say why it waits.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import httpx
from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import Running

GPU_LIMIT = os.environ.get("PIXART_GPU_LIMIT", "gpu")
WAITING_STATE = "AwaitingGPU"


def ensure_gpu_limit(slots: int = 1, name: str = GPU_LIMIT) -> None:
    """Create the limit, or set its slot count if it exists (serve calls this at start)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        else:
            client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=slots, active=True)
            )


def _limit_exists(name: str) -> bool:
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return True


def _set_flow_run_state(name: str | None = None, message: str | None = None) -> None:
    # force: the server would refuse Running -> Running otherwise; the engine's own state is untouched.
    if flow_run.id is None:
        return
    state = Running(name=name, message=message) if name else Running()
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, state, force=True)


def _slot_taken(exc: ConcurrencySlotAcquisitionError) -> bool:
    cause = exc.__cause__
    return isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423


@contextlib.contextmanager
def gpu_slot(stage: str, name: str = GPU_LIMIT) -> Iterator[None]:
    """Hold one slot of the GPU limit for the length of the block (no-op if the limit is absent)."""
    if not _limit_exists(name):
        yield
        return
    logger = get_run_logger()
    holder = ConcurrencyLeaseHolder(type="flow_run", id=flow_run.id) if flow_run.id else None
    # A failed lease renewal (a network blip) must not kill hours of training.
    keep = {"strict": True, "holder": holder, "raise_on_lease_renewal_failure": False}
    with contextlib.ExitStack() as stack:
        try:  # one try without waiting, so a wait is visible before it starts
            stack.enter_context(concurrency(name, occupy=1, max_retries=0, **keep))
        except ConcurrencySlotAcquisitionError as exc:
            if not _slot_taken(exc):
                raise
            message = (
                f"{stage} is waiting for a GPU: every slot of concurrency limit '{name}' is held by "
                "another run's GPU stage; it starts when one ends"
            )
            logger.info(message)
            _set_flow_run_state(WAITING_STATE, message)
            stack.enter_context(concurrency(name, occupy=1, **keep))
            _set_flow_run_state()
            logger.info("%s got a GPU slot", stage)
        yield
