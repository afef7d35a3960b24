"""The train/serve contract: what training writes and the server reads (NumPy only).

Both sides import this package and it imports nothing else of loopfm, so the serving
install (the Dockerfile) takes it whole:
- `names`: the Feast project, entity join keys and their id types, feature views, features and feature
  services, the ONNX input names, the vocabulary sizes fixed by the canonical schema;
- `codec`: how an FM code is stored (int4 or fp32);
- `tensorize`: feature values -> model input arrays, the one function both sides call;
- `redis_url`: how one REDIS_URL names a single node or a Redis Cluster;
- `version`: the format version of every saved file, and its check.
"""
