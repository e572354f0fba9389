"""The front door: routes each request to a replica that can still meet its SLO.

Where things are decided:
- `discovery`: which replicas exist (a static list now).
- `replica_pool`: one connection and load watch per replica; which are in rotation.
- `routing`: the order in which replicas are tried for one request.
- `spillover`: the best-effort queue for requests no replica admits.
- `dispatch`: one request's life across replicas (retries, spillover, failures).
- `grpc_service` / `http_api`: the two front doors (gRPC Inference, OpenAI-compatible HTTP).
- `metrics` / `slo_summary`: what the gateway measures on its own clock.
- `server`: process lifecycle (start-up, SIGTERM drain).
"""
