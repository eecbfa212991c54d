"""The operator's key: the header that opens Triton's control APIs on an sdserve server."""

from __future__ import annotations

ADMIN_KEY_HEADER = "sdserve-admin-key"
"""HTTP header carrying the operator's key, which opens Triton's control APIs (model
repository, shared memory, statistics, trace, logging) on an sdserve server."""

GRPC_ADMIN_KEY_HEADER = "triton-grpc-protocol-" + ADMIN_KEY_HEADER
"""The same over gRPC: Triton's gRPC frontend expects restricted-protocol headers with the
`triton-grpc-protocol-` prefix."""
