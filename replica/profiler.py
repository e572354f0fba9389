"""`sloserve profile`: measure an engine's step times over a grid of shapes and fit the model.

The engine runs with sloserve's scheduler, which reports every executed step (shape and
duration) over the step socket. The grid drives it through the shapes the planner cares
about: prefill chunks of many sizes, decode batches of many sizes at several context lengths,
and mixes of the two. Prompts are random token ids, so the prefix cache never shortens a step.
"""

from __future__ import annotations

import asyncio
import logging
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from sloserve.machine import cpu_description
from sloserve.replica.engine import EngineSettings, LoadListener, build_engine
from sloserve.replica.reports import ReportReceiver, StepRecord
from sloserve.stepmodel import StepSample, StepTimeModel, fit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grid:
    prefill_chunks: tuple[int, ...] = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048)
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    context_lengths: tuple[int, ...] = (16, 128, 512, 1024)
    decode_tokens: int = 16  # output tokens per decode request
    repeats: int = 2


QUICK_GRID = Grid(
    prefill_chunks=(16, 64, 256, 512, 1024),
    decode_batches=(1, 4, 16, 32),
    context_lengths=(16, 256, 768),
    decode_tokens=8,
    repeats=1,
)


def _hardware() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except ImportError:
        pass
    return cpu_description()


class _Driver:
    def __init__(self, engine: Any, vocab: int, max_len: int, seed: int) -> None:
        self.engine = engine
        self.vocab = vocab
        self.max_len = max_len
        self.rng = random.Random(seed)
        self.count = 0

    def prompt(self, tokens: int) -> list[int]:
        # Ids above the special tokens; random so no two prompts share a cached prefix.
        return [self.rng.randrange(4, self.vocab) for _ in range(tokens)]

    async def one(self, prompt_tokens: int, output_tokens: int) -> None:
        prompt_tokens = min(prompt_tokens, self.max_len - output_tokens - 1)
        params = SamplingParams(
            max_tokens=output_tokens, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY
        )
        self.count += 1
        async for _ in self.engine.generate(
            {"prompt_token_ids": self.prompt(prompt_tokens)}, params, f"profile-{self.count}"
        ):
            pass

    async def batch(self, sizes: list[tuple[int, int]]) -> None:
        await asyncio.gather(*[self.one(p, o) for p, o in sizes])

    async def first_token_s(self, prompt_tokens: int) -> float:
        """Seconds from submitting a prompt, alone, to its first token coming out."""
        params = SamplingParams(max_tokens=2, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        self.count += 1
        prompt = {"prompt_token_ids": self.prompt(prompt_tokens)}
        started = time.perf_counter()
        first: float | None = None
        async for _ in self.engine.generate(prompt, params, f"profile-{self.count}"):
            if first is None:
                first = time.perf_counter() - started
        assert first is not None, "the engine finished a request without output"
        return first


# Prompts timed alone, after the grid, for the per-request cost (`request_overhead_s`).
ZERO_LOAD_PROMPTS = (8, 16, 32, 48)
ZERO_LOAD_REPEATS = 3


async def _zero_load_ttfts(driver: _Driver) -> list[tuple[int, float]]:
    return [
        (tokens, await driver.first_token_s(tokens))
        for _ in range(ZERO_LOAD_REPEATS)
        for tokens in ZERO_LOAD_PROMPTS
    ]


def request_overhead_s(model: StepTimeModel, ttfts: list[tuple[int, float]]) -> float:
    """The per-request cost no step shows: the median of zero-load TTFTs less the prefill the
    model predicts for them (input processing, the trip to the engine core and back)."""
    beyond = sorted(ttft - model.prefill_s(tokens) for tokens, ttft in ttfts)
    return max(0.0, beyond[len(beyond) // 2]) if beyond else 0.0


async def _drive(driver: _Driver, grid: Grid, progress: Callable[[str], None]) -> None:
    # Idle decode and small steps first, so the floor is well measured.
    for _ in range(grid.repeats):
        for chunk in grid.prefill_chunks:
            progress(f"prefill {chunk}")
            await driver.one(chunk, 2)
        for context in grid.context_lengths:
            for batch in grid.decode_batches:
                progress(f"decode batch {batch} at context {context}")
                await driver.batch([(context, grid.decode_tokens)] * batch)
        # Mixed steps: a long prompt arriving while a batch decodes.
        for batch in grid.decode_batches[::2]:
            for chunk in grid.prefill_chunks[::3]:
                progress(f"mixed: batch {batch} + prompt {chunk}")
                await driver.batch([(64, grid.decode_tokens * 2)] * batch + [(chunk, 2)])


async def _measure(
    driver: _Driver, grid: Grid, progress: Callable[[str], None]
) -> tuple[float, list[tuple[int, float]]]:
    """The grid's steps (and the seconds it took), then zero-load first tokens: in one event
    loop, the engine's output loop runs in the first one it is used from."""
    started = time.monotonic()
    await _drive(driver, grid, progress)
    elapsed = time.monotonic() - started
    progress(f"zero-load first tokens, prompts of {ZERO_LOAD_PROMPTS} tokens")
    return elapsed, await _zero_load_ttfts(driver)


def profile(
    settings: EngineSettings,
    grid: Grid = Grid(),
    seed: int = 0,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[StepTimeModel, list[StepRecord]]:
    """Runs the grid on a fresh engine and fits the step-time model to what it measured."""
    records: list[StepRecord] = []
    with tempfile.TemporaryDirectory(prefix="sloserve-profile-") as tmp:
        socket_path = Path(tmp) / "steps.sock"
        receiver = ReportReceiver(socket_path, records.append)
        engine_settings = EngineSettings(**{**settings.__dict__, "step_socket": socket_path})
        engine = build_engine(engine_settings, LoadListener())
        try:
            config = engine.vllm_config
            driver = _Driver(
                engine,
                vocab=engine.model_config.get_vocab_size(),
                max_len=engine.model_config.max_model_len,
                seed=seed,
            )
            elapsed, ttfts = asyncio.run(_measure(driver, grid, progress))
            time.sleep(0.5)  # let the last datagrams arrive
        finally:
            engine.shutdown()
            receiver.close()
    samples = [StepSample(r.shape, r.seconds) for r in records]
    import vllm

    metadata = {
        "model": str(settings.model),
        "hardware": _hardware(),
        "vllm_version": vllm.__version__,
        "derived": False,
        "source": "measured with `sloserve profile`",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine": {
            "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
            "max_num_seqs": config.scheduler_config.max_num_seqs,
            "max_model_len": config.model_config.max_model_len,
            "enforce_eager": settings.enforce_eager,
            "dtype": str(config.model_config.dtype),
        },
        "profiling": {"steps": len(samples), "requests": driver.count, "seconds": elapsed},
    }
    model = fit(samples, metadata=metadata, seed=seed)
    # The bench's TTFT presets count this (sloserve/bench/presets.py), as they must: a zero-load
    # first token takes it on top of the prefill.
    model.metadata["request_overhead_s"] = request_overhead_s(model, ttfts)
    model.metadata["request_overhead_note"] = (
        "fixed per-request cost beyond the step model: median zero-load TTFT of "
        f"{ZERO_LOAD_PROMPTS[0]}-{ZERO_LOAD_PROMPTS[-1]} token prompts, measured in process "
        "through the engine, less their predicted prefill; a server in front adds its own"
    )
    return model, records
