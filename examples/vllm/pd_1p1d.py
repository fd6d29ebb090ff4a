"""The seed-004 1p1d on real vLLM: two vLLM servers and ``kvrelay proxy``, PD over tcp
(the seed's channel; ``--channel shm`` moves the KV through a shared /dev/shm buffer).

A prefiller (``kv_producer``, port 7100) and a decoder (``kv_consumer``, port 7200), each
``python -m vllm.entrypoints.openai.api_server`` loading ``kvrelay.vllm.KvrelayConnector``
with the seed's LMCache PD config (examples/pd_1p1d/lmcache-*-config.yaml), and
``kvrelay proxy`` on 9100 (decoder PD buffer on init 7300 / alloc 7400, KV-ready
notifications on 7500). The seed's request (its prompt repeated 100 times, max_tokens 100,
greedy) goes through the proxy; the answer must equal one plain vLLM server's (token ids
and text) and the decoder must have loaded the prefiller's KV (hit tokens). Then the
decoder is killed and the proxy must answer 502 within a bound. Prints a JSON summary.

    python examples/vllm/pd_1p1d.py --kvrelay target/release/kvrelay

A tiny random Llama is made locally (as disagg_lmcache_smoke.py does) unless --model names
one. vLLM's CPU build packs KV blocks per instruction set, so two settings differ from the
seed's: the prefiller sends whole chunks only (``discard_partial_chunks: true``; the
decoder computes the prompt's tail). The decoder keeps the seed's
``enable_async_loading: true``: vLLM parks the request in ``WAITING_FOR_REMOTE_KVS`` while
kvrelay's background loader copies the KV from the PD buffer, and schedules it once
``get_finished`` reports the load.

The prefiller runs chunked prefill of one chunk a step (``--max-num-batched-tokens 256``),
so its sender reserves the decoder's pages at the prompt's first step and sends each chunk
in the step that computed it; its stats must count that request (``pd_reserved_sends``).
vLLM's ``save_kv_layer`` hook sends each layer of the step's chunk as soon as the layer's
attention wrote it (``pd_layered_chunks`` must count every chunk the decoder looks up).
The plain server runs the same steps, so "equal to one engine" compares the same
arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from disagg_lmcache_smoke import BLOCK_SIZE, CHUNK_SIZE, RESERVED_CPUS, make_tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SEED_CONFIGS = ROOT / "examples" / "pd_1p1d"
SEED_PROMPT = "Explain the significance of KV cache in language models in English." * 100
# Tokens a prefill step computes on the prefiller and the plain server: one chunk.
PREFILL_STEP_TOKENS = 256
PORTS = {"plain": 7000, "prefiller": 7100, "decoder": 7200, "proxy": 9100}
PD_PORTS = {"init": 7300, "alloc": 7400, "notify": 7500}
# vLLM logs the connector's get_kv_connector_stats every VLLM_LOG_STATS_INTERVAL seconds,
# at debug level when the interval and the one before it generated no tokens. An
# asynchronous load's figures arrive in a step of their own, before the request's prompt
# is computed, so that interval can look idle: the decoder logs at debug level.
STATS_INTERVAL_SEC = 1.0
# KV of a finished request that was never loaded is freed within this bound (the PD
# buffer's TTL, 300 s, is the last resort that must not be what frees it).
RELEASE_BOUND_SEC = 20.0
# A killed decoder must turn into a 502 well before the proxy's own request timeout.
KILLED_DECODER_BOUND_SEC = 30.0


def lmcache_config(role: str, work: Path, channel: str) -> Path:
    """The seed's config for `role`, with the PD ports moved by --port-offset and the
    transfer channel set to `channel`."""
    ports = {
        "pd_peer_init_port": f"[{PD_PORTS['init']}]",
        "pd_peer_alloc_port": f"[{PD_PORTS['alloc']}]",
        "pd_proxy_port": str(PD_PORTS["notify"]),
        "transfer_channel": channel,
    }
    lines = (SEED_CONFIGS / f"lmcache-{role}-config.yaml").read_text().splitlines()
    kept = [f"{line.split(':')[0]}: {ports[line.split(':')[0]]}" if line.split(":")[0] in ports else line for line in lines]
    path = work / f"lmcache-{role}.yaml"
    path.write_text("\n".join(kept) + "\n")
    return path


def kv_transfer_config(role: str) -> dict:
    if role == "prefiller":
        return {
            "kv_connector": "KvrelayConnector",
            "kv_connector_module_path": "kvrelay.vllm",
            "kv_role": "kv_producer",
            "kv_connector_extra_config": {
                "discard_partial_chunks": True,
                "lmcache_rpc_port": "producer1",
            },
        }
    return {
        "kv_connector": "KvrelayConnector",
        "kv_connector_module_path": "kvrelay.vllm",
        "kv_role": "kv_consumer",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "discard_partial_chunks": False,
            "lmcache_rpc_port": "consumer1",
            "skip_last_n_tokens": 1,
        },
    }


class Processes:
    """Servers started in their own process groups (vLLM's EngineCore and Worker included),
    all stopped at the end."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], env: dict) -> None:
        log = open(self.work / f"{name}.log", "w")
        self.running[name] = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def kill(self, name: str) -> None:
        process = self.running.pop(name)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=60)

    def kill_all(self) -> None:
        for name in list(self.running):
            self.kill(name)

    def log_tail(self, name: str, lines: int = 40) -> str:
        return "\n".join((self.work / f"{name}.log").read_text().splitlines()[-lines:])

    def wait_healthy(self, name: str, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.running[name].poll() is not None:
                raise SystemExit(f"{name} exited early:\n{self.log_tail(name)}")
            try:
                with urllib.request.urlopen(f"http://localhost:{port}/health", timeout=5):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        raise SystemExit(f"{name} not healthy on port {port} after {timeout:.0f} s:\n{self.log_tail(name)}")


def post(port: int, body: dict, timeout: float) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://localhost:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        try:
            return error.code, json.loads(text)
        except json.JSONDecodeError:
            return error.code, {"body": text}


def answer(status: int, body: dict) -> dict:
    if status != 200:
        raise SystemExit(f"HTTP {status}: {body}")
    choice = body["choices"][0]
    details = (body.get("usage") or {}).get("prompt_tokens_details") or {}
    return {
        "text": choice["text"],
        "token_ids": choice.get("token_ids"),
        "logprobs": (choice.get("logprobs") or {}).get("token_logprobs"),
        "prompt_tokens": body["usage"]["prompt_tokens"],
        "cached_tokens": details.get("cached_tokens"),
    }


def logged_loaded_tokens(processes: Processes, name: str, timeout: float) -> int:
    """The loaded tokens vLLM's "KV Transfer metrics" log lines add up to (vLLM builds them
    from the connector's get_kv_connector_stats), once a line has appeared."""
    deadline = time.monotonic() + timeout
    while True:
        log = (processes.work / f"{name}.log").read_text()
        found = [int(n) for n in re.findall(r"KV Transfer metrics: .*?loaded_tokens=(\d+)", log)]
        if found or time.monotonic() > deadline:
            return sum(found)
        time.sleep(0.5)


def check_release(args: argparse.Namespace, work: Path) -> dict:
    """KV sent for a request the decoder then runs without loading it (another prompt under
    the same disagg_spec.req_id) is freed when vLLM finishes the request: request_finished
    releases it through the lookup channel, not the PD buffer's TTL. `tier_bytes` in the
    decoder's stats file is what its PD buffer holds at its last step."""
    req_id = "kvrelay-release-check"
    prefill = {
        "model": args.model, "prompt": SEED_PROMPT, "max_tokens": 1, "temperature": 0,
        "kv_transfer_params": {"disagg_spec": {
            "req_id": req_id, "receiver_host": "localhost",
            "receiver_init_port": [PD_PORTS["init"]], "receiver_alloc_port": [PD_PORTS["alloc"]],
        }},
    }  # fmt: skip
    answer(*post(PORTS["prefiller"], prefill, args.request_timeout_sec))
    other = {
        "model": args.model, "prompt": "the quick brown fox " * 100, "max_tokens": 1,
        "temperature": 0, "kv_transfer_params": {"disagg_spec": {"req_id": req_id}},
    }  # fmt: skip
    plain_step = {"model": args.model, "prompt": "the lazy dog", "max_tokens": 1, "temperature": 0}

    def held_after_a_step() -> int:
        answer(*post(PORTS["decoder"], plain_step, args.request_timeout_sec))
        return read_stats(work, "decoder").get("tier_bytes", 0)

    # The prefiller's KV lands in the decoder's buffer shortly after its answer.
    deadline = time.monotonic() + 30
    held_before = held_after_a_step()
    while held_before == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        held_before = held_after_a_step()
    miss = answer(*post(PORTS["decoder"], other, args.request_timeout_sec))
    # `held_before` may count pages granted to a transfer still landing; the decoder then
    # refuses that transfer when it commits and frees its pages. Either way they must be
    # free within RELEASE_BOUND_SEC, far inside pd_buffer_ttl_sec (300 s), which would
    # otherwise be what frees them.
    released_at = time.monotonic()
    held_after = held_after_a_step()
    while held_after != 0 and time.monotonic() - released_at < RELEASE_BOUND_SEC:
        time.sleep(0.2)
        held_after = held_after_a_step()
    return {
        "held_bytes_before": held_before, "held_bytes_after": held_after,
        "release_sec": round(time.monotonic() - released_at, 3), "miss_cached_tokens": miss["cached_tokens"],
    }  # fmt: skip


def check_free(ports: list[int]) -> None:
    """Refuses to start when another program (another 1p1d, say) holds one of the ports."""
    for port in ports:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as error:
                raise SystemExit(f"port {port} is taken ({error}); pass --port-offset to move every port")


def run(args: argparse.Namespace) -> dict:
    global PORTS, PD_PORTS
    PORTS = {name: port + args.port_offset for name, port in PORTS.items()}
    PD_PORTS = {name: port + args.port_offset for name, port in PD_PORTS.items()}
    check_free([*PORTS.values(), *PD_PORTS.values()])
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kvrelay-vllm-pd-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.model:
        args.model = str(work / "tiny-llama")
        make_tiny_llama(Path(args.model))
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", RESERVED_CPUS)
    env["PYTHONHASHSEED"] = "0"
    env["KVRELAY_LOOKUP_DIR"] = str(work / "lookup")
    env["VLLM_LOG_STATS_INTERVAL"] = str(STATS_INTERVAL_SEC)

    def server(role: str) -> list[str]:
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", args.model, "--port", str(PORTS[role]), "--dtype", "float32",
            "--enforce-eager", "--no-enable-prefix-caching", "--block-size", str(BLOCK_SIZE),
            "--max-model-len", "2048", "--gpu-memory-utilization", "0.5", "--seed", "0",
            "--distributed-executor-backend", "mp", "--enable-prompt-tokens-details",
        ]  # fmt: skip
        if role != "decoder":
            command += ["--max-num-batched-tokens", str(PREFILL_STEP_TOKENS)]
        if role != "plain":
            command += ["--kv-transfer-config", json.dumps(kv_transfer_config(role))]
        return command

    request = {
        "model": args.model,
        "prompt": SEED_PROMPT,
        "max_tokens": 100,
        "temperature": 0,
        "logprobs": 1,
        "return_token_ids": True,
    }
    processes = Processes(work)
    started = time.monotonic()
    try:
        processes.start("plain", server("plain"), env)
        for role in ("decoder", "prefiller"):
            role_env = dict(
                env,
                LMCACHE_CONFIG_FILE=str(lmcache_config(role, work, args.channel)),
                KVRELAY_STATS_FILE=str(work / f"{role}-stats.json"),
            )
            if role == "decoder":
                role_env["VLLM_LOGGING_LEVEL"] = "DEBUG"
            processes.start(role, server(role), role_env)
        for role in ("plain", "decoder", "prefiller"):
            processes.wait_healthy(role, PORTS[role], args.start_timeout_sec)
        processes.start(
            "proxy",
            [
                args.kvrelay, "proxy", "--host", "localhost", "--port", str(PORTS["proxy"]),
                "--prefiller-host", "localhost", "--prefiller-port", str(PORTS["prefiller"]),
                "--num-prefillers", "1",
                "--decoder-host", "localhost", "--decoder-port", str(PORTS["decoder"]),
                "--decoder-init-port", str(PD_PORTS["init"]),
                "--decoder-alloc-port", str(PD_PORTS["alloc"]),
                "--proxy-host", "localhost", "--proxy-port", str(PD_PORTS["notify"]),
                "--num-decoders", "1", "--timeout-sec", str(args.request_timeout_sec),
            ],
            env,
        )  # fmt: skip
        processes.wait_healthy("proxy", PORTS["proxy"], 30)
        ready_sec = time.monotonic() - started

        plain = answer(*post(PORTS["plain"], request, args.request_timeout_sec))
        processes.kill("plain")
        pd = answer(*post(PORTS["proxy"], request, args.request_timeout_sec))
        decoder_stats, prefiller_stats = (read_stats(work, role) for role in ("decoder", "prefiller"))
        logged = logged_loaded_tokens(processes, "decoder", 10 * STATS_INTERVAL_SEC + 5)

        release = check_release(args, work)

        processes.kill("decoder")
        killed_started = time.monotonic()
        killed_status, killed_body = post(PORTS["proxy"], request, args.request_timeout_sec)
        killed_sec = time.monotonic() - killed_started
    finally:
        processes.kill_all()

    summary = {
        "work_dir": str(work),
        "servers_ready_sec": round(ready_sec, 1),
        "prompt_tokens": pd["prompt_tokens"],
        "plain": plain,
        "pd": pd,
        "equal_token_ids": pd["token_ids"] == plain["token_ids"],
        "equal_text": pd["text"] == plain["text"],
        "decoder_hit_tokens": pd["cached_tokens"],
        "decoder_loaded_tokens": decoder_stats.get("loaded_tokens", 0),
        "decoder_loaded_bytes": decoder_stats.get("loaded_bytes", 0),
        "decoder_logged_loaded_tokens": logged,
        "prefiller_reserved_sends": prefiller_stats.get("pd_reserved_sends", 0),
        "prefiller_layered_chunks": prefiller_stats.get("pd_layered_chunks", 0),
        "release": release,
        "killed_decoder": {"status": killed_status, "seconds": round(killed_sec, 2), "body": killed_body},
    }
    # The decoder looks up all but the last prompt token; the prefiller sends whole chunks.
    expected_hit = (pd["prompt_tokens"] - 1) // CHUNK_SIZE * CHUNK_SIZE
    problems = []
    if plain["token_ids"] is None or not summary["equal_token_ids"]:
        problems.append(f"token ids through the proxy {pd['token_ids']} != plain vLLM {plain['token_ids']}")
    if not summary["equal_text"]:
        problems.append(f"text through the proxy {pd['text']!r} != plain vLLM {plain['text']!r}")
    if summary["decoder_hit_tokens"] != expected_hit or summary["decoder_loaded_tokens"] != expected_hit:
        problems.append(
            f"the decoder hit {summary['decoder_hit_tokens']} and loaded {summary['decoder_loaded_tokens']} tokens; expected {expected_hit}"
        )
    if release["held_bytes_before"] <= 0 or release["held_bytes_after"] != 0 or release["miss_cached_tokens"] != 0:
        problems.append(f"the PD buffer was not released when the request finished: {release}")
    if summary["prefiller_reserved_sends"] < 1:
        problems.append(
            f"the prefiller sent no request on a reservation (pd_reserved_sends {summary['prefiller_reserved_sends']}); its {pd['prompt_tokens']}-token prompt took several steps"
        )
    # The pages are reserved when the first step's metadata is bound, before its layers.
    expected_layered = expected_hit // CHUNK_SIZE
    if summary["prefiller_layered_chunks"] != expected_layered:
        problems.append(
            f"the prefiller sent {summary['prefiller_layered_chunks']} chunks layer by layer (pd_layered_chunks); expected {expected_layered}"
        )
    if logged != expected_hit:
        problems.append(f"vLLM's KV Transfer metrics (get_kv_connector_stats) logged {logged} loaded tokens; expected {expected_hit}")
    if killed_status != 502 or killed_sec > KILLED_DECODER_BOUND_SEC:
        problems.append(
            f"with the decoder killed the proxy answered {killed_status} after {killed_sec:.1f} s; expected 502 within {KILLED_DECODER_BOUND_SEC} s"
        )
    summary["problems"] = problems
    return summary


def read_stats(work: Path, role: str) -> dict:
    """The worker totals `role`'s connector last wrote (KVRELAY_STATS_FILE)."""
    stats_file = work / f"{role}-stats.json"
    return json.loads(stats_file.read_text()) if stats_file.exists() else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kvrelay", default=str(ROOT / "target" / "release" / "kvrelay"), help="the kvrelay binary (for `kvrelay proxy`)")
    parser.add_argument("--model", default="", help="model directory; a tiny random Llama is made when empty")
    parser.add_argument("--work-dir", default="", help="model, configs, logs (a new temp dir when empty)")
    parser.add_argument("--channel", choices=("tcp", "shm"), default="tcp", help="the PD transfer channel (the seed's is tcp)")
    parser.add_argument("--port-offset", type=int, default=0, help="added to every port (the seed's: 7100, 7200, 7300, 7400, 7500, 9100; plain 7000)")
    parser.add_argument("--start-timeout-sec", type=float, default=300)
    parser.add_argument("--request-timeout-sec", type=int, default=120)
    args = parser.parse_args()
    summary = run(args)
    print(json.dumps(summary, indent=2))
    if summary["problems"]:
        print("FAILED: " + "; ".join(summary["problems"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
