#!/usr/bin/env bash
# `make container-test`: build the serving and pipeline images with podman, run
# docker-compose.yml for real with podman-compose (Redis, the one-shot materialize job, the
# server) on the finished run in runs/demo, and check what a user would rely on: the job
# succeeds on a read-only run, /readyz answers, /score equals the host's for the same request,
# both images run as uid 10001, the serving image has no torch, no Feast SDK, no compiler and
# no build leftovers, and its health check passes. Prints image sizes and step times.
#
# Needs root for apt-get (podman, runc, debootstrap are installed when missing) and for
# debootstrap, which makes stand-ins for python:3.11-slim and redis:7 when no container registry
# answers. Environment: LOOPFM_CT_WORK (scratch folder, default /tmp/loopfm-container-test),
# LOOPFM_WHEELS (wheels offered to the pipeline build when PyTorch's CPU index is unreachable,
# default /opt/wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${LOOPFM_CT_WORK:-/tmp/loopfm-container-test}
WHEELS=${LOOPFM_WHEELS:-/opt/wheels}
PY=.venv/bin/python
PODMAN_COMPOSE=podman-compose==1.6.0
START=$SECONDS
HOST_PID=""

step() { echo "[container-test $(( SECONDS - START )) s] $*"; }
fail() { echo "container-test: FAIL: $*" >&2; exit 1; }
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_ready() {  # URL SECONDS: until GET URL/readyz answers 200
  for _ in $(seq "$(( $2 * 2 ))"); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$1/readyz")" = 200 ] && return 0
    sleep 0.5
  done
  return 1
}

[ -x "$PY" ] || fail "no .venv: run \`make demo\` first"
[ -f runs/demo/vm/loopfm_kd/onnx/model.onnx ] || fail "no finished run in runs/demo: run \`make demo\` first"
hidden=$(find -L runs/demo \( -type d ! -perm -o=rx -o -type f ! -perm -o=r \) -print -quit)
[ -z "$hidden" ] || fail "$hidden is not readable by other users (the containers run as uid 10001; a run made \
before loopfm gave staged folders a plain mode): chmod -R a+rX runs/demo"
mkdir -p "$WORK"

step "tools"
missing=$(for t in podman runc debootstrap curl; do command -v "$t" >/dev/null || echo "$t"; done)
if [ -n "$missing" ]; then
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || fail "missing: $missing (Debian: apt-get install podman runc debootstrap curl, as root)"
  apt-get update -qq && apt-get install -y -qq podman runc debootstrap curl >/dev/null
fi
[ -x "$WORK/venv/bin/podman-compose" ] || { python3 -m venv "$WORK/venv" \
  && "$WORK/venv/bin/pip" install -q "$PODMAN_COMPOSE" >"$WORK/pip.log" 2>&1; } || fail "pip install $PODMAN_COMPOSE (see $WORK/pip.log)"
# runc rather than crun (crun refuses a hybrid cgroup v1/v2 tree) and ulimits within the hard
# limits (podman's default nofile=1048576 needs CAP_SYS_RESOURCE): both hold on any host.
export CONTAINERS_CONF=$WORK/containers.conf
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=32768:32768"]
[engine]
runtime = "runc"
EOF

step "base images (pulled, else stand-ins)"
pull_or() {  # IMAGE COMMAND...: pull IMAGE, else keep the local one, else run COMMAND to make it
  timeout 600 podman pull -q "$1" >/dev/null 2>&1 && { echo "  $1: pulled"; return; }
  podman image exists "$1" && { echo "  $1: local (no registry answered)"; return; }
  echo "  $1: no registry answered, building a stand-in"
  shift; "$@"
}
build() {  # Docker format keeps the HEALTHCHECK; builds reach PyPI and Debian as the host does
  podman build --format docker --network host --pull=never "$@" >>"$WORK/build.log" 2>&1 \
    || { tail -20 "$WORK/build.log"; fail "podman build $* (log: $WORK/build.log)"; }
}
: >"$WORK/build.log"
pull_or docker.io/library/python:3.11-slim containers/standin-base.sh "$WORK"
pull_or docker.io/library/redis:7 build -t docker.io/library/redis:7 -f containers/redis-standin.Containerfile containers

step "serving image"
build -t loopfm-serve .
pipeline_mounts=()
if ! curl -s -o /dev/null --max-time 10 https://download.pytorch.org/whl/cpu/; then
  # PyTorch's CPU index is unreachable: let pip fail on it at once and find torch in $WHEELS.
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\nretries = 0\nfind-links = /wheels\n' >"$WORK/pip.conf"
  pipeline_mounts=(-v "$WORK/pip.conf:/etc/pip.conf:ro" -v "$WHEELS:/wheels:ro")
fi
step "pipeline image"
build "${pipeline_mounts[@]}" -t loopfm-pipeline -f Dockerfile.pipeline .
for image in loopfm-serve loopfm-pipeline; do
  echo "  $image: $(( $(podman image inspect --format '{{.Size}}' "$image") / 1000000 )) MB"
