"""One serving pod: vLLM with sloserve's SLO scheduler inside the engine, behind gRPC.

Where things are decided:
- `validation`: what a GenerateRequest means (or which field is wrong).
- `admission`: whether a validated request is taken now.
- `scheduler`: the scheduler class vLLM loads inside its engine-core process.
- `inference_service` / `control_service`: the gRPC services.
- `server`: process lifecycle (start-up, readiness, SIGTERM drain).
"""
