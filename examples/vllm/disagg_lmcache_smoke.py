"""Prefill and decode as two real vLLM processes sharing KV through kvrelay's disk tier.

The seed-000 smoke (vllm-rbln's ``run_disagg_lmcache_smoke.py``) on vLLM's CPU build.
``--role both`` makes a tiny random Llama locally (no hub access) and runs, each as its own
process (vLLM then starts its EngineCore and Worker processes): a plain vLLM run, then a
prefill engine (``kv_producer``) and a decode engine (``kv_consumer``), each loading
``kvrelay.vllm.KvrelayConnector`` over a shared LMCache disk tier. Decode must hit the
prefill's KV (``--require-lmcache-hit``), and its greedy token ids and logprobs must equal
the plain run's exactly. Prints a JSON summary with ``prefill``, ``decode`` and
``lmcache_hit_tokens``.

    python examples/vllm/disagg_lmcache_smoke.py --role both --strict-lmcache \\
        --require-lmcache-hit --min-lmcache-hit-tokens 256

``--corrupt-chunk`` damages a chunk file between the phases: decode must then report the
failed load, recompute, and still equal the plain run. ``--with-example-connector`` also
runs vLLM's own ExampleConnector as producer and consumer and compares with it.
``--async-loading`` sets LMCache's ``enable_async_loading: true``: decode then loads in
kvrelay's background loader while vLLM parks the request in ``WAITING_FOR_REMOTE_KVS``, and
schedules it once ``get_finished`` reports the load (or its failed blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

# The tiny model: hidden 128 with 4 heads gives head size 32, which vLLM CPU's attention
# supports (16 does not load).
WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
    "boxing matches near old stone bridges and rivers"
).split()
PROMPT_TEXT = " ".join(WORDS)
CHUNK_SIZE = 256
BLOCK_SIZE = 128
# vLLM CPU reserves one more core when any KV connector is set, so on a small machine a
# connector run would compute with more threads than the plain run, and float sums in
# another order change the last bits of some logprobs (measured on 2 cores: 1 thread plain,
# 2 with a connector). Every phase reserves the same number.
RESERVED_CPUS = "1"


def make_tiny_llama(directory: Path) -> None:
    """A random 2-layer Llama and a word-level tokenizer, saved where vLLM can load them."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(directory)


def write_lmcache_config(path: Path, disk: Path, async_loading: bool) -> None:
    """The seed's shared-disk LMCache config, with whole-block chunks for vLLM CPU."""
    path.write_text(
        f"chunk_size: {CHUNK_SIZE}\n"
        "local_cpu: true\n"
        "max_local_cpu_size: 1\n"
        f'local_disk: "file://{disk}/"\n'
        "max_local_disk_size: 1\n"
        "pre_caching_hash_algorithm: sha256_cbor\n"
        # vLLM CPU packs KV blocks per instruction set; partial blocks cannot move.
        "save_unfull_chunk: false\n"
        f"enable_async_loading: {str(async_loading).lower()}\n"
    )


def prompts(args: argparse.Namespace) -> list[str]:
    """Prompt i repeats the text prompt_repeat + i * stride times (the seed's batch)."""
    return [
        " ".join([PROMPT_TEXT] * (args.prompt_repeat + i * args.prefill_repeat_stride))
        for i in range(args.prefill_batch_size)
    ]


def kv_transfer_config(args: argparse.Namespace) -> dict | None:
    """kvrelay's connector for prefill/decode; vLLM's own ExampleConnector for the
    reference phases; none for the plain run."""
    if args.role == "plain":
        return None
    producer = args.role.endswith("prefill")
    if args.role.startswith("example-"):
        return {
            "kv_connector": "ExampleConnector",
            "kv_role": "kv_producer" if producer else "kv_consumer",
            "kv_connector_extra_config": {"shared_storage_path": args.shared_storage_path},
        }
    return {
        "kv_connector": "KvrelayConnector",
        "kv_connector_module_path": "kvrelay.vllm",
        "kv_role": "kv_producer" if producer else "kv_consumer",
        "engine_id": args.engine_id,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {},
    }


