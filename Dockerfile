# The serving image: FastAPI + ONNX Runtime + redis-py. No torch, no Feast SDK, no FM code.
# Build: docker build -t loopfm-serve .   (podman/buildah: add --format docker, or the OCI
#        format drops the HEALTHCHECK)
# Run:   docker run -p 8000:8000 -v $PWD/runs/demo/vm/loopfm_kd/onnx:/model:ro \
#          -e REDIS_URL=redis://redis:6379 loopfm-serve
# Two stages: the first installs into a venv, the second gets only that venv (no sources, no
# build/ or *.egg-info, no pip cache, no pip).
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
# Only the serving path: the train/serve contract package (loopfm/contract: names, codec,
# tensorization) and the server.
COPY loopfm/__init__.py loopfm/
COPY loopfm/contract/ loopfm/contract/
COPY serving/ serving/
RUN /opt/venv/bin/pip install . && /opt/venv/bin/pip uninstall -y -q pip setuptools

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH LOOPFM_MODEL_DIR=/model \
    UVICORN_LIMIT_CONCURRENCY=1000
COPY --from=build /opt/venv /opt/venv
RUN useradd --system --uid 10001 loopfm
USER loopfm
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=2s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
# LOOPFM_WORKERS: uvicorn worker processes sharing the port, one per core the container may
# use (the server reads it too: one ONNX Runtime thread per worker when above 1).
ENV LOOPFM_WORKERS=1
CMD ["sh", "-c", "exec uvicorn serving.app:create_app --factory --host 0.0.0.0 --port 8000 --workers \"$LOOPFM_WORKERS\" \
     --loop uvloop --http httptools --no-access-log"]
