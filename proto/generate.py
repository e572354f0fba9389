"""Regenerates the Python code for the gRPC API from proto/ into sloserve/v1.

Run `python proto/generate.py` after editing a .proto file; a test fails when the committed
code is stale. `--out DIR` writes elsewhere (the staleness test compares the two).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.glob("sloserve/v1/*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py under out_root/sloserve/v1."""
    import grpc_tools
    from google.rpc import status_pb2
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # google/rpc/*.proto, shipped with googleapis-common-protos.
    googleapis = Path(status_pb2.__file__).parents[2]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"-I{googleapis}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    (out_root / "sloserve" / "v1").mkdir(parents=True, exist_ok=True)
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return sorted((out_root / "sloserve" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT, help="root to write sloserve/v1 under"
    )
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
