"""What the server, the SDK and the web UI must agree on, declared once.

The wire contract (`contract`), the request rules and limits (`rules`), the outpaint canvas
geometry (`canvas`), size buckets (`sizes`), the pipeline model's config parameters
(`settings`) and its metric names (`metrics`). Installed with the client (`sdserve-client`);
it imports numpy at most, never tritonclient, gradio or torch, so the Triton pipeline model
imports it alone.
"""
