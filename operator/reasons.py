"""The fixed set of condition reasons an SLOService's status may give.

Each is CamelCase (Kubernetes' convention for `reason`) and documented in docs/operator.md;
tools may match on them, so they never carry details: those go into `message`.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # The spec is refused (Degraded=True, Ready=False, Progressing=False); nothing is built.
    INVALID_SPEC = "InvalidSpec"  # a cross-field rule, e.g. min > max
    UNKNOWN_PROFILE = "UnknownProfile"  # model.profile names no shipped profile
    TTFT_BELOW_ZERO_LOAD = "TTFTBelowZeroLoad"  # a TTFT no idle replica can meet
    TPOT_BELOW_IDLE_DECODE = "TPOTBelowIdleDecode"  # a TPOT below one idle decode step
    # Applying children failed (API errors, a name taken by an object not ours).
    APPLY_FAILED = "ApplyFailed"
    # Rollout state.
    ROLLING_OUT = "RollingOut"  # Deployments not yet at their desired, updated, ready pods
    AVAILABLE = "Available"  # every replica and gateway pod ready
    REPLICAS_UNAVAILABLE = "ReplicasUnavailable"  # no replica pod ready
    GATEWAY_UNAVAILABLE = "GatewayUnavailable"  # no gateway pod ready
    SCALED_TO_ZERO = "ScaledToZero"  # replicas.desired is 0
    STABLE = "Stable"  # nothing rolling out
    # SLO state (from the gateway's /v1/slo/summary).
    TARGETS_MET = "TargetsMet"
    TARGETS_MISSED = "TargetsMissed"
    NO_TRAFFIC = "NoTraffic"  # no class had requests in the window
    GATEWAY_UNREACHABLE = "GatewayUnreachable"  # the summary could not be read
