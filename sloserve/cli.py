"""The `sloserve` command line."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sloserve.errors import SloserveError

if TYPE_CHECKING:
    from sloserve.replica.engine import EngineSettings

GiB = 1 << 30


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", type=Path, required=True, help="model directory (Hugging Face layout)"
    )
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument(
        "--kv-cache-gib",
        type=float,
        help="KV cache size in GiB (default: 1 on CPU, vLLM's own sizing on GPU)",
    )
    p.add_argument("--max-num-seqs", type=int, help="most requests per engine step")
    p.add_argument("--max-num-batched-tokens", type=int, help="most tokens per engine step")
    p.add_argument(
        "--enforce-eager", action="store_true", help="skip graph compilation (faster start)"
    )
    p.add_argument("--dtype", default="auto", help="weight dtype (default: auto)")
    p.add_argument("--load-format", default="auto", help="'dummy' for random weights of real shape")
    p.add_argument(
        "--reasoning-parser",
        metavar="NAME",
        help="vLLM's reasoning parser of the model (e.g. deepseek_r1): the scheduler learns "
        "from it when a request's thinking ends, and holds its answer to the answer TPOT",
    )
    p.add_argument(
        "--cpu-cores",
        type=_cpu_cores,
        metavar="LIST",
        help="CPU engines: the cores the worker computes on, e.g. 0 or 2-3 (default: vLLM's "
        "choice, the same for every engine; give each engine on one machine its own)",
    )


def _cpu_cores(text: str) -> str:
    from sloserve.cpu_cores import format_cores, parse_cores

    try:
        return format_cores(parse_cores(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _engine_settings(args: argparse.Namespace) -> EngineSettings:
    from sloserve.replica.engine import EngineSettings

    kv_bytes = int(args.kv_cache_gib * GiB) if args.kv_cache_gib else None
    if kv_bytes is None:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            kv_bytes = GiB  # vLLM's CPU default reserves most of the machine's memory
    return EngineSettings(
        model=args.model,
        max_model_len=args.max_model_len,
        kv_cache_bytes=kv_bytes,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager,
        dtype=args.dtype,
        load_format=args.load_format,
        cpu_cores=args.cpu_cores,
        reasoning_parser=args.reasoning_parser,
    )


def _add_replica(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("replica", help="serve one vLLM engine with the SLO scheduler over gRPC")
    _add_engine_args(p)
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: all)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default: 50051)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=9400,
        help="Prometheus /metrics port; -1 turns it off (default: 9400)",
    )
    p.add_argument("--classes", type=Path, help="SLO classes YAML (default: built-in classes)")
    p.add_argument(
        "--profile",
        type=Path,
        help="step-time profile the SLO scheduler plans with (from `sloserve profile`; "
        "default: MODEL/step-profile.json if present, else the shipped cpu-bench profile)",
    )
    p.add_argument(
        "--policy",
        choices=("slo", "vllm"),
        default="slo",
        help="scheduling policy: sloserve's SLO planner, or vLLM's own (ablation)",
    )
    p.add_argument(
        "--fault-step-delay",
        type=float,
        default=0.0,
        help=argparse.SUPPRESS,  # tests: make every engine step this many seconds slower
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="requests waiting for a first token before new ones get QUEUE_FULL (default: 256)",
    )
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=256,
        help="max_tokens of requests that set none (default: 256)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=300.0,
        help="seconds SIGTERM waits for requests in flight (default: 300)",
    )
    p.add_argument(
        "--wedge-timeout",
        type=float,
        default=120.0,
        help="an engine with unfinished requests that finishes no step for this many seconds "
        "is wedged: the replica stops serving and exits non-zero; 0 turns the check off "
        "(default: 120)",
    )
    p.add_argument(
        "--build-model",
        choices=("tiny", "bench"),
        help="when --model holds no model, first build this random-weight model there "
        "(what an SLOService with model source builtin://KIND runs)",
    )


def _run_replica(args: argparse.Namespace) -> int:
    from sloserve.replica.server import ReplicaSettings, serve

    if args.build_model:
        from sloserve.tiny_model import SHAPES, ensure_model

        ensure_model(args.model, SHAPES[args.build_model])
    engine = dataclasses.replace(
        _engine_settings(args), policy=args.policy, fault_step_delay_s=args.fault_step_delay
    )
    settings = ReplicaSettings(
        engine=engine,
        host=args.host,
        port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        classes_file=args.classes,
        profile_file=args.profile,
        max_waiting=args.max_waiting,
        default_max_tokens=args.default_max_tokens,
        drain_timeout_s=args.drain_timeout,
        wedge_timeout_s=args.wedge_timeout if args.wedge_timeout > 0 else None,
    )
    return asyncio.run(serve(settings))


def _add_profile(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("profile", help="measure an engine's step times and fit the step-time model")
    _add_engine_args(p)
    p.add_argument(
        "--out", type=Path, help="profile file to write (default: MODEL/step-profile.json)"
    )
    p.add_argument("--quick", action="store_true", help="a smaller grid (about a minute)")
    p.add_argument("--seed", type=int, default=0)


def _run_profile(args: argparse.Namespace) -> int:
    from sloserve.replica.profiler import QUICK_GRID, Grid, profile
    from sloserve.stepmodel import StepShape

    out = args.out or args.model / "step-profile.json"
    model, _ = profile(
        _engine_settings(args),
        QUICK_GRID if args.quick else Grid(),
        seed=args.seed,
        progress=lambda what: print(f"  {what}", file=sys.stderr),
    )
    model.save(out)
    quality = model.quality
    assert quality is not None
    idle = model.idle_decode_s()
    prefill_512 = model.predict(StepShape(tokens=512, requests=1, context_tokens=512))
    print(f"wrote {out}")
    print(f"steps: {quality.train_steps} fitted, {quality.heldout_steps} held out")
    print(f"held-out R^2 {quality.r2:.4f}, MAPE {quality.mape:.2f}%")
    print(f"pieces (s, s/token, s/request, s/context token): {model.pieces}")
    print(f"residual quantiles: {model.residual_quantiles}")
    print(
        f"idle decode step {idle * 1000:.2f} ms; 512-token prefill chunk "
        f"{prefill_512 * 1000:.2f} ms ({prefill_512 / idle:.1f}x)"
    )
    overhead = model.metadata["request_overhead_s"]
    print(f"per-request overhead {overhead * 1000:.2f} ms (zero-load TTFT beyond the prefill)")
    return 0


def _add_model(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("model", help="build local models")
    kinds = p.add_subparsers(dest="kind", required=True)
    for kind, purpose in (
        ("tiny", "tests and local runs"),
        ("bench", "benchmarks: step time grows with tokens on a CPU"),
    ):
        p_kind = kinds.add_parser(kind, help=f"a random-weight Llama model for {purpose}")
        p_kind.add_argument("dir", type=Path, help="directory to write the model into")
        p_kind.add_argument("--seed", type=int, default=0)


def _run_model(args: argparse.Namespace) -> int:
    from sloserve.tiny_model import SHAPES, build_model

    out = build_model(args.dir, SHAPES[args.kind], seed=args.seed)
    print(f"wrote {args.kind} model to {out}")
    return 0


def _add_generate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("generate", help="stream one generation from a replica or gateway")
    p.add_argument("prompt", help="prompt text")
    p.add_argument(
        "--endpoint", default="localhost:50051", help="HOST:PORT (default: localhost:50051)"
    )
    p.add_argument("--class", dest="slo_class", help="SLO class name (default: the server's)")
    p.add_argument("--ttft-ms", type=float, help="explicit TTFT budget (with --tpot-ms)")
    p.add_argument("--tpot-ms", type=float, help="explicit TPOT budget (with --ttft-ms)")
    p.add_argument("--max-tokens", type=int, help="most tokens to generate")
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true", help="generate max-tokens tokens")
    p.add_argument("--best-effort", action="store_true", help="accept best-effort service")
    p.add_argument("--timeout", type=float, help="give up after this many seconds")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _run_generate(args: argparse.Namespace) -> int:
    import time

    from sloserve.client import Client, GenerationResult, build_request

    request = build_request(
        args.prompt,
        slo_class=args.slo_class,
        ttft_s=args.ttft_ms / 1000 if args.ttft_ms is not None else None,
        tpot_s=args.tpot_ms / 1000 if args.tpot_ms is not None else None,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        allow_best_effort=args.best_effort,
    )
    result = GenerationResult(sent_at=time.time())
    with Client(args.endpoint, timeout_s=args.timeout) as client:
        for response in client.stream(request):
            result.feed(response, time.time())
            if response.WhichOneof("event") == "delta":
                sys.stdout.write(response.delta.text)
                sys.stdout.flush()
    outcome = result.slo_outcome
    verdict = "attained" if outcome.attained else "missed"
    mode = "best effort" if result.best_effort else f"class {result.class_name or '(budgets)'}"
    print()
    print(
        f"-- {result.completion_tokens} tokens ({result.finish_reason}), {mode}\n"
        f"-- TTFT {_ms(result.ttft_s)}, TPOT {_ms(result.mean_tpot_s)} (client clock)\n"
        f"-- SLO {verdict}: TTFT {'met' if outcome.ttft_met else 'missed'}, "
        f"TPOT {'met' if outcome.tpot_met else 'missed'} ({outcome.late_tokens} late tokens; "
        "server clock)"
    )
    return 0


def _add_health(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("health", help="check a server's gRPC health; optionally wait for SERVING")
    p.add_argument(
        "--endpoint", default="localhost:50051", help="HOST:PORT (default: localhost:50051)"
    )
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for SERVING")


def _run_health(args: argparse.Namespace) -> int:
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + args.wait
    with grpc.insecure_channel(args.endpoint) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as error:
                name = f"UNREACHABLE ({error.code().name})"
            if name == "SERVING" or time.monotonic() >= deadline:
                print(name)
                return 0 if name == "SERVING" else 1
            time.sleep(0.5)


def _add_gateway(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from sloserve.gateway.routing import POLICIES

    p = sub.add_parser("gateway", help="route requests to replicas by SLO (gRPC and OpenAI HTTP)")
    replicas = p.add_mutually_exclusive_group(required=True)
    replicas.add_argument(
        "--replica",
        action="append",
        metavar="HOST:PORT",
        help="a replica's gRPC endpoint; repeat for each replica",
    )
    replicas.add_argument(
        "--k8s-service",
        metavar="NAMESPACE/NAME",
        help="replicas from a Kubernetes Service's ready endpoints, watched "
        "($KUBECONFIG, else the pod's service account)",
    )
    p.add_argument(
        "--k8s-port",
        default="grpc",
        metavar="NAME_OR_NUMBER",
        help="the replicas' port in --k8s-service, by name or number (default: grpc)",
    )
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: all)")
    p.add_argument("--port", type=int, default=50050, help="gRPC port (default: 50050)")
    p.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="OpenAI-compatible HTTP port; -1 turns it off (default: 8000)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=9500,
        help="Prometheus /metrics port; -1 turns it off (default: 9500)",
    )
    p.add_argument(
        "--routing", choices=POLICIES, default="slack", help="routing policy (default: slack)"
    )
    p.add_argument(
        "--classes",
        type=Path,
        help="SLO classes YAML, the replicas' own (default: built-in classes)",
    )
    p.add_argument(
        "--model-name",
        action="append",
        help="model name the HTTP API serves; repeatable (default: sloserve)",
    )
    p.add_argument(
        "--queue-capacity",
        type=int,
        default=64,
        help="best-effort queue bound per SLO class (default: 64)",
    )
    p.add_argument(
        "--queue-ttl",
        type=float,
        default=30.0,
        help="seconds a request may wait in the best-effort queue (default: 30)",
    )
    p.add_argument(
        "--spill-max-in-flight",
        type=int,
        default=4,
        help="a replica takes queued best-effort work while running fewer requests (default: 4)",
    )
    p.add_argument(
        "--report-interval",
        type=float,
        default=0.25,
        help="seconds between the replicas' load reports (default: 0.25)",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        help="a replica silent this long during a call is treated as failed (default: 60)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=300.0,
        help="seconds SIGTERM waits for requests in flight (default: 300)",
    )
    p.add_argument(
        "--shutdown-delay",
        type=float,
        default=0.0,
        help="seconds after SIGTERM during which health says NOT_SERVING but requests are "
        "still served, before the drain: the time a load balancer takes to stop sending "
        "(default: 0; the operator's pods use 10)",
    )
    p.add_argument(
        "--api-keys",
        type=Path,
        metavar="PATH",
        help="API keys YAML (tenant, classes, rate limit per key), or a directory such as a "
        "mounted Secret; requests then need `Authorization: Bearer KEY` (default: off)",
    )
    p.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="TLS certificate chain (with --tls-key)"
    )
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="TLS private key (with --tls-cert)")
    p.add_argument(
        "--session-ttl",
        type=float,
        default=600.0,
        help="seconds a session stays pinned to its replica after its last round (default: 600)",
    )
    p.add_argument(
        "--http-max-body-bytes",
        type=int,
        default=2 * 1024 * 1024,
        help="largest HTTP request body; a larger one is answered 413 (default: 2 MiB)",
    )
    p.add_argument(
        "--http-header-timeout",
        type=float,
        default=30.0,
        help="seconds an HTTP connection may take to send a request's headers, from its "
        "opening or its previous response; idle keep-alive connections close after as long "
        "(default: 30)",
    )
    p.add_argument(
        "--http-body-timeout",
        type=float,
        default=60.0,
        help="seconds an HTTP request body may take to arrive whole; then 408 (default: 60)",
    )
    p.add_argument(
        "--http-write-timeout",
        type=float,
        default=60.0,
        help="seconds a write to an HTTP client that stopped reading may stall before the "
        "connection is closed; streams whose client reads are never cut (default: 60)",
    )
    p.add_argument(
        "--http-max-connections",
        type=int,
        default=1000,
        help="open HTTP connections; one more is answered 503 and closed (default: 1000)",
    )
    p.add_argument(
        "--max-sessions",
        type=int,
        default=100_000,
        help="sessions remembered for affinity, least recently used forgotten first "
        "(default: 100000)",
    )


def _run_gateway(args: argparse.Namespace) -> int:
    from sloserve.errors import FieldError
    from sloserve.gateway.http_limits import HttpLimits
    from sloserve.gateway.server import GatewaySettings, serve

    settings = GatewaySettings(
        replicas=tuple(args.replica or ()),
        host=args.host,
        port=args.port,
        http_port=None if args.http_port < 0 else args.http_port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        routing=args.routing,
        classes_file=args.classes,
        model_names=tuple(args.model_name or ("sloserve",)),
        queue_capacity=args.queue_capacity,
        queue_ttl_s=args.queue_ttl,
        spill_max_in_flight=args.spill_max_in_flight,
        report_interval_s=args.report_interval,
        stall_timeout_s=args.stall_timeout,
        drain_timeout_s=args.drain_timeout,
        shutdown_delay_s=args.shutdown_delay,
        api_keys=args.api_keys,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        session_ttl_s=args.session_ttl,
        max_sessions=args.max_sessions,
        k8s_service=args.k8s_service,
        k8s_port=args.k8s_port,
        http_limits=HttpLimits(
            max_body_bytes=args.http_max_body_bytes,
            header_timeout_s=args.http_header_timeout,
            body_timeout_s=args.http_body_timeout,
            write_timeout_s=args.http_write_timeout,
            max_connections=args.http_max_connections,
        ),
    )
    try:
        return asyncio.run(serve(settings))
    except FieldError as bad:
        if bad.field.startswith("api_keys"):  # names the entry: api_keys[2].classes
            print(f"error: --api-keys {args.api_keys}: {bad}", file=sys.stderr)
            return 2
        print(f"error: --{bad.field.replace('_', '-')}: {bad.description}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as error:  # a port in use, typically
        print(f"error: the gateway could not start: {error}", file=sys.stderr)
        return 1


def _add_up(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from sloserve.gateway.routing import POLICIES

    p = sub.add_parser("up", help="run N replicas and a gateway locally, until Ctrl-C")
    p.add_argument("--replicas", type=int, default=2, help="replica processes (default: 2)")
    p.add_argument(
        "--model",
        type=Path,
        default=Path(".models/tiny"),
        help="model directory (default: .models/tiny, built when missing)",
    )
    p.add_argument("--port", type=int, default=50050, help="gateway gRPC port (default: 50050)")
    p.add_argument("--http-port", type=int, default=8000, help="OpenAI HTTP port (default: 8000)")
    p.add_argument("--metrics-port", type=int, default=9500, help="metrics port (default: 9500)")
    p.add_argument(
        "--first-replica-port",
        type=int,
        default=50051,
        help="replica i listens on this port + i (default: 50051)",
    )
    p.add_argument("--routing", choices=POLICIES, default="slack")
    p.add_argument("--classes", type=Path, help="SLO classes YAML for replicas and gateway")
    p.add_argument("--kv-cache-gib", type=float, help="KV cache per replica (default: 1 on CPU)")
    p.add_argument(
        "--profile",
        type=Path,
        help="step-time profile the replicas plan with (default: MODEL/step-profile.json, "
        "measured first with `sloserve profile --quick` when missing)",
    )
    p.add_argument("--log-dir", type=Path, help="where process logs go (default: a temp dir)")
    p.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="where replicas run: local processes, or Ray actors (default: local)",
    )
    p.add_argument(
        "--ray-address",
        help="Ray cluster to place replicas on (--backend ray; default: start a local Ray)",
    )


def _run_up(args: argparse.Namespace) -> int:
    from sloserve.gateway.local_stack import StackSettings, run

    if args.replicas < 1:
        print("error: --replicas must be at least 1", file=sys.stderr)
        return 2
    if args.ray_address and args.backend != "ray":
        print("error: --ray-address needs --backend ray", file=sys.stderr)
        return 2
    if args.profile is not None and not args.profile.is_file():
        print(f"error: --profile: no profile file at {args.profile}", file=sys.stderr)
        return 2
    if not (args.model / "config.json").exists():
        if args.model != Path(".models/tiny"):
            print(f"error: --model: no model at {args.model}", file=sys.stderr)
            return 2
        from sloserve.tiny_model import build_model

        build_model(args.model)
    return run(
        StackSettings(
            model=args.model,
            replicas=args.replicas,
            port=args.port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            first_replica_port=args.first_replica_port,
            routing=args.routing,
            classes_file=args.classes,
            kv_cache_gib=args.kv_cache_gib,
            log_dir=args.log_dir,
            backend=args.backend,
            ray_address=args.ray_address,
            profile_file=args.profile,
        )
    )


def _run_bench(args: argparse.Namespace) -> int:
    from sloserve.bench import cli as bench_cli

    return bench_cli.main(args)


def _run_simulate(args: argparse.Namespace) -> int:
    from sloserve import simulate_cli

    return simulate_cli.main(args)


def _run_operator(args: argparse.Namespace) -> int:
    from sloserve.operator import main as operator_main

    return operator_main.run_operator(args)


def _run_crd(args: argparse.Namespace) -> int:
    from sloserve.operator import main as operator_main

    return operator_main.run_crd(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["vllm"]:  # vLLM's own CLI, every argument its own (sloserve/vllm_cli.py)
        from sloserve import vllm_cli

        return vllm_cli.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="sloserve",
        description="SLO-aware LLM serving",
        epilog="sloserve vllm ARGS...: vLLM's own command line (`vllm ARGS...`), e.g. "
        "`sloserve vllm bench serve --goodput ...`, where the `vllm` command cannot start",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_replica(sub)
    _add_profile(sub)
    _add_model(sub)
    _add_generate(sub)
    _add_health(sub)
    _add_gateway(sub)
    _add_up(sub)
    from sloserve.bench import cli as bench_cli

    bench_cli.add_parser(sub)
    from sloserve import simulate_cli

    simulate_cli.add_parser(sub)
    from sloserve.bench import published_profile

    published_profile.add_parser(sub)
    from sloserve.devcluster import cli as devcluster_cli

    devcluster_cli.add_parser(sub)
    from sloserve.operator import main as operator_main

    operator_main.add_parsers(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    runners = {
        "replica": _run_replica,
        "profile": _run_profile,
        "model": _run_model,
        "generate": _run_generate,
        "health": _run_health,
        "gateway": _run_gateway,
        "up": _run_up,
        "bench": _run_bench,
        "simulate": _run_simulate,
        "profile-published": published_profile.main,
        "devcluster": devcluster_cli.main,
        "operator": _run_operator,
        "crd": _run_crd,
    }
    try:
        return runners[args.command](args)
    except SloserveError as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
