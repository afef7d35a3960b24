# The serving image: FastAPI + ONNX Runtime + redis-py. No torch, no Feast SDK, no FM code.
# Build: docker build -t loopfm-serve .
# Run:   docker run -p 8000:8000 -v $PWD/runs/demo/vm/loopfm_kd/onnx:/model:ro \
#          -e REDIS_URL=redis://redis:6379 loopfm-serve
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LOOPFM_MODEL_DIR=/model UVICORN_LIMIT_CONCURRENCY=1000
WORKDIR /app

COPY pyproject.toml README.md ./
# Only the serving path: the shared tensorization and codec, and the server.
COPY loopfm/__init__.py loopfm/
COPY loopfm/features/__init__.py loopfm/features/codec.py loopfm/features/tensorize.py loopfm/features/
COPY serving/ serving/
RUN pip install . && useradd --system --uid 10001 loopfm

USER loopfm
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=2s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
CMD ["uvicorn", "serving.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", \
     "--loop", "uvloop", "--http", "httptools", "--no-access-log"]
