#!/usr/bin/env bash
# Validate the Kubernetes manifests offline against the API schemas (kubernetes-validate).
#
#   PYTHON=/path/to/python k8s/validate.sh        # a python with kubernetes-validate installed
#   K8S_VERSION=1.30.0 (default)                  # API version to validate against
#
# 1. Every resource file under k8s/ (kustomization.yaml files are not Kubernetes resources).
# 2. If kubectl or kustomize is on PATH: the rendered base and every overlay too, which is what
#    actually gets applied (namespaces, labels, image names filled in).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
k8s_version="${K8S_VERSION:-1.30.0}"
validate=("$python" -m kubernetes_validate -k "$k8s_version" --strict)

if ! "$python" -c 'import kubernetes_validate' 2>/dev/null; then
  echo "error: $python cannot import kubernetes_validate (pip install kubernetes-validate)" >&2
  exit 2
fi

mapfile -t files < <(find "$here" -type f \( -name '*.yaml' -o -name '*.yml' \) \
  ! -name 'kustomization.yaml' ! -name 'kustomization.yml' | sort)
echo "== resource files (${#files[@]}), Kubernetes $k8s_version, strict"
"${validate[@]}" "${files[@]}"

render=()
if command -v kustomize >/dev/null 2>&1; then
  render=(kustomize build)
elif command -v kubectl >/dev/null 2>&1; then
  render=(kubectl kustomize)
fi

if [ "${#render[@]}" -eq 0 ]; then
  echo "== kustomize/kubectl not found: rendered output not checked"
  exit 0
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for dir in "$here/base" "$here"/overlays/*/; do
  dir="${dir%/}"
  name="$(basename "$dir")"
  echo "== rendered: ${dir#"$here"/} (${render[*]})"
  "${render[@]}" "$dir" > "$out/$name.yaml"
  "${validate[@]}" "$out/$name.yaml"
done
