"""kvrelay's connector against vLLM's own ExampleConnector, on real vLLM (CPU build).

The same tiny local Llama (made as ``disagg_lmcache_smoke.py`` makes it) and the same
prompts go through, each phase its own process (vLLM then starts its EngineCore and
Worker): a plain vLLM run, ExampleConnector as producer then consumer
(``shared_storage_path``), kvrelay as producer then consumer (shared disk tier). Prints one
JSON object with, per connector:

- ``ttft_ms``: the consumer's time to first token, the wall time of a ``max_tokens=1``
  generate of a prompt the producer stored (after a warm-up generate);
- ``load_gbps`` / ``save_gbps``: bytes of the files the producer wrote for that prompt
  (both connectors store and read whole files) over the time spent in the connector's own
  worker hooks (``start_load_kv`` + ``wait_for_layer_load``; ``save_kv_layer`` +
  ``wait_for_save``), timed by a subclass around each hook, the same way for both;
- ``idle``: decode with nothing to move (a prompt shorter than one block): ms per decode
  step end to end, against the plain run's, and the time spent in all worker hooks per
  decode step. The plain run goes first and last, to show how far the machine drifted.

Every figure is a median over ``--rounds`` rounds with min and max (the machine is shared
and noisy), and ``ratios`` compares kvrelay with ExampleConnector and both with the plain
run. A round with a missed load, or an idle round that moved bytes, is a problem (exit 1).

    python examples/vllm/bench_connector.py

vLLM imports the connector classes from this module (``kv_connector_module_path``
``bench_connector``): ``KvrelayConnector`` and ``ExampleConnector`` here are the real ones
with the hook timers added, under the real names (kvrelay's config accepts only its own).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from disagg_lmcache_smoke import (  # noqa: E402
    BLOCK_SIZE,
    RESERVED_CPUS,
    WORDS,
    make_tiny_llama,
    write_lmcache_config,
)

CONNECTORS = ("example", "kvrelay")
# The plain run goes first and last: the machine is shared, and the two bracket the drift
# of the baseline over the run.
PLAIN = ("plain", "plain-again")
PHASES = (PLAIN[0], "example-prefill", "example-decode", "kvrelay-prefill", "kvrelay-decode", PLAIN[1])

# The worker-side hooks vLLM calls every step, and which transfer their time counts for.
# kvrelay loads inside start_load_kv and saves inside wait_for_save; ExampleConnector loads
# in start_load_kv and saves in save_kv_layer: summing both hooks of a kind times both the
# same way.
TIMED_HOOKS = {
    "bind_connector_metadata": None,
    "start_load_kv": "load",
    "wait_for_layer_load": "load",
    "save_kv_layer": "save",
    "wait_for_save": "save",
    "get_finished": None,
    "get_block_ids_with_load_errors": None,
    "clear_connector_metadata": None,
}


def _timed_hook(method: Any, kind: str | None) -> Any:
    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            elapsed = time.perf_counter() - started
            if kind:
                self.bench_seconds[kind] += elapsed
            self.bench_step_hooks[-1] += elapsed

    return timed


def _with_hook_timers(base: type) -> type:
    """``base`` with each worker hook's time added to ``bench_seconds`` and to the current
    step's entry of ``bench_step_hooks`` (the timers themselves cost a few µs a step)."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, *args, **kwargs)
        self.bench_seconds = {"load": 0.0, "save": 0.0}
        # One entry per step (vLLM binds metadata first in every step), drained by
        # _worker_counters after each generate.
        self.bench_step_hooks = [0.0]

    def bind_connector_metadata(self: Any, metadata: Any) -> None:
        self.bench_step_hooks.append(0.0)
        base.bind_connector_metadata(self, metadata)

    namespace: dict[str, Any] = {"__init__": __init__, "bind_connector_metadata": bind_connector_metadata}
    for name, kind in TIMED_HOOKS.items():
        namespace[name] = _timed_hook(namespace.get(name, getattr(base, name)), kind)
    return type(base.__name__, (base,), namespace)


def __getattr__(name: str) -> type:
    """The timed connector classes, made when vLLM's worker asks for them, so that the
    driver process never imports vLLM."""
    if name == "KvrelayConnector":
        from kvrelay.vllm import KvrelayConnector as base
    elif name == "ExampleConnector":
        from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import (
            ExampleConnector as base,
        )
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    timed = _with_hook_timers(base)
    globals()[name] = timed
    return timed


