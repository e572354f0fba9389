"""Runs a workload against a target, open loop, recording every token's arrival time.

Requests are sent at their arrival offsets whatever the system's state (open loop: a slow
system gets no relief). A request completes when the client has received its true length
(BenchRequest.output_tokens), which no server is told; the target then closes the stream
(targets.py). A follow-up round of a tool-calling session is sent `delay_s` after
its previous round completes; when that round failed, the session stops and the rounds
never sent count as failed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from sloserve.bench.targets import Target
from sloserve.bench.types import BenchRequest, RequestRecord
from sloserve.bench.workloads import SharedPrefix

FIRST_REGULAR_TOKEN = 4  # ids below are the tiny/bench tokenizers' special tokens


class PromptBook:
    """Deterministic prompt token ids per request; a session's rounds extend one context.

    `prefixes` (Workload.prefixes: a replayed trace's prefix hashes) give requests of one
    group the same leading tokens, so a server's prefix cache can serve them; a later round
    of a session extends its previous round instead (which began with the prefix already).
    """

    def __init__(
        self, vocab_size: int, seed: int, prefixes: Mapping[int, SharedPrefix] | None = None
    ) -> None:
        self._vocab = vocab_size
        self._seed = seed
        self._by_index: dict[int, list[int]] = {}
        self._prefixes = prefixes or {}
        self._groups: dict[str, list[int]] = {}

    def _random_ids(self, key: int, count: int) -> list[int]:
        rng = random.Random(self._seed * 1_000_003 + key)
        return [rng.randrange(FIRST_REGULAR_TOKEN, self._vocab) for _ in range(count)]

    def _group_ids(self, group: str, count: int) -> list[int]:
        """The first `count` tokens of the group's sequence. A str seed keeps the groups'
        streams apart from the per-request ones (int seeds) and is stable across processes
        (random.seed hashes a str with SHA-512, not with the salted hash())."""
        ids = self._groups.get(group, [])
        if len(ids) < count:
            rng = random.Random(f"{self._seed}:prefix:{group}")
            ids = [rng.randrange(FIRST_REGULAR_TOKEN, self._vocab) for _ in range(count)]
            self._groups[group] = ids
        return ids[:count]

    def prompt(self, request: BenchRequest) -> list[int]:
        if request.index in self._by_index:
            return self._by_index[request.index]
        base: list[int] = []
        shared = self._prefixes.get(request.index)
        if request.after is not None and request.after in self._by_index:
            base = self._by_index[request.after][: request.prompt_tokens]
        elif shared is not None:
            base = self._group_ids(shared.group, min(shared.tokens, request.prompt_tokens))
        ids = base + self._random_ids(request.index, max(0, request.prompt_tokens - len(base)))
        self._by_index[request.index] = ids
        return ids


async def run(
    target: Target,
    requests: Sequence[BenchRequest],
    prompts: PromptBook,
    request_timeout_s: float = 300.0,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Sends the workload and returns one record per request, in index order."""
    followers: dict[int, list[BenchRequest]] = {}
    for request in requests:
        if request.after is not None:
            followers.setdefault(request.after, []).append(request)
    records: dict[int, RequestRecord] = {}
    tasks: set[asyncio.Task[None]] = set()
    start = time.time() + 0.05

    async def send(request: BenchRequest, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.time()))
        record = RequestRecord(request=request, sent_at=time.time())
        records[request.index] = record
        try:
            await asyncio.wait_for(
                target.send(request, prompts.prompt(request), record), request_timeout_s
            )
        except TimeoutError:
            record.error = f"no complete response within {request_timeout_s} s"
            record.finished_at = time.time()
        session_goes_on = record.completed
        if record.rejected and request.session is not None:
            session_goes_on = await retry_as_best_effort(request, record)
        if on_done is not None:
            on_done(record)
        for follower in followers.get(request.index, []):
            if session_goes_on:
                spawn(follower, time.time() + follower.delay_s)
            else:
                skip(follower, f"session stopped: round {request.round} failed")

    async def retry_as_best_effort(request: BenchRequest, record: RequestRecord) -> bool:
        """An agent whose round was turned away sends it again, accepting best effort, and
        goes on with its session once served, as a real agent would: the round still counts
        as rejected (a miss), but its later rounds are sent. (Stopping the session instead
        made each rejection cost the session's every later round as well.) Its last round is
        retried too: the retry's load is the engine's to carry. Whether the retry completed."""
        retry = RequestRecord(request=replace(request, allow_best_effort=True), sent_at=time.time())
        try:
            await asyncio.wait_for(
                target.send(retry.request, prompts.prompt(request), retry), request_timeout_s
            )
        except TimeoutError:
            return False
        record.retry_completed = retry.completed
        return retry.completed

    def skip(request: BenchRequest, why: str) -> None:
        now = time.time()
        records[request.index] = RequestRecord(
            request, sent_at=now, finished_at=now, error=why, sent=False
        )
        for follower in followers.get(request.index, []):
            skip(follower, why)

    def spawn(request: BenchRequest, at: float) -> None:
        task = asyncio.create_task(send(request, at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    for request in requests:
        if request.after is None:
            spawn(request, start + request.arrival_s)
    while tasks:
        await asyncio.gather(*list(tasks))
    return [records[r.index] for r in requests if r.index in records]
