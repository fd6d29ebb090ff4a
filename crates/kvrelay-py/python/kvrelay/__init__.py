"""kvrelay: moves LLM KV cache between prefill and decode engines and across storage tiers.

The Rust core lives in ``kvrelay._native``; ``kvrelay.vllm`` holds the vLLM KV connector
(``kv_connector_module_path: "kvrelay.vllm"``, ``kv_connector: "KvrelayConnector"``).
"""

from kvrelay._native import KvrelayConfigError, KvrelayError, KvrelayUnsupportedError

__all__ = ["KvrelayConfigError", "KvrelayError", "KvrelayUnsupportedError"]