def _worker_counters(worker: Any) -> dict[str, Any]:
    """Runs in vLLM's Worker process (``LLM.collective_rpc``): the hook timers, the hook
    time of each step since the last call, and kvrelay's own transfer totals."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    connector = get_kv_transfer_group()
    step_hooks, connector.bench_step_hooks = connector.bench_step_hooks[1:], [0.0]
    counters: dict[str, Any] = dict(connector.bench_seconds, step_hooks=step_hooks)
    if hasattr(connector, "stats"):
        counters["kvrelay"] = connector.stats()
    return counters


def transfer_prompts(args: argparse.Namespace) -> list[str]:
    """Prompt 0 is the warm-up; each other rotates the words, so no two share a block."""
    return [
        " ".join((WORDS[i:] + WORDS[:i]) * args.prompt_repeat) for i in range(args.rounds + 1)
    ]


def idle_prompt() -> str:
    """Shorter than one block: neither connector can store or load any of it."""
    return " ".join(reversed(WORDS))


def kv_transfer_config(role: str, work: Path, engine_id: str) -> dict | None:
    if role in PLAIN:
        return None
    connector, phase = role.split("-")
    config: dict[str, Any] = {
        "kv_connector": "ExampleConnector" if connector == "example" else "KvrelayConnector",
        "kv_connector_module_path": "bench_connector",
        "kv_role": "kv_producer" if phase == "prefill" else "kv_consumer",
        "kv_connector_extra_config": {},
    }
    if connector == "example":
        config["kv_connector_extra_config"]["shared_storage_path"] = str(work / "example-storage")
    else:
        config["engine_id"] = engine_id
    return config


def storage_dir(role: str, work: Path) -> Path | None:
    if role in PLAIN:
        return None
    return work / ("example-storage" if role.startswith("example") else "disk")


def directory_bytes(directory: Path | None) -> int:
    if directory is None or not directory.exists():
        return 0
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def difference(after: dict, before: dict) -> dict:
    """after - before for every number, recursively (kvrelay's totals are nested)."""
    return {
        key: difference(value, before.get(key, {})) if isinstance(value, dict) else value - before.get(key, 0)
        for key, value in after.items()
        if isinstance(value, (dict, int, float))
    }


def run_phase(args: argparse.Namespace) -> dict:
    """One vLLM engine in this process: the transfer rounds, then the idle decode rounds."""
    from vllm import LLM, SamplingParams

    work = Path(args.work_dir)
    config = kv_transfer_config(args.role, work, args.engine_id)
    llm = LLM(
        model=args.model,
        dtype="float32",
        enforce_eager=True,
        gpu_memory_utilization=0.5,
        max_model_len=4096,
        block_size=BLOCK_SIZE,
        seed=0,
        # As in the smoke: every phase runs the model in a Worker process, as vLLM does
        # whenever a connector is set.
        distributed_executor_backend="mp",
        kv_transfer_config=config,
    )
    storage = storage_dir(args.role, work)

    def counters() -> dict:
        return llm.collective_rpc(_worker_counters)[0] if config else {}

    def generate(prompt: str, max_tokens: int) -> dict:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        before, stored_before = counters(), directory_bytes(storage)
        started = time.perf_counter()
        (out,) = llm.generate([prompt], params, use_tqdm=False)
        seconds = time.perf_counter() - started
        after = counters()
        return {
            "seconds": seconds,
            "prompt_tokens": len(out.prompt_token_ids),
            "num_cached_tokens": out.num_cached_tokens or 0,
            "output_tokens": len(out.outputs[0].token_ids),
            "stored_bytes": directory_bytes(storage) - stored_before,
            "worker": difference(after, before),
            "step_hooks": after.get("step_hooks", []),
        }

    warmup, *prompts = transfer_prompts(args)
    generate(warmup, 1)
    transfers = [generate(prompt, 1) for prompt in prompts]
    idle = []
    for _ in range(args.rounds):
        # Step time from the difference of two runs, so the prefill step (and
        # ExampleConnector's save of the short prompt's empty tensors) cancels out; the
        # hooks' time from every hooked step after the prefill step (vLLM hooks one step
        # more than it makes tokens; none of them moves anything).
        one = generate(idle_prompt(), 1)
        many = generate(idle_prompt(), args.decode_tokens)
        steps = many["output_tokens"] - one["output_tokens"]
        decode_hooks = many["step_hooks"][1:]
        idle.append(
            {
                "ms_per_step": (many["seconds"] - one["seconds"]) / steps * 1e3,
                "hook_ms_per_step": statistics.fmean(decode_hooks) * 1e3 if decode_hooks else 0.0,
                "hooked_steps": len(many["step_hooks"]) - len(one["step_hooks"]),
                "decode_steps": steps,
                # Nothing may move: no new stored bytes, no kvrelay transfer.
                "stored_bytes": many["stored_bytes"],
                "kvrelay_bytes": {
                    k: v for k, v in many["worker"].get("kvrelay", {}).items() if k in ("loaded_bytes", "saved_bytes")
                },
            }
        )
    return {"role": args.role, "transfers": transfers, "idle": idle}


def spawn_phase(args: argparse.Namespace, role: str, work: Path, env: dict) -> dict:
    result = work / f"{role}.json"
    command = [
        sys.executable, os.path.abspath(__file__),
        "--role", role,
        "--model", args.model,
        "--work-dir", str(work),
        "--engine-id", args.engine_id,
        "--result-json", str(result),
        "--rounds", str(args.rounds),
        "--prompt-repeat", str(args.prompt_repeat),
        "--decode-tokens", str(args.decode_tokens),
    ]  # fmt: skip
    print(f"bench: {role} ({time.strftime('%H:%M:%S')})", file=sys.stderr)
    # vLLM logs to stdout; this process's stdout carries only the summary.
    completed = subprocess.run(
        command, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr, timeout=args.phase_timeout_sec
    )
    if completed.returncode != 0:
        raise SystemExit(f"the {role} phase failed (exit {completed.returncode})")
    return json.loads(result.read_text())


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def gbps(num_bytes: int, seconds: float) -> float:
    return num_bytes / seconds / 1e9


def summarize_connector(name: str, producer: dict, consumer: dict, problems: list[str]) -> dict:
    saves = producer["transfers"]
    loads = consumer["transfers"]
    for i, (save, load) in enumerate(zip(saves, loads, strict=True)):
        if save["stored_bytes"] <= 0:
            problems.append(f"{name}: the producer stored nothing for prompt {i + 1}")
        if load["num_cached_tokens"] < BLOCK_SIZE:
            problems.append(f"{name}: the consumer hit {load['num_cached_tokens']} tokens of prompt {i + 1}")
    summary = {
        "hit_tokens": [load["num_cached_tokens"] for load in loads],
        "prompt_tokens": loads[0]["prompt_tokens"],
        "bytes_per_prompt": [save["stored_bytes"] for save in saves],
        "ttft_ms": spread([load["seconds"] * 1e3 for load in loads]),
        "producer_prefill_ms": spread([save["seconds"] * 1e3 for save in saves]),
        "load_hook_ms": spread([load["worker"]["load"] * 1e3 for load in loads]),
        "save_hook_ms": spread([save["worker"]["save"] * 1e3 for save in saves]),
        # The consumer reads the files the producer wrote for the same prompt.
        "load_gbps": spread(
            [gbps(save["stored_bytes"], load["worker"]["load"]) for save, load in zip(saves, loads)]
        ),
        "save_gbps": spread([gbps(save["stored_bytes"], save["worker"]["save"]) for save in saves]),
        "idle": {
            phase["role"]: {
                "ms_per_step": spread([r["ms_per_step"] for r in phase["idle"]]),
                "hook_ms_per_step": spread([r["hook_ms_per_step"] for r in phase["idle"]]),
            }
            for phase in (producer, consumer)
        },
    }
    if name == "kvrelay":
        # kvrelay's own timers (inside Rust, around tier I/O and the copy) and payload bytes.
        summary["own_stats"] = {
            "load_gbps": spread(
                [gbps(l["worker"]["kvrelay"]["loaded_bytes"], l["worker"]["kvrelay"]["load_seconds"]) for l in loads]
            ),
            "save_gbps": spread(
                [gbps(s["worker"]["kvrelay"]["saved_bytes"], s["worker"]["kvrelay"]["save_seconds"]) for s in saves]
            ),
            "loaded_bytes_per_prompt": [l["worker"]["kvrelay"]["loaded_bytes"] for l in loads],
        }
    for phase in (producer, consumer):
        for r in phase["idle"]:
            moved = r["stored_bytes"] + sum(r["kvrelay_bytes"].values())
            if moved or r["hooked_steps"] != r["decode_steps"]:
                problems.append(
                    f"{phase['role']}: an idle round moved {moved} bytes; {r['hooked_steps']} hooked steps for {r['decode_steps']} decode steps"
                )
    return summary


def run_all(args: argparse.Namespace) -> dict:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kvrelay-vllm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.model:
        args.model = str(work / "tiny-llama")
        make_tiny_llama(Path(args.model))
    config = work / "lmcache.yaml"
    write_lmcache_config(config, work / "disk")
    args.engine_id = f"kvrelay-bench-{uuid.uuid4()}"
    env = dict(os.environ, LMCACHE_CONFIG_FILE=str(config))
    # vLLM's Worker imports the timed connectors from this directory.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Same thread count in every phase (see the smoke's RESERVED_CPUS).
    env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = RESERVED_CPUS
    # LLM.collective_rpc sends _worker_counters to the Worker pickled; vLLM only allows
    # that (for functions) with this set. Ordinary step traffic is unaffected.
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    # kvrelay's stats file would be rewritten from get_finished; the benchmark asks the
    # worker directly instead, so the idle hooks are measured without that file.
    env.pop("KVRELAY_STATS_FILE", None)
    phases = {role: spawn_phase(args, role, work, env) for role in PHASES}

    problems: list[str] = []
    plain_step = spread([r["ms_per_step"] for role in PLAIN for r in phases[role]["idle"]])
    plain_ttft = spread([t["seconds"] * 1e3 for role in PLAIN for t in phases[role]["transfers"]])
    connectors = {
        name: summarize_connector(name, phases[f"{name}-prefill"], phases[f"{name}-decode"], problems)
        for name in CONNECTORS
    }
    base = plain_step["median"]
    ratios: dict[str, Any] = {
        "load_gbps_kvrelay_over_example": connectors["kvrelay"]["load_gbps"]["median"]
        / connectors["example"]["load_gbps"]["median"],
        "save_gbps_kvrelay_over_example": connectors["kvrelay"]["save_gbps"]["median"]
        / connectors["example"]["save_gbps"]["median"],
        "ttft_kvrelay_over_example": connectors["kvrelay"]["ttft_ms"]["median"]
        / connectors["example"]["ttft_ms"]["median"],
        "ttft_over_plain_recompute": {
            name: c["ttft_ms"]["median"] / plain_ttft["median"] for name, c in connectors.items()
        },
        # Idle hooks as % of the plain run's decode step: end to end (step time with the
        # connector minus without, medians; noisy) and the hooks' own time (precise).
        "idle_overhead_pct_of_decode_step": {
            role: {
                "end_to_end": (idle["ms_per_step"]["median"] - base) / base * 100,
                "worker_hooks": idle["hook_ms_per_step"]["median"] / base * 100,
            }
            for c in connectors.values()
            for role, idle in c["idle"].items()
        },
    }
    return {
        "work_dir": str(work),
        "rounds": args.rounds,
        "decode_tokens": args.decode_tokens,
        "plain": {
            "ttft_ms_recompute": plain_ttft,
            "ms_per_step": plain_step,
            "ms_per_step_by_run": {role: spread([r["ms_per_step"] for r in phases[role]["idle"]]) for role in PLAIN},
        },
        "connectors": connectors,
        "ratios": ratios,
        "problems": problems,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["all", *PHASES], default="all")
    parser.add_argument("--model", default="", help="model directory; a tiny random Llama is made when empty")
    parser.add_argument("--work-dir", default="", help="model, stores and phase results (a new temp dir when empty)")
    parser.add_argument("--engine-id", default="")
    parser.add_argument("--rounds", type=int, default=5, help="prompts loaded, and idle decode rounds, per phase")
    parser.add_argument(
        "--prompt-repeat", type=int, default=82, help="82 repeats of 22 words: 1804 tokens, of which both connectors move 1792"
    )
    parser.add_argument("--decode-tokens", type=int, default=256, help="output tokens of an idle decode round")
    parser.add_argument("--phase-timeout-sec", type=int, default=900)
    parser.add_argument("--result-json", default="", help="where a single phase writes its result")
    args = parser.parse_args()
    if args.rounds < 1 or args.decode_tokens < 2:
        parser.error("--rounds must be >= 1 and --decode-tokens >= 2")
    if args.role == "all":
        summary = run_all(args)
        print(json.dumps(summary, indent=1))
        for problem in summary["problems"]:
            print(f"FAIL: {problem}", file=sys.stderr)
        return 1 if summary["problems"] else 0
    Path(args.result_json).write_text(json.dumps(run_phase(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
