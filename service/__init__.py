"""The HTTP side: POST /v1.0/session/close and the operational endpoints."""
