"""SLO classes, per-request SLO data, and how a finished stream is judged against its SLO.

Definitions follow the methodology (docs/slo.md): a request arriving at `a` with TTFT budget F
and TPOT budget P has its first token due at a + F, and token k (k >= 2) due at
t0 + (k - 1) * P, with t0 = max(a + F, first-token time). A token is on time within 5%.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sloserve.errors import FieldError

# Tolerance of the attainment definition: a token is on time up to 1.05 x its budget.
TOLERANCE = 1.05

# Key under SamplingParams.extra_args that carries a request's SLO into vLLM's engine core.
EXTRA_ARGS_KEY = "sloserve"

_CLASS_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Budgets:
    """Latency budgets of one request, in seconds, per stage."""

    ttft_s: float
    tpot_s: float
    # TPOT of a thinking stage before the answer; None: no thinking stage.
    thinking_tpot_s: float | None = None
    # Leading output tokens that belong to the thinking stage, when known in advance. 0: not
    # known (no client knows how long a model will think): the stage lasts until the model
    # ends it, and every token is held to the thinking TPOT until then.
    thinking_tokens: int = 0

    def validate(self, field: str) -> None:
        if not self.ttft_s > 0:
            raise FieldError(f"{field}.ttft", "must be positive")
        if not self.tpot_s > 0:
            raise FieldError(f"{field}.tpot", "must be positive")
        if self.thinking_tpot_s is not None and not self.thinking_tpot_s > 0:
            raise FieldError(f"{field}.thinking_tpot", "must be positive when set")
        if self.thinking_tokens < 0:
            raise FieldError(f"{field}.thinking_tokens", "must not be negative")

    def tpot_for_token(self, index: int, thinking_ended_at: int | None = None) -> float:
        """TPOT budget of output token `index` (0-based), by the stage it belongs to.

        The thinking stage ends at `thinking_tokens` when that is known in advance, else at
        `thinking_ended_at` (the index of the first answer token) once the model has been
        seen to end it; until then, every token is a thinking token.
        """
        if self.thinking_tpot_s is None:
            return self.tpot_s
        end = self.thinking_tokens or thinking_ended_at
        if end is None or index < end:
            return self.thinking_tpot_s
        return self.tpot_s


@dataclass(frozen=True)
class SloClass:
    name: str
    budgets: Budgets
    description: str = ""
    # Whether its requests may be served as best effort: admitted as such when their SLO
    # cannot be promised, demoted when it can no longer be met, spilled by a gateway. False:
    # they are rejected, or ended with DEADLINE_EXCEEDED, instead (`spill_to_best_effort`).
    best_effort: bool = True


@dataclass(frozen=True)
class SloCatalog:
    """The SLO classes a replica serves, and the class of requests that name none."""

    classes: Mapping[str, SloClass]
    default_class: str

    def __post_init__(self) -> None:
        if not self.classes:
            raise FieldError("classes", "must not be empty")
        for name, slo_class in self.classes.items():
            if not _CLASS_NAME.match(name):
                raise FieldError(
                    f"classes[{name}].name", "must be lowercase letters, digits and '-'"
                )
            slo_class.budgets.validate(f"classes[{name}]")
        if self.default_class not in self.classes:
            raise FieldError(
                "default_class", f"{self.default_class!r} is not one of {sorted(self.classes)}"
            )

    def get(self, name: str) -> SloClass | None:
        return self.classes.get(name)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SloCatalog:
        """Reads the YAML/JSON form: {default_class: NAME, classes: [{name, ttft_ms, ...}]}."""
        raw_classes = data.get("classes")
        if not isinstance(raw_classes, list):
            raise FieldError("classes", "must be a list of classes")
        classes: dict[str, SloClass] = {}
        for i, item in enumerate(raw_classes):
            if not isinstance(item, Mapping) or "name" not in item:
                raise FieldError(f"classes[{i}]", "must be a mapping with a name")
            name = str(item["name"])
            if name in classes:
                raise FieldError(f"classes[{i}].name", f"duplicate class {name!r}")
            try:
                budgets = Budgets(
                    ttft_s=float(item["ttft_ms"]) / 1000,
                    tpot_s=float(item["tpot_ms"]) / 1000,
                    thinking_tpot_s=(
                        float(item["thinking_tpot_ms"]) / 1000
                        if item.get("thinking_tpot_ms") is not None
                        else None
                    ),
                    thinking_tokens=int(item.get("thinking_tokens", 0)),
                )
            except KeyError as missing:
                raise FieldError(f"classes[{i}].{missing.args[0]}", "is required") from None
            except (TypeError, ValueError) as bad:
                raise FieldError(f"classes[{i}]", f"bad number: {bad}") from None
            best_effort = item.get("spill_to_best_effort", True)
            if not isinstance(best_effort, bool):
                raise FieldError(f"classes[{i}].spill_to_best_effort", "must be true or false")
            classes[name] = SloClass(
                name, budgets, str(item.get("description", "")), best_effort=best_effort
            )
        default = data.get("default_class", raw_classes[0]["name"] if raw_classes else "")
        return cls(classes=classes, default_class=str(default))

    @classmethod
    def load(cls, path: Path) -> SloCatalog:
        with path.open() as f:
            data = yaml.safe_load(f)
        if not isinstance(data, Mapping):
            raise FieldError(str(path), "must hold a mapping with `classes`")
        return cls.from_mapping(data)

    @classmethod
    def default(cls) -> SloCatalog:
        return cls.load(Path(__file__).with_name("default_classes.yaml"))


@dataclass(frozen=True)
class RequestSlo:
    """What the engine core needs to know about one request's SLO.

    It travels inside vLLM's SamplingParams.extra_args, so it holds plain values only.
    """

    request_id: str
    class_name: str  # "" for explicit budgets
    budgets: Budgets
    allow_best_effort: bool
    arrival_time: float  # time.time() at arrival on the replica
    tenant: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    # End the request when it can no longer meet its SLO, instead of demoting it.
    strict: bool = False
    # Time spent upstream before arrival_time (GenerateRequest.already_waited: in a gateway,
    # on replicas that turned it away); less than the TTFT budget.
    already_waited_s: float = 0.0

    @property
    def origin_time(self) -> float:
        """When the request's SLO clock started: its arrival upstream. Its deadlines, and the
        TTFT it is judged by, count from here (methodology §1: `a` is where the system first
        saw it), so a retried request keeps its class with the budget that is left."""
        return self.arrival_time - self.already_waited_s

    @property
    def length_group(self) -> str:
        """Whose finished output lengths forecast this request's: its class's, or, for
        explicit budgets, those of the requests its tenant sent with the same TPOT budgets.
        One application sends one shape of budget; pooling every explicit-budget request
        instead let short chats set the expected length of long reasoning answers (in the
        mixed benchmark, its 90th percentile was reasoning's median)."""
        if self.class_name:
            return self.class_name
        b = self.budgets
        return f"{self.tenant}/tpot={b.tpot_s:.6g},thinking={b.thinking_tpot_s or 0:.6g}"

    def to_extra_args(self) -> dict[str, Any]:
        return {EXTRA_ARGS_KEY: asdict(self) | {"labels": dict(self.labels)}}

    @classmethod
    def from_extra_args(cls, extra_args: Mapping[str, Any] | None) -> RequestSlo | None:
        """The SLO carried by a request, or None for a request that carries none."""
        data = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if not isinstance(data, Mapping):
            return None
        return cls(
            request_id=str(data["request_id"]),
            class_name=str(data["class_name"]),
            budgets=Budgets(**data["budgets"]),
            allow_best_effort=bool(data["allow_best_effort"]),
            arrival_time=float(data["arrival_time"]),
            tenant=str(data.get("tenant", "")),
            labels=dict(data.get("labels", {})),
            strict=bool(data.get("strict", False)),
            already_waited_s=float(data.get("already_waited_s", 0.0)),
        )


@dataclass(frozen=True)
class SloOutcome:
    """How a finished stream did against its budgets (methodology §2, points 3 and 4)."""

    ttft_s: float
    mean_tpot_s: float
    max_inter_token_s: float
    ttft_met: bool
    tpot_met: bool
    late_tokens: int
    # The first token later than its line (1: the first token), None when none was; and the
    # closest any token came to its line (negative: the most late one was by that much).
    first_late_token: int | None = None
    worst_margin_s: float = math.inf

    @property
    def met(self) -> bool:
        return self.ttft_met and self.tpot_met


def judge(arrival: float, token_times: Sequence[float], budgets: Budgets) -> SloOutcome:
    """Judges one stream: `token_times` holds the time each output token arrived.

    Token times must be on the same clock as `arrival`. A stream with no tokens misses.
    """
    if not token_times:
        return SloOutcome(
            0.0, 0.0, 0.0, ttft_met=False, tpot_met=False, late_tokens=0, worst_margin_s=-math.inf
        )
    first = token_times[0]
    ttft = first - arrival
    worst = TOLERANCE * budgets.ttft_s - ttft
    ttft_met = worst >= 0
    first_late = None if ttft_met else 1
    decode_start = max(arrival + budgets.ttft_s, first)
    late = 0
    budget_so_far = 0.0  # sum of per-token TPOT budgets: the deadline line bends per stage
    max_gap = 0.0
    for k in range(1, len(token_times)):
        budget_so_far += budgets.tpot_for_token(k)
        margin = TOLERANCE * budget_so_far - (token_times[k] - decode_start)
        if margin < 0:
            late += 1
            first_late = first_late or k + 1
        worst = min(worst, margin)
        max_gap = max(max_gap, token_times[k] - token_times[k - 1])
    mean_tpot = (token_times[-1] - first) / (len(token_times) - 1) if len(token_times) > 1 else 0.0
    return SloOutcome(
        ttft_s=ttft,
        mean_tpot_s=mean_tpot,
        max_inter_token_s=max_gap,
        ttft_met=ttft_met,
        tpot_met=late == 0,
        late_tokens=late,
        first_late_token=first_late,
        worst_margin_s=worst,
    )