def run_phase(args: argparse.Namespace) -> dict:
    """One vLLM engine in this process: plain (no connector), prefill or decode."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        dtype="float32",
        enforce_eager=True,
        gpu_memory_utilization=0.5,
        max_model_len=2048,
        block_size=BLOCK_SIZE,
        max_num_seqs=max(4, args.prefill_batch_size),
        seed=0,
        # Every phase runs the model in a Worker process, as vLLM does whenever a connector
        # is set (see RESERVED_CPUS for the thread count).
        distributed_executor_backend="mp",
        kv_transfer_config=kv_transfer_config(args),
    )
    max_tokens = args.prefill_max_tokens if args.role.endswith("prefill") else args.decode_max_tokens
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1)
    started = time.monotonic()
    outputs = llm.generate(prompts(args), params)
    elapsed = time.monotonic() - started
    requests = []
    for out in outputs:
        completion = out.outputs[0]
        requests.append(
            {
                "prompt_tokens": len(out.prompt_token_ids),
                "num_cached_tokens": out.num_cached_tokens,
                "token_ids": list(completion.token_ids),
                # Every position's {token: logprob}, as exact floats (JSON keeps repr).
                "logprobs": [
                    sorted([token, lp.logprob] for token, lp in position.items())
                    for position in completion.logprobs
                ],
            }
        )
        # The line the seed's driver scans for.
        print(f"LMCache hit tokens: {out.num_cached_tokens} (request {out.request_id})", file=sys.stderr)
    phase = {"role": args.role, "generate_sec": elapsed, "requests": requests}
    stats_file = os.environ.get("KVRELAY_STATS_FILE")
    if stats_file and Path(stats_file).exists():
        phase["connector_stats"] = json.loads(Path(stats_file).read_text())
    phase["lmcache_hit_tokens"] = max(r["num_cached_tokens"] or 0 for r in requests)
    return phase


def spawn_phase(args: argparse.Namespace, role: str, work: Path, env: dict) -> dict:
    """Runs one phase as a child process (vLLM then starts its own EngineCore and Worker)."""
    result = work / f"{role}.json"
    command = [
        sys.executable, os.path.abspath(__file__),
        "--role", role,
        "--model", str(args.model),
        "--engine-id", args.engine_id,
        "--result-json", str(result),
        "--prompt-repeat", str(args.prompt_repeat),
        "--prefill-batch-size", str(args.prefill_batch_size),
        "--prefill-repeat-stride", str(args.prefill_repeat_stride),
        "--prefill-max-tokens", str(args.prefill_max_tokens),
        "--decode-max-tokens", str(args.decode_max_tokens),
        "--shared-storage-path", str(work / "example-storage"),
    ]  # fmt: skip
    phase_env = dict(env, KVRELAY_STATS_FILE=str(work / f"{role}-stats.json"))
    started = time.monotonic()
    # vLLM logs to stdout; this process's stdout carries only the summary.
    completed = subprocess.run(
        command,
        env=phase_env,
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr,
        timeout=args.phase_timeout_sec,
    )
    if completed.returncode != 0:
        raise SystemExit(f"the {role} phase failed (exit {completed.returncode})")
    phase = json.loads(result.read_text())
    phase["wall_sec"] = time.monotonic() - started
    return phase


def corrupt_a_chunk(disk: Path) -> str:
    """Flips bytes in the middle of the first chunk file (not its header)."""
    chunks = sorted(p for p in disk.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not chunks:
        raise SystemExit(f"no chunk file in {disk} to corrupt: the prefill saved nothing")
    target = chunks[0]
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    target.write_bytes(bytes(data))
    return str(target)


def differences(reference: dict, decode: dict, name: str) -> list[str]:
    """Where decode's greedy tokens or logprobs differ from a reference run's, exactly."""
    problems = []
    for i, (want, got) in enumerate(zip(reference["requests"], decode["requests"], strict=True)):
        if want["token_ids"] != got["token_ids"]:
            problems.append(f"request {i}: token ids {got['token_ids']} != {name} {want['token_ids']}")
        elif want["logprobs"] != got["logprobs"]:
            first = next(
                p for p, (a, b) in enumerate(zip(want["logprobs"], got["logprobs"])) if a != b
            )
            problems.append(
                f"request {i}: logprobs differ from {name} at position {first}: "
                f"{got['logprobs'][first]} != {want['logprobs'][first]}"
            )
    return problems


def max_logprob_difference(reference: dict, decode: dict) -> float:
    """The largest |logprob difference| over every position and candidate token."""
    return max(
        (
            abs(a[1] - b[1])
            for want, got in zip(reference["requests"], decode["requests"], strict=True)
            for want_position, got_position in zip(want["logprobs"], got["logprobs"])
            for a, b in zip(want_position, got_position)
        ),
        default=0.0,
    )


def run_both(args: argparse.Namespace) -> dict:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kvrelay-vllm-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.model:
        args.model = str(work / "tiny-llama")
        make_tiny_llama(Path(args.model))
    disk = work / "disk"
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", RESERVED_CPUS)
    if args.lmcache_config_file:
        env["LMCACHE_CONFIG_FILE"] = args.lmcache_config_file
    else:
        config = work / "lmcache.yaml"
        write_lmcache_config(config, disk, args.async_loading)
        env["LMCACHE_CONFIG_FILE"] = str(config)
    args.engine_id = args.engine_id or f"kvrelay-disagg-{uuid.uuid4()}"
    if args.reference_json:
        references = json.loads(Path(args.reference_json).read_text())["references"]
    else:
        references = {"plain": spawn_phase(args, "plain", work, env)}
        if args.with_example_connector:
            spawn_phase(args, "example-prefill", work, env)
            references["example-decode"] = spawn_phase(args, "example-decode", work, env)
    prefill = spawn_phase(args, "prefill", work, env)
    corrupted = corrupt_a_chunk(disk) if args.corrupt_chunk else None
    decode = spawn_phase(args, "decode", work, env)
    stats = decode.get("connector_stats", {})
    plain = references["plain"]
    summary = {
        "engine_id": args.engine_id,
        "work_dir": str(work),
        "references": references,
        "prefill": prefill,
        "decode": decode,
        "lmcache_hit_tokens": decode["lmcache_hit_tokens"],
        "loaded_tokens": stats.get("loaded_tokens", 0),
        "failed_load_tokens": stats.get("failed_load_tokens", 0),
        "async_loading": args.async_loading,
        "background_loader": stats.get("background_loader", False),
        "corrupted_chunk": corrupted,
        "max_logprob_difference_to_plain": max_logprob_difference(plain, decode),
    }
    # Greedy token ids and logprobs equal the plain run's exactly (and, when it ran, those
    # of vLLM's own ExampleConnector loading the same prompt).
    problems = []
    for name, reference in references.items():
        mismatches = differences(reference, decode, name)
        summary[f"equal_to_{name}"] = not mismatches
        problems += mismatches
    if args.strict_lmcache and "connector_stats" not in prefill:
        problems.append("prefill: kvrelay's connector reported no statistics (was it loaded?)")
    # An asynchronous load that fails is reported before vLLM schedules the request, so vLLM
    # counts the tokens it then recomputes as not cached: the failed load is the hit's trace.
    hit_recomputed = corrupted and args.async_loading
    if args.require_lmcache_hit and not hit_recomputed and summary["lmcache_hit_tokens"] < args.min_lmcache_hit_tokens:
        problems.append(
            f"decode hit {summary['lmcache_hit_tokens']} tokens, fewer than --min-lmcache-hit-tokens {args.min_lmcache_hit_tokens}"
        )
    if summary["background_loader"] != args.async_loading:
        problems.append(f"enable_async_loading is {args.async_loading}, but decode's background loader ran: {summary['background_loader']}")
    if corrupted:
        # The damaged chunk must be a failed load that vLLM recomputed, not loaded KV.
        if summary["failed_load_tokens"] < CHUNK_SIZE or summary["loaded_tokens"] != 0:
            problems.append(
                f"after corrupting {corrupted} decode loaded {summary['loaded_tokens']} tokens and reported {summary['failed_load_tokens']} failed"
            )
    elif args.require_lmcache_hit and summary["loaded_tokens"] < args.min_lmcache_hit_tokens:
        problems.append(f"kvrelay loaded {summary['loaded_tokens']} tokens, fewer than --min-lmcache-hit-tokens")
    summary["problems"] = problems
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--role",
        choices=["both", "plain", "prefill", "decode", "example-prefill", "example-decode"],
        default="both",
    )
    parser.add_argument("--model", default="", help="model directory; a tiny random Llama is made when empty")
    parser.add_argument("--work-dir", default="", help="model, disk tier and phase results (a new temp dir when empty)")
    parser.add_argument("--lmcache-config-file", default="", help="LMCache YAML; a shared-disk one is written when empty")
    parser.add_argument("--engine-id", default="", help="shared by both phases; generated when empty")
    parser.add_argument("--prompt-repeat", type=int, default=15, help="15 repeats: 315 tokens")
    parser.add_argument("--prefill-batch-size", type=int, default=1)
    parser.add_argument("--prefill-repeat-stride", type=int, default=1)
    parser.add_argument("--prefill-max-tokens", type=int, default=1)
    parser.add_argument("--decode-max-tokens", type=int, default=32)
    parser.add_argument("--strict-lmcache", action="store_true", help="fail unless kvrelay's connector ran")
    parser.add_argument("--require-lmcache-hit", action="store_true")
    parser.add_argument("--min-lmcache-hit-tokens", type=int, default=1)
    parser.add_argument("--async-loading", action="store_true", help="enable_async_loading: true in the generated config")
    parser.add_argument("--corrupt-chunk", action="store_true", help="damage a chunk file between the phases")
    parser.add_argument("--reference-json", default="", help="reuse the reference runs of an earlier summary (its 'references')")
    parser.add_argument("--with-example-connector", action="store_true", help="also compare with vLLM's ExampleConnector (two more phases)")
    parser.add_argument("--shared-storage-path", default="", help="ExampleConnector's directory (reference phases)")
    parser.add_argument("--phase-timeout-sec", type=int, default=600)
    parser.add_argument("--result-json", default="", help="where a single phase writes its result")
    args = parser.parse_args()

    if (args.corrupt_chunk or args.async_loading) and args.lmcache_config_file:
        parser.error("--corrupt-chunk and --async-loading apply to the generated config; drop --lmcache-config-file")
    if args.role == "both":
        summary = run_both(args)
        print(json.dumps(summary))
        for problem in summary["problems"]:
            print(f"FAIL: {problem}", file=sys.stderr)
        return 1 if summary["problems"] else 0
    phase = run_phase(args)
    text = json.dumps(phase)
    if args.result_json:
        Path(args.result_json).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