done

step "docker-compose.yml: redis, materialize, server"
export LOOPFM_PORT=$(free_port) LOOPFM_REDIS_PORT=$(free_port)
compose() { "$WORK/venv/bin/podman-compose" -p loopfm-ct -f docker-compose.yml -f containers/compose.test.yml "$@"; }
cleanup() {
  [ -n "$HOST_PID" ] && kill "$HOST_PID" 2>/dev/null
  compose down -t 5 >"$WORK/compose-down.log" 2>&1 || true
}
trap cleanup EXIT
compose down -t 5 >/dev/null 2>&1 || true
# One service at a time, as depends_on orders them: podman-compose ignores service_healthy before
# podman 4.6 and its --requires chain fails to start the server on podman 4.3.
container() { podman ps -aq --filter label=com.docker.compose.project=loopfm-ct --filter "label=com.docker.compose.service=$1"; }
up() { compose up -d --no-build --no-deps "$1" >>"$WORK/compose-up.log" 2>&1 || { cat "$WORK/compose-up.log"; fail "podman-compose up $1"; }; }
: >"$WORK/compose-up.log"
up redis
for _ in $(seq 30); do podman healthcheck run "$(container redis)" >/dev/null 2>&1 && break; sleep 1; done
podman healthcheck run "$(container redis)" >/dev/null || fail "redis never became healthy"
up materialize
MAT=$(container materialize)
code=$(timeout 900 podman wait "$MAT") || fail "the materialize job did not end within 15 min"
[ "$code" = 0 ] || { podman logs "$MAT" 2>&1 | tail -20; fail "the materialize job exited with $code"; }
echo "  materialize: exit 0: $(podman logs "$MAT" 2>&1 | tail -1 | cut -c1-70)..."
up server
SERVER=$(container server)
wait_ready "http://127.0.0.1:$LOOPFM_PORT" 90 || { podman logs "$SERVER" | tail -20; fail "the server's /readyz never answered 200"; }
echo "  server /readyz: $(curl -s "http://127.0.0.1:$LOOPFM_PORT/readyz")"

step "checks"
HOST_PORT=$(free_port)
REDIS_URL=redis://127.0.0.1:$LOOPFM_REDIS_PORT LOOPFM_MODEL_DIR=runs/demo/vm/loopfm_kd/onnx \
  .venv/bin/uvicorn serving.app:create_app --factory --host 127.0.0.1 --port "$HOST_PORT" --no-access-log \
  >"$WORK/host-server.log" 2>&1 &
HOST_PID=$!
wait_ready "http://127.0.0.1:$HOST_PORT" 60 || fail "the host's server did not start (see $WORK/host-server.log)"
"$PY" containers/compare_scores.py "http://127.0.0.1:$HOST_PORT" "http://127.0.0.1:$LOOPFM_PORT" \
  || fail "/score differs from the host's"
for image in loopfm-serve loopfm-pipeline; do
  uid=$(podman run --rm --no-healthcheck --entrypoint id "$image" -u)
  [ "$uid" = 10001 ] || fail "$image runs as uid $uid, not 10001"
done
[ "$(podman exec "$SERVER" id -u)" = 10001 ] || fail "the server container does not run as uid 10001"
echo "  both images and the server container run as uid 10001"
podman exec "$SERVER" python -c '
import importlib.util as u, sys
present = [m for m in ("torch", "feast", "loopfm.fm", "pip") if u.find_spec(m)]
sys.exit(f"  present: {present}" if present or not u.find_spec("onnxruntime") else 0)' \
  || fail "the serving image must hold onnxruntime and none of torch, feast, loopfm.fm, pip"
echo "  serving image: onnxruntime, no torch, no feast, no loopfm.fm, no pip"
leftovers=$(podman run --rm --no-healthcheck --entrypoint sh loopfm-serve -c \
  'find / -xdev -name "*.egg-info" 2>/dev/null; ls -d /src /app 2>/dev/null; command -v cc gcc; true')
[ -z "$leftovers" ] || fail "build leftovers in the serving image: $leftovers"
leftovers=$(podman run --rm --no-healthcheck --entrypoint sh loopfm-pipeline -c 'ls -d /app/build /app/*.egg-info 2>/dev/null || true')
[ -z "$leftovers" ] || fail "build leftovers in the pipeline image: $leftovers"
echo "  no build leftovers, no compiler"
[ -n "$(podman image inspect --format '{{.Config.Healthcheck}}' loopfm-serve | grep readyz)" ] \
  || fail "the serving image has no HEALTHCHECK"
podman healthcheck run "$SERVER" >/dev/null || fail "the server's health check failed"
echo "  health check: image HEALTHCHECK present, \`podman healthcheck run\` healthy"
step "passed"
