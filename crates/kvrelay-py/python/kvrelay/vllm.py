"""kvrelay as a vLLM v1 KV connector.

Use it with::

    --kv-transfer-config '{"kv_connector": "KvrelayConnector",
                           "kv_connector_module_path": "kvrelay.vllm",
                           "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
                           "kv_connector_extra_config": {...}}'

and ``LMCACHE_CONFIG_FILE`` naming an LMCache YAML file; both are parsed by kvrelay's
strict Rust config code. vLLM builds this class twice: with the scheduler role in its
EngineCore process and with the worker role in each Worker process. This module only
translates vLLM's objects into plain values; every decision and every byte moved is in
Rust (``kvrelay._native``), which releases the GIL while it looks up, copies or waits.

What works so far, and what is refused with a clear error, is in the README section
"kvrelay with vLLM".
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvrelay import _native

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# If set, the worker half writes its transfer totals to this file (JSON, replaced
# atomically) whenever they change, so a caller outside vLLM's processes can read them.
STATS_FILE_ENV = "KVRELAY_STATS_FILE"


class KvrelayConnectorMetadata(KVConnectorMetadata):
    """One step's work, encoded by the Rust scheduler half; vLLM pickles it as bytes.
    ``None`` on a step with no KV to move: the worker's hooks then return at once,
    without calling into Rust."""

    def __init__(self, encoded: bytes | None) -> None:
        self.encoded = encoded


@dataclasses.dataclass
class KvrelayConnectorStats(KVConnectorStats):
    """kvrelay's transfer figures over an interval, as sums: ``loaded_tokens`` (the hit
    tokens loaded into vLLM's cache), ``loaded_bytes``, ``load_seconds``,
    ``failed_load_tokens``, ``saved_chunks``, ``saved_bytes``, ``save_seconds``,
    ``skipped_saves``, ``failed_sends``, ``pd_skipped_chunks``. vLLM adds up the workers'
    and the steps' figures with ``aggregate`` and logs ``reduce``'s."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KvrelayConnectorStats:
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        figures = dict(self.data)
        for moved, seconds, rate in (
            ("loaded_bytes", "load_seconds", "load_gb_per_s"),
            ("saved_bytes", "save_seconds", "save_gb_per_s"),
        ):
            if figures.get(seconds):
                figures[rate] = round(figures.get(moved, 0) / figures[seconds] / 1e9, 3)
        return figures

    def is_empty(self) -> bool:
        return not any(self.data.values())


