"""The worker half's register_kv_caches and refusals, through the installed wheel: the
layouts it maps (vLLM CPU's CPU_ATTN, and on host memory the GPU FlashAttention /
FlashInfer shapes and vllm-ascend's (K, V) tuples), and KV caches kvrelay cannot move (a
CUDA tensor, an NPU tensor in a build without the ascend feature or on a machine without
CANN, an unknown layout) and
configs vLLM's two processes cannot share, which fail at once with an error that says
what was seen. Runs with pytest or as a plain script.

    python crates/kvrelay-py/tests/test_register_refusals.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from kvrelay import KvrelayConfigError, KvrelayError, KvrelayUnsupportedError, _native
from kvrelay.vllm import describe_kv_caches, describe_tensor

ENGINE = {
    "model": "/models/tiny-llama",
    "num_layers": 2,
    "num_kv_heads": 4,
    "head_size": 32,
    "kv_dtype": "float32",
    "block_size": 128,
    "num_blocks": 8,
    "world_size": 1,
    "rank": 0,
    "device_type": "cpu",
    "cpu_attn_isa": "vec",
}
PRODUCER = '{"kv_connector": "KvrelayConnector", "kv_connector_module_path": "kvrelay.vllm", "kv_role": "kv_producer"}'
WORK = Path(tempfile.mkdtemp(prefix="kvrelay-py-test-"))


def use_lmcache_config(text: str) -> None:
    """Points LMCACHE_CONFIG_FILE (read by Rust from the process environment) at `text`."""
    path = WORK / "lmcache.yaml"
    path.write_text(text)
    os.environ["LMCACHE_CONFIG_FILE"] = str(path)


def shared_disk_worker() -> _native.WorkerConnector:
    disk = WORK / f"disk-{len(list(WORK.iterdir()))}"
    use_lmcache_config(
        f'chunk_size: 256\nlocal_cpu: false\nlocal_disk: "file://{disk}/"\nmax_local_disk_size: 1\n'
    )
    return _native.WorkerConnector(ENGINE, PRODUCER)


def cpu_attn_caches() -> dict[str, torch.Tensor]:
    """What vLLM CPU registers: each layer [num_blocks, heads, block_size, 2 * head_size],
    views into one buffer."""
    buffer = torch.zeros(2, 8, 4, 128, 64, dtype=torch.float32)
    return {f"model.layers.{i}.self_attn.attn": buffer[i] for i in range(2)}


def describe_all(caches: dict, backend: str = "CPU_ATTN") -> list[dict]:
    return [describe_tensor(name, tensor, backend) for name, tensor in caches.items()]


def test_cpu_attn_caches_register_as_opaque_blocks() -> None:
    layout = shared_disk_worker().register_kv_caches(describe_all(cpu_attn_caches()), "vec")
    assert layout.startswith("opaque_blocks(cpu_attn_vec) over 2 buffers of 1048576 bytes"), layout


def test_a_cuda_tensor_is_refused_saying_what_it_saw() -> None:
    # No CUDA device here: a tensor-like object answering the calls the shell makes.
    fake = SimpleNamespace(
        device=SimpleNamespace(type="cuda", index=0),
        dtype=torch.bfloat16,
        element_size=lambda: 2,
        shape=(2, 8, 128, 4, 32),
        stride=lambda: (131072, 16384, 128, 32, 1),
        data_ptr=lambda: 0x7F0000000000,
    )
    tensors = [describe_tensor("model.layers.0.self_attn.attn", fake, "FLASH_ATTN")]
    try:
        shared_disk_worker().register_kv_caches(tensors, None)
    except KvrelayUnsupportedError as error:
        message = str(error)
        assert "device 'cuda'" in message, message
        assert "shape [2, 8, 128, 4, 32]" in message and "dtype bfloat16" in message, message
    else:
        raise AssertionError("a CUDA tensor was registered")


def fake_tensor(device: str, shape: tuple, stride: tuple) -> SimpleNamespace:
    """A tensor-like object on a device this machine has not, answering the calls the
    shell makes."""
    return SimpleNamespace(
        device=SimpleNamespace(type=device, index=0),
        dtype=torch.float32,
        element_size=lambda: 4,
        shape=shape,
        stride=lambda: stride,
        data_ptr=lambda: 0x7F0000000000,
    )


def test_an_npu_tensor_needs_the_ascend_feature_and_the_ascend_runtime() -> None:
    # vllm-ascend's per-layer (K, V) tuple, each [num_blocks, block_size, heads, head_size].
    shape, stride = (8, 128, 4, 32), (16384, 128, 32, 1)
    caches = {
        f"model.layers.{i}.self_attn.attn": (fake_tensor("npu", shape, stride), fake_tensor("npu", shape, stride))
        for i in range(2)
    }
    tensors = describe_kv_caches(caches, {})
    for i, tensor in enumerate(tensors):
        tensor["data_ptr"] += i * 524288
    if "npu" not in _native.NPU_DEVICES:
        try:
            shared_disk_worker().register_kv_caches(tensors, None)
        except KvrelayUnsupportedError as error:
            message = str(error)
            assert "device 'npu'" in message and "built without the ascend feature" in message, message
            assert "model.layers.0.self_attn.attn[0]: shape [8, 128, 4, 32]" in message, message
        else:
            raise AssertionError("an NPU tensor was registered by a build without the ascend feature")
        return
    # Built with the ascend feature: the worker half opens the NPU the tensors are on,
    # which needs CANN's runtime (loaded only now; this machine has none).
    use_lmcache_config(f'chunk_size: 256\nlocal_cpu: false\nlocal_disk: "file://{WORK}/disk-npu/"\nmax_local_disk_size: 1\n')
    worker = _native.WorkerConnector({**ENGINE, "device_type": "npu", "cpu_attn_isa": None}, PRODUCER)
    try:
        worker.register_kv_caches(tensors, None)
    except KvrelayError as error:
        assert "ascend:0" in str(error) and "libascendcl.so" in str(error), error
    else:
        raise AssertionError("an NPU tensor was registered on a machine without CANN")


def test_token_addressable_host_layouts_register_as_kvrelay_layouts() -> None:
    # A FlashInfer-shaped cache [num_blocks, 2, block_size, heads, head_size] on the CPU is
    # not packed per instruction set (that is CPU_ATTN's doing): its bytes are addressable
    # per token, so it maps to kvrelay's flash_infer_nhd layout and moves as KV_2LTD chunks.
    flashinfer = {f"model.layers.{i}.self_attn.attn": torch.zeros(8, 2, 128, 4, 32) for i in range(2)}
    layout = shared_disk_worker().register_kv_caches(describe_all(flashinfer, "FLASHINFER"), None)
    assert layout.startswith("flash_infer_nhd over 2 buffers of 1048576 bytes"), layout
    # FlashAttention's HND: the logical [2, NB, BS, H, D] over a [2, NB, H, BS, D] buffer.
    hnd = {f"model.layers.{i}.self_attn.attn": torch.zeros(2, 8, 4, 128, 32).transpose(2, 3) for i in range(2)}
    layout = shared_disk_worker().register_kv_caches(describe_all(hnd, "FLASH_ATTN"), None)
    assert layout.startswith("flash_attn_hnd over 2 buffers"), layout
    # vllm-ascend's (K, V) tuples, in host memory: two buffers per layer.
    ascend = {f"model.layers.{i}.self_attn.attn": (torch.zeros(8, 128, 4, 32), torch.zeros(8, 128, 4, 32)) for i in range(2)}
    layout = shared_disk_worker().register_kv_caches(describe_kv_caches(ascend, {}), None)
    assert layout.startswith("ascend_separate_kv over 4 buffers of 524288 bytes"), layout


def test_an_unknown_layout_is_refused_saying_what_it_saw() -> None:
    # Blocks innermost: no vLLM backend lays KV out like this.
    odd = {f"model.layers.{i}.self_attn.attn": torch.zeros(2, 128, 4, 32, 8) for i in range(2)}
    try:
        shared_disk_worker().register_kv_caches(describe_all(odd, "FLASH_ATTN"), None)
    except KvrelayUnsupportedError as error:
        message = str(error)
        assert "not a layout kvrelay knows" in message, message
        assert "shape [2, 128, 4, 32, 8]" in message and "backend FLASH_ATTN" in message, message
        assert "flash_attn_nhd shape [2, 8, 128, 4, 32]" in message, message
    else:
        raise AssertionError("an unknown layout was registered")
    # The right shape, transposed: not contiguous, so not CPU_ATTN's bytes.
    transposed = {name: t.transpose(1, 2).contiguous().transpose(1, 2) for name, t in cpu_attn_caches().items()}
    try:
        shared_disk_worker().register_kv_caches(describe_all(transposed), "vec")
    except KvrelayUnsupportedError as error:
        assert "strides" in str(error), error
    else:
        raise AssertionError("a non-contiguous cache was registered")


def test_a_worker_before_register_kv_caches_says_so() -> None:
    worker = shared_disk_worker()
    assert worker.interval_stats() is None
    try:
        worker.wait_for_save()
    except KvrelayError as error:
        assert "register_kv_caches" in str(error), error
    else:
        raise AssertionError("a worker saved before vLLM registered its KV cache")


def test_a_cpu_tier_alone_needs_a_lookup_channel_name() -> None:
    """The CPU tier lives in the worker; the scheduler half asks it on a lookup channel
    named by lmcache_rpc_port or engine_id, whose absence is a config error."""
    use_lmcache_config("chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 1\n")
    os.environ["KVRELAY_LOOKUP_DIR"] = str(WORK / "lookup")
    for half in (_native.WorkerConnector, _native.SchedulerConnector):
        try:
            half(ENGINE, PRODUCER)
        except KvrelayConfigError as error:
            assert "lookup channel" in str(error) and "engine_id" in str(error), error
        else:
            raise AssertionError(f"{half.__name__} accepted a CPU-only tier with no channel name")
    named = PRODUCER.replace('"kv_role"', '"engine_id": "py-test", "kv_role"')
    worker = _native.WorkerConnector(ENGINE, named)
    _native.SchedulerConnector(ENGINE, named)
    del worker


def test_config_typos_name_the_nearest_key() -> None:
    use_lmcache_config("chunk_size: 256\nlocal_disk: file:///tmp/x\nmax_local_disk_sise: 1\n")
    try:
        _native.SchedulerConnector(ENGINE, PRODUCER)
    except KvrelayConfigError as error:
        assert "did you mean 'max_local_disk_size'" in str(error), error
    else:
        raise AssertionError("a misspelled key was accepted")


if __name__ == "__main__":
    tests = [f for name, f in sorted(globals().items()) if name.startswith("test_")]
    failed = 0
    for test in tests:
        try:
            test()
            print(f"ok: {test.__name__}")
        except Exception as error:  # report every test, then fail
            failed += 1
            print(f"FAILED: {test.__name__}: {error!r}")
    print(f"{len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
