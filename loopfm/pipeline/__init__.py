"""Orchestration: the `loopfm` command line (`cli`), the stages in order (`stages`), `demo`,
`run` (imported data) and `ingest`. The only code that picks an engine (loopfm/core/engine.py)
and chains stages; no stage imports it."""
