"""Orchestration. The stage functions: the stages in order (`stages`), `run` (imported data),
`ingest`, and the local services they start (`services`: Valkey, uvicorn processes); above the
experiments and the bench, the `loopfm` command line (`cli`, with `checks` made before each
command) and `demo`. The only code that picks an engine (loopfm/core/engine.py) and chains
stages; no stage imports it."""
