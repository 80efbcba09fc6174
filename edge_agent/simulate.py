"""``edge-agent simulate``: simulated machines as producers of raw windows, for demos and tests.

Each machine (``edge_tier.model.generator.Machine``, seeded) is mostly healthy and has
fault episodes now and then. Its windows go to the agent's ``POST /v1/windows``
in batches, at a set rate, the way a sensor process on the device would send
them; the agent's prefilter keeps some, and the summary says how many of the
faults it kept and how many bytes stayed on the device.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

import aiohttp
import numpy as np

from edge_agent.endpoint import WINDOWS_TYPE
from edge_tier.model.generator import HEALTHY, Machine, SignalSpec


@dataclass
class Tally:
    windows: int = 0
    faults: int = 0
    kept: int = 0
    faults_kept: int = 0
    healthy_dropped: int = 0
    refused: int = 0  # requests the agent answered with an error
    unreachable: int = 0  # requests that found no agent (windows not counted)
    raw_bytes: int = 0
    queued_bytes: int = 0  # what the agent queued for upload instead

    def add(self, other: Tally) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def count(self, x: np.ndarray, y: np.ndarray, status: int, answer: dict[str, Any]) -> None:
        """One batch of windows ``x`` (labels ``y``) and the agent's answer to it."""
        self.windows += len(x)
        self.raw_bytes += x.nbytes
        fault = y != HEALTHY
        self.faults += int(fault.sum())
        if status != 200:
            self.refused += 1
            return
        kept = np.zeros(len(x), bool)
        kept[answer["kept_index"]] = True
        self.kept += int(kept.sum())
        self.queued_bytes += int(answer.get("queued_bytes", 0))
        self.faults_kept += int((kept & fault).sum())
        self.healthy_dropped += int((~kept & ~fault).sum())


def machine_windows(
    seed: int, fault_rate: float, spec: SignalSpec | None = None
) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    """A simulated machine: call it with n for its next n windows (float32 LE) and their labels."""
    windows = Machine(seed=seed, fault_rate=fault_rate, spec=spec or SignalSpec()).windows()

    def take(n: int) -> tuple[np.ndarray, np.ndarray]:
        pairs = list(islice(windows, n))
        return np.stack([w for w, _ in pairs]).astype("<f4"), np.array([label for _, label in pairs])

    return take


async def run_machine(
    session: aiohttp.ClientSession,
    url: str,
    windows: Callable[[int], tuple[np.ndarray, np.ndarray]],
    *,
    stream: str,
    batch: int,
    rate: float,
    until: float,
    tally: Tally,
    acked: list[tuple[int, int]] | None = None,
) -> None:
    """Post ``windows`` to the agent at ``url`` until ``until``, ``rate`` windows/s (0: as fast
    as it takes them); count them in ``tally``, and the seq ranges of the kept in ``acked``."""
    period = batch / rate if rate > 0 else 0.0
    next_at = time.monotonic()
    while time.monotonic() < until:
        x, y = await asyncio.to_thread(windows, batch)
        try:
            async with session.post(
                f"{url}/v1/windows",
                params={"stream": stream},
                data=x.tobytes(),
                headers={"Content-Type": WINDOWS_TYPE},
            ) as resp:
                answer = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            tally.unreachable += 1  # the agent is down or restarting: a sensor would drop these too
            await asyncio.sleep(0.5)
            continue
        tally.count(x, y, resp.status, answer)
        if acked is not None and resp.status == 200 and answer.get("kept"):
            acked.append((answer["first_seq"], answer["last_seq"]))
        if period:
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def simulate(
    url: str,
    *,
    machines: int = 4,
    seconds: float = 10.0,
    rate: float = 50.0,
    batch: int = 10,
    seed: int = 1,
    fault_rate: float = 0.02,
    stream: str = "vibration",
    spec: SignalSpec | None = None,
) -> Tally:
    """Run ``machines`` simulated machines for ``seconds``, each at ``rate`` windows/s (0: as
    fast as the agent takes them); the combined tally."""
    tallies = [Tally() for _ in range(machines)]
    until = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session, asyncio.TaskGroup() as tg:
        for i in range(machines):
            m = machine_windows(seed * 1000 + i, fault_rate, spec)
            tg.create_task(
                run_machine(
                    session, url, m, stream=stream, batch=batch, rate=rate, until=until, tally=tallies[i]
                )
            )
    total = Tally()
    for t in tallies:
        total.add(t)
    return total


def report(t: Tally, seconds: float) -> str:
    healthy = t.windows - t.faults
    lines = [
        f"windows       {t.windows} in {seconds:.1f}s ({t.windows / max(seconds, 1e-9):.0f}/s), "
        f"{t.faults} in fault episodes",
        f"kept          {t.kept} ({t.kept / max(t.windows, 1):.1%}); faults kept "
        f"{t.faults_kept}/{t.faults}, healthy dropped {t.healthy_dropped}/{healthy}",
        f"bytes         raw {t.raw_bytes:,}; queued for upload {t.queued_bytes:,} "
        f"({t.queued_bytes / max(t.raw_bytes, 1):.2%} of raw)",
    ]
    if t.refused:
        lines.append(f"refused       {t.refused} requests (see the agent's log)")
    if t.unreachable:
        lines.append(f"unreachable   {t.unreachable} requests found no agent")
    return "\n".join(lines)