def _engine(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> dict[str, Any]:
    """What vLLM's config says about the engine, as plain values for Rust."""
    from vllm.platforms import current_platform

    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    cache = vllm_config.cache_config
    kv_dtype = cache.cache_dtype
    if kv_dtype == "auto":
        kv_dtype = str(model.dtype).removeprefix("torch.")
    return {
        "model": model.model,
        "num_layers": model.get_num_layers(parallel),
        "num_kv_heads": model.get_num_kv_heads(parallel),
        "head_size": model.get_head_size(),
        "kv_dtype": kv_dtype,
        "block_size": cache.block_size,
        "num_blocks": kv_cache_config.num_blocks if kv_cache_config is not None else 0,
        "world_size": parallel.world_size,
        "rank": parallel.rank,
        "device_type": current_platform.device_type,
        "cpu_attn_isa": _cpu_attention_isa(vllm_config) if current_platform.device_type == "cpu" else None,
    }


def _kv_transfer_config_json(vllm_config: VllmConfig) -> str:
    """vLLM's KVTransferConfig, every field, for kvrelay's strict parser."""
    config = vllm_config.kv_transfer_config
    return json.dumps({f.name: getattr(config, f.name) for f in dataclasses.fields(config)})


def describe_tensor(name: str, tensor: torch.Tensor, backend: str, part: int | None = None) -> dict[str, Any]:
    """A KV cache tensor as plain values; Rust decides whether it can be moved. ``part``:
    its place in the layer's ``(K, V)`` tuple (vllm-ascend registers one per layer)."""
    return {
        "name": name,
        "part": part,
        "device": tensor.device.type,
        "device_index": tensor.device.index,
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "element_size": tensor.element_size(),
        "shape": list(tensor.shape),
        "strides": list(tensor.stride()),
        "data_ptr": tensor.data_ptr(),
        "backend": backend,
    }


def describe_kv_caches(
    kv_caches: dict[str, torch.Tensor | tuple[torch.Tensor, ...]], backends: dict[str, str]
) -> list[dict[str, Any]]:
    """Every registered tensor as plain values: one per layer, or each of a layer's
    ``(K, V)`` tuple."""
    described = []
    for name, cache in kv_caches.items():
        backend = backends.get(name, "unknown")
        if isinstance(cache, (tuple, list)):
            described += [describe_tensor(name, part, backend, i) for i, part in enumerate(cache)]
        else:
            described.append(describe_tensor(name, cache, backend))
    return described


def _attention_backends(vllm_config: VllmConfig, layer_names: list[str]) -> dict[str, str]:
    """Each layer's attention backend name (``CPU_ATTN`` on vLLM's CPU build)."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
    return {name: layer.attn_backend.get_name() for name, layer in layers.items()}


def _cpu_attention_isa(vllm_config: VllmConfig) -> str:
    """The instruction set vLLM CPU packs KV blocks for: the builder's own rule, asked
    with the builder's own inputs (model dtype, block size, head size, cache dtype).
    Rust checks the registered tensors against the same block and head size."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(
        vllm_config.model_config.dtype,
        vllm_config.cache_config.block_size,
        vllm_config.model_config.get_head_size(),
        vllm_config.cache_config.cache_dtype,
    )


