"""The pipeline's stages on more than one process or machine (issue 6, docs/scaling.md)."""
