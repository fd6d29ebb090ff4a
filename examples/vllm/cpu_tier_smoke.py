"""One vLLM engine whose only kvrelay tier is a CPU tier: the same prompt twice.

vLLM runs the connector's scheduler half in its EngineCore process and its worker half in a
Worker process; the CPU tier lives in the worker, and the scheduler half looks it up through
kvrelay's lookup channel. With vLLM's own prefix cache off, the second run of the prompt
must hit at least ``--min-hit-tokens`` from kvrelay's CPU tier, and its greedy token ids and
logprobs must equal the first run's exactly. Prints a JSON summary; exits 1 on a problem.

    python examples/vllm/cpu_tier_smoke.py --min-hit-tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

from disagg_lmcache_smoke import BLOCK_SIZE, CHUNK_SIZE, PROMPT_TEXT, RESERVED_CPUS, differences, make_tiny_llama


def generate(llm, prompt: str) -> dict:
    """One greedy request; its tokens, logprobs and the tokens vLLM got from the connector."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=1)
    out = llm.generate([prompt], params)[0]
    completion = out.outputs[0]
    return {
        "prompt_tokens": len(out.prompt_token_ids),
        "num_cached_tokens": out.num_cached_tokens or 0,
        "token_ids": list(completion.token_ids),
        "logprobs": [sorted([t, lp.logprob] for t, lp in p.items()) for p in completion.logprobs],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="", help="model and config (a new temp dir when empty)")
    parser.add_argument("--model", default="", help="model directory; a tiny random Llama is made when empty")
    parser.add_argument("--min-hit-tokens", type=int, default=256)
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kvrelay-vllm-cpu-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or str(work / "tiny-llama")
    if not args.model:
        make_tiny_llama(Path(model))
    config = work / "lmcache.yaml"
    config.write_text(
        f"chunk_size: {CHUNK_SIZE}\nlocal_cpu: true\nmax_local_cpu_size: 0.1\n"
        "pre_caching_hash_algorithm: sha256_cbor\nsave_unfull_chunk: false\n"
    )
    os.environ["LMCACHE_CONFIG_FILE"] = str(config)
    os.environ["KVRELAY_STATS_FILE"] = str(work / "stats.json")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", RESERVED_CPUS)
    from vllm import LLM

    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        block_size=BLOCK_SIZE,
        seed=0,
        enable_prefix_caching=False,
        distributed_executor_backend="mp",
        kv_transfer_config={
            "kv_connector": "KvrelayConnector",
            "kv_connector_module_path": "kvrelay.vllm",
            "kv_role": "kv_both",
            "engine_id": f"kvrelay-cpu-{uuid.uuid4()}",
            "kv_load_failure_policy": "recompute",
        },
    )
    prompt = " ".join([PROMPT_TEXT] * 15)  # 315 tokens: one whole chunk of 256 and a tail
    first = {"requests": [generate(llm, prompt)]}
    second = {"requests": [generate(llm, prompt)]}
    stats_file = work / "stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    hit = second["requests"][0]["num_cached_tokens"]
    problems = differences(first, second, "the first run")
    if first["requests"][0]["num_cached_tokens"] != 0:
        problems.append(f"the first run hit {first['requests'][0]['num_cached_tokens']} tokens in an empty cache")
    if hit < args.min_hit_tokens:
        problems.append(f"the second run hit {hit} tokens, fewer than --min-hit-tokens {args.min_hit_tokens}")
    if stats.get("loaded_tokens", 0) < args.min_hit_tokens:
        problems.append(f"kvrelay's worker loaded {stats.get('loaded_tokens', 0)} tokens")
    summary = {
        "prompt_tokens": second["requests"][0]["prompt_tokens"],
        "hit_tokens": hit,
        "loaded_tokens": stats.get("loaded_tokens", 0),
        "equal_to_first": not differences(first, second, "the first run"),
        "problems": problems,
    }
    print(json.dumps(summary))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
