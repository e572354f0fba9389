"""A real vLLM scheduler driven in process, with no model behind it.

The engine core's loop without the engine: `SchedulerLoop` calls the scheduler's own
`schedule()` and `update_from_output()` as vLLM's `EngineCore` does, and stands in for the
model runner by sampling one token for every request whose prompt a step completes. With async
scheduling it keeps one step in flight while the next is scheduled, as `step_with_batch_queue`
does. The scheduler is vLLM's own class or sloserve's (replica/scheduler.py), built from a real
`VllmConfig` and KV-cache configuration, so every invariant vLLM asserts is checked as it would
be in a serving engine.

Two uses: stress tests that drive the scheduler at and past its limits (arrivals, hidden and
resumed requests), and `sloserve bench scheduler`, which times the whole `schedule()` of both
classes at GPU-scale loads, without the noise of a model.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import BlockHash, get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutputs
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from sloserve.replica.scheduler import CONFIG_KEY, SloAsyncScheduler, SloScheduler
from sloserve.slo import RequestSlo

# What the stand-in model samples: any id below the vocabulary that is not end-of-sequence.
SAMPLED_TOKEN = 5


@dataclass(frozen=True)
class LoopConfig:
    """The engine a scheduler is built for."""

    model: Path  # a model folder; only its config is read (the layer shapes of the KV cache)
    kv_tokens: int  # tokens the KV cache holds
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 1024
    async_scheduling: bool = False
    # sloserve's step profile (StepTimeModel.to_json()); None builds vLLM's own scheduler.
    profile: dict[str, Any] | None = None


def build_scheduler(config: LoopConfig) -> tuple[Scheduler, Callable[[Request], list[BlockHash]]]:
    """vLLM's scheduler, or sloserve's when a profile is given, for the engine `config` names,
    with the prefix-cache block hasher the engine core gives each request."""
    sloserve: dict[str, Any] = {}
    if config.profile is not None:
        sloserve = {"policy": "slo", "profile": config.profile}
    vllm_config = EngineArgs(
        model=str(config.model),
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        enforce_eager=True,
        async_scheduling=config.async_scheduling,
        additional_config={CONFIG_KEY: sloserve},
    ).create_engine_config()
    model_config = vllm_config.model_config
    cache_config = vllm_config.cache_config
    block_size = int(cache_config.block_size)
    num_blocks = max(1, config.kv_tokens // block_size) + 1  # vLLM keeps one block aside
    cache_config.num_gpu_blocks = num_blocks
    spec = FullAttentionSpec(
        block_size=block_size,
        num_kv_heads=model_config.get_total_num_kv_heads(),
        head_size=model_config.get_head_size(),
        dtype=torch.bfloat16,
    )
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)],
    )
    cls: type[Scheduler]
    if config.profile is not None:
        cls = SloAsyncScheduler if config.async_scheduling else SloScheduler
    else:
        cls = AsyncScheduler if config.async_scheduling else Scheduler
    scheduler = cls(
        vllm_config,
        kv_cache_config,
        StructuredOutputManager(vllm_config),
        block_size=block_size,
    )
    hash_fn = get_hash_fn_by_name(cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    return scheduler, get_request_block_hasher(block_size, hash_fn)


class SchedulerLoop:
    """Runs a scheduler step by step, as the engine core would, with a stand-in model."""

    def __init__(self, config: LoopConfig) -> None:
        self.config = config
        self.scheduler, self._block_hasher = build_scheduler(config)
        # Steps scheduled and not yet "executed": at most one with sync scheduling (it is
        # executed at once), two with async (one runs while the next is scheduled).
        self._depth = 2 if config.async_scheduling else 1
        self._in_flight: deque[tuple[SchedulerOutput, list[str]]] = deque()
        self.outputs: list[EngineCoreOutputs] = []  # every output batch, in order

    def request(
        self,
        request_id: str,
        prompt_tokens: int,
        max_tokens: int,
        slo: RequestSlo | None = None,
        first_token: int = 10,
    ) -> Request:
        """An engine request, as the engine core makes one from the front end's.

        Prompts that start with the same `first_token` share a prefix (for prefix caching).
        """
        params = SamplingParams(
            max_tokens=max_tokens,
            ignore_eos=True,
            extra_args=slo.to_extra_args() if slo is not None else None,
        )
        prompt = [first_token + i % 200 for i in range(prompt_tokens)]
        return Request(
            request_id, prompt, params, None, arrival_time=time.time(),
            block_hasher=self._block_hasher,
        )  # fmt: skip

    def add(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self.scheduler.add_request(request)

    def step(self) -> SchedulerOutput:
        """Schedules one step; returns it. The oldest step in flight completes first when
        the queue of steps is full, as the engine core blocks on it then."""
        output = self.scheduler.schedule()
        sampling = [
            request_id
            for request_id in output.num_scheduled_tokens
            if not self.scheduler.requests[request_id].is_prefill_chunk
        ]
        self._in_flight.append((output, sampling))
        while len(self._in_flight) >= self._depth:
            self._complete_oldest()
        return output

    def drain(self) -> None:
        """Completes every step still in flight."""
        while self._in_flight:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        output, sampling = self._in_flight.popleft()
        request_ids = list(output.num_scheduled_tokens)
        sampled = set(sampling)
        runner_output = ModelRunnerOutput(
            req_ids=request_ids,
            req_id_to_index={request_id: i for i, request_id in enumerate(request_ids)},
            sampled_token_ids=[
                [SAMPLED_TOKEN] if request_id in sampled else [] for request_id in request_ids
            ],
        )
        results = self.scheduler.update_from_output(output, runner_output)
        self.outputs.extend(results.values())

    def finished_ids(self) -> set[str]:
        """Requests that have ended, by any finish reason, in the outputs so far."""
        return {
            output.request_id
            for batch in self.outputs
            for output in batch.outputs
            if output.finish_reason is not None
        }
