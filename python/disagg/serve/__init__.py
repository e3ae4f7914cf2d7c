"""The reference server: ``python -m disagg.serve`` (or under ``torchrun``), an OpenAI-compatible
HTTP frontend on rank 0 routing requests to prefill and decode worker pools."""
