#!/bin/bash
# EC2 / self-hosted CI runner user-data: send Docker, containerd and podman
# pulls of Docker Hub images through the hubcap mirror. Set MIRROR_URL to the
# stack's MirrorUrl output (https://...). Idempotent.
set -euo pipefail
MIRROR_URL="${MIRROR_URL:-https://MIRROR_HOST}"
MIRROR_HOST="${MIRROR_URL#https://}"; MIRROR_HOST="${MIRROR_HOST%/}"

# Docker: registry-mirrors (merged into an existing daemon.json with jq if present).
mkdir -p /etc/docker
if [ -s /etc/docker/daemon.json ] && command -v jq >/dev/null; then
  jq --arg m "$MIRROR_URL" '.["registry-mirrors"] = [$m]' /etc/docker/daemon.json > /etc/docker/daemon.json.new
  mv /etc/docker/daemon.json.new /etc/docker/daemon.json
else
  printf '{\n  "registry-mirrors": ["%s"]\n}\n' "$MIRROR_URL" > /etc/docker/daemon.json
fi
systemctl restart docker 2>/dev/null || true

# containerd (also used by nerdctl and Kubernetes nodes).
mkdir -p /etc/containerd/certs.d/docker.io
cat > /etc/containerd/certs.d/docker.io/hosts.toml <<TOML
server = "https://registry-1.docker.io"

[host."https://${MIRROR_HOST}"]
  capabilities = ["pull", "resolve"]
TOML

# podman / buildah / skopeo.
mkdir -p /etc/containers/registries.conf.d
cat > /etc/containers/registries.conf.d/50-hubcap.conf <<TOML
[[registry]]
prefix = "docker.io"
location = "docker.io"

[[registry.mirror]]
location = "${MIRROR_HOST}"
TOML