class KvrelayConnector(KVConnectorBase_V1):
    """vLLM's KV connector over kvrelay (LMCache's semantics and config)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        engine = _engine(vllm_config, kv_cache_config)
        self._cpu_attn_isa: str | None = engine["cpu_attn_isa"]
        config_json = _kv_transfer_config_json(vllm_config)
        self._scheduler: _native.SchedulerConnector | None = None
        self._worker: _native.WorkerConnector | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = _native.SchedulerConnector(engine, config_json)
        else:
            self._worker = _native.WorkerConnector(engine, config_json)
        # The registered tensors: kept referenced while Rust holds their addresses.
        self._kv_caches: dict[str, torch.Tensor | tuple[torch.Tensor, ...]] | None = None
        # Each registered layer's index, in the order Rust registered the tensors.
        self._layer_index: dict[str, int] = {}
        self._stats_file = os.environ.get(STATS_FILE_ENV)
        self._last_stats: dict[str, Any] | None = None
        # Whether Rust holds this step's metadata (a step with KV to move), and whether it
        # has loads in the background that only get_finished reports: the idle hooks'
        # fast paths.
        self._bound = False
        self._background_loads = False
        self._new_errors = self._new_stats = False

    # ---- worker half ----

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor | tuple[torch.Tensor, ...]]) -> None:
        assert self._worker is not None
        names = list(kv_caches)
        backends = _attention_backends(self._vllm_config, names)
        tensors = describe_kv_caches(kv_caches, backends)
        # The CPU attention ISA matters only for vLLM CPU's CPU_ATTN cache; Rust refuses
        # everything else it cannot move, saying what it saw.
        isa = self._cpu_attn_isa if any(t["backend"] == "CPU_ATTN" for t in tensors) else None
        self._worker.register_kv_caches(tensors, isa)
        self._kv_caches = kv_caches
        self._layer_index = {name: i for i, name in enumerate(names)}

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert self._worker is not None and isinstance(connector_metadata, KvrelayConnectorMetadata)
        if connector_metadata.encoded is not None:
            self._worker.bind_connector_metadata(connector_metadata.encoded)
            self._bound = True

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        if self._bound:
            assert self._worker is not None
            self._worker.clear_connector_metadata()
            self._bound = False

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if self._bound:
            assert self._worker is not None
            self._background_loads = self._worker.start_load_kv()
            self._worked()

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Synchronous loads complete inside start_load_kv; asynchronous ones fill the
        # blocks of requests vLLM runs only once get_finished has reported them.
        return

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: Any,
        **kwargs: Any,
    ) -> None:
        # vLLM calls this after the layer's attention wrote its KV into the cache. A PD
        # prefiller sends that layer of a reserved request's chunks now; other saves run
        # for all layers in wait_for_save.
        if self._bound:
            assert self._worker is not None
            self._worker.save_kv_layer(self._layer_index[layer_name])

    def wait_for_save(self) -> None:
        if self._bound:
            assert self._worker is not None
            self._worker.wait_for_save()
            self._worked()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        finished: tuple[set[str] | None, set[str] | None] = (None, None)
        # Only loads in the background end outside start_load_kv.
        if self._background_loads:
            assert self._worker is not None
            sending, receiving = self._worker.get_finished(finished_req_ids)
            finished = (sending or None, receiving or None)
            self._worked()
        if self._stats_file:
            self._write_stats()
        return finished

    def _worked(self) -> None:
        """Rust moved KV or collected loads: it may have new figures and load errors."""
        self._new_errors = self._new_stats = True

    def get_block_ids_with_load_errors(self) -> set[int]:
        if not self._new_errors:
            return set()
        assert self._worker is not None
        self._new_errors = False
        return self._worker.get_block_ids_with_load_errors()

    def get_kv_connector_stats(self) -> KvrelayConnectorStats | None:
        """What moved since vLLM last asked (once a step); None when nothing did. The
        scheduler half moves nothing and answers None."""
        if self._worker is None or not self._new_stats:
            return None
        self._new_stats = False
        interval = self._worker.interval_stats()
        return KvrelayConnectorStats(data=interval) if interval is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvrelayConnectorStats:
        return KvrelayConnectorStats(data=dict(data or {}))

    def stats(self) -> dict[str, Any]:
        """The worker half's transfer totals."""
        assert self._worker is not None
        return self._worker.stats()

    def _write_stats(self) -> None:
        stats = self.stats()
        if stats == self._last_stats:
            return
        temporary = f"{self._stats_file}.{os.getpid()}.tmp"
        with open(temporary, "w") as f:
            json.dump(stats, f)
        os.replace(temporary, self._stats_file)
        self._last_stats = stats

    # ---- scheduler half ----

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        params = request.kv_transfer_params
        return self._scheduler.get_num_new_matched_tokens(
            request.request_id,
            request.prompt_token_ids,
            json.dumps(params) if params is not None else None,
            num_computed_tokens,
        )

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self._scheduler is not None
        (block_ids,) = blocks.get_block_ids()
        self._scheduler.update_state_after_alloc(request.request_id, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        scheduled = scheduler_output.num_scheduled_tokens
        new = [
            (r.req_id, r.block_ids[0], r.num_computed_tokens + scheduled[r.req_id])
            for r in scheduler_output.scheduled_new_reqs
        ]
        cached_reqs = scheduler_output.scheduled_cached_reqs
        cached = [
            (
                req_id,
                new_block_ids[0] if new_block_ids is not None else [],
                req_id in cached_reqs.resumed_req_ids,
                num_computed + scheduled[req_id],
            )
            for req_id, new_block_ids, num_computed in zip(
                cached_reqs.req_ids,
                cached_reqs.new_block_ids,
                cached_reqs.num_computed_tokens,
            )
        ]
        # None on a step with no KV to move.
        return KvrelayConnectorMetadata(self._scheduler.build_connector_meta(new, cached))

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        delay_free, params = self._scheduler.request_finished(request.request_id)
        return delay_free, json.loads(params) if params is not None else None
