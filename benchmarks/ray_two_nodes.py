"""The same `corpus build` on a two-node Ray cluster and with the local executor: equal manifest ids?

Starts a Ray cluster of two nodes on this machine, each its own raylet with one CPU (``ray start
--head --block`` and ``ray start --address ... --block``, every port chosen free, a temporary
``--temp-dir`` of its own), builds one recipe twice -- ``--executor local --workers 2`` and
``--executor ray --address <head> --workers 2`` -- and prints both manifest ids, whether they are
equal, the cluster's nodes, and which task functions each node's worker processes were seen
running (``ray::<function>`` process titles, sampled every 0.2 s). The cluster is stopped at the
end, also on failure, by terminating the two ``ray start --block`` processes this script started
(they stop what they started); nothing else on the machine is touched (no ``ray stop``).

The recipe is the default one (``examples/recipes/demo-corpus.yaml``: ``min_words``, ``language``,
exact dedup) with MinHash dedup added, over ``--docs`` documents from ``corpus_scale.py``'s
generator, cut into tasks of ``split_bytes`` (1 MB: about ten tasks per 20,000 documents) so that
both nodes get work.

Ray is an optional extra, not installed by ``make setup``:

    .venv/bin/pip install -e '.[ray]'          # or: .venv/bin/pip install 'ray[data]>=2.30'
    .venv/bin/python benchmarks/ray_two_nodes.py [--docs 20000]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))

from corpus_scale import RECIPE, DocumentGenerator, machine  # noqa: E402

RAY = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Every port a raylet opens, chosen free: two raylets on one host must not share any."""
    names = ["node-manager-port", "object-manager-port", "metrics-export-port", "runtime-env-agent-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port"]  # fmt: skip
    return [arg for name in names for arg in (f"--{name}", str(free_port()))]


class TwoNodeCluster:
    """A head and a second node on this host, each a ``ray start --block`` process owned by this one."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths
        self.address = f"127.0.0.1:{free_port()}"
        self.nodes: list[subprocess.Popen] = []
        # Ray 2.60 turns token authentication on whenever ~/.ray/auth_token exists (any local
        # ray.init() writes one), and a client only sends a token when told to: every process of this
        # cluster, and every client of it, gets the mode and a token of its own from the environment.
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN=secrets.token_hex(32))  # fmt: skip

    def start_node(self, name: str, *args: str) -> None:
        common = ["--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                  "--object-store-memory", str(200 << 20), *node_ports()]  # fmt: skip
        log = open(self.folder / f"ray-{name}.log", "w")  # noqa: SIM115 -- closed with the process
        # A new session: a signal meant for this script (Ctrl-C) is not delivered to the nodes twice.
        self.nodes.append(subprocess.Popen([str(RAY), "start", *common, *args], stdout=log, stderr=log,
                                           env=self.env, start_new_session=True))  # fmt: skip

    def __enter__(self) -> TwoNodeCluster:
        try:
            self.start()
        except BaseException:
            self.__exit__()  # a failed start stops what it started too
            raise
        return self

    def start(self) -> None:
        port = self.address.rsplit(":", 1)[1]
        self.start_node("head", "--head", "--port", port, "--include-dashboard", "false", "--dashboard-port",
                        str(free_port()), "--temp-dir", str(self.temp_dir))  # fmt: skip
        self.wait_for_nodes(1)
        self.start_node("worker", "--address", self.address)
        self.wait_for_nodes(2)

    def wait_for_nodes(self, count: int, timeout: float = 180) -> None:
        """Poll the cluster (a short-lived driver process) until ``count`` nodes are alive."""
        probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False);"
                 "print('alive nodes:', sum(n['Alive'] for n in ray.nodes()))")  # fmt: skip
        deadline, stderr = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            if any(node.poll() is not None for node in self.nodes):
                raise SystemExit(f"a Ray node exited:\n{self.logs()}")
            out = subprocess.run(
                [sys.executable, "-c", probe, self.address], capture_output=True, text=True, env=self.env
            )
            alive = re.search(r"alive nodes: (\d+)", out.stdout)
            if alive and int(alive.group(1)) >= count:
                return
            stderr = out.stderr
            time.sleep(2)
        raise SystemExit(f"the Ray cluster did not reach {count} nodes in {timeout:.0f} s:\n{stderr[-2000:]}")

    def logs(self) -> str:
        return "\n".join(
            f"{p.name}: ...{p.read_text()[-1500:]}" for p in sorted(self.folder.glob("ray-*.log"))
        )

    def __exit__(self, *exc) -> None:
        for node in reversed(self.nodes):  # the worker node first, then the head
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
                try:
                    node.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    node.kill()
                    node.wait()
        leftovers = processes_mentioning(str(self.temp_dir))
        for pid in leftovers:  # only processes of this cluster: they name its own temp dir
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        print(f"ray cluster stopped ({len(leftovers)} leftover processes killed)")
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except (OSError, ValueError):
            continue
    return [pid for pid in found if pid != os.getpid()]


class TaskSampler(threading.Thread):
    """Which ``ray::<function>`` titles the worker processes under each raylet of the cluster show
    (its raylets are those whose command line names the cluster's temp dir)."""

    def __init__(self, temp_dir: Path, interval: float = 0.2):
        super().__init__(daemon=True)
        self.temp_dir, self.interval = str(temp_dir), interval
        self.seen: dict[int, set[str]] = defaultdict(set)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            raylets = {
                pid for pid in processes_mentioning(self.temp_dir) if b"raylet/raylet" in cmdline_of(pid)
            }
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                    title = cmdline_of(int(stat.parent.name)).decode(errors="replace").strip("\0 ")
                except (OSError, ValueError, IndexError):
                    continue
                # (a raylet's own agents, ray::DashboardAgent and ray::RuntimeEnvAgent, are no tasks)
                if parent in raylets and title.startswith("ray::") and not title.endswith(("IDLE", "Agent")):
                    self.seen[parent].add(title.split()[0])


def cmdline_of(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def build(folder: Path, recipe: Path, name: str, *options: str, env: dict | None = None) -> dict:
    """``corpus build`` through the CLI into its own store; the manifest id, or why it failed."""
    store = folder / f"store-{name}"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "manifests.cli", "--store", str(store), "corpus", "build", str(recipe), *options],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )  # fmt: skip
    result = {"wall": time.perf_counter() - started, "rc": done.returncode, "stderr": done.stderr[-4000:]}
    manifests = sorted(store.glob("datasets/ray-two-nodes/*/manifest.json"))
    if done.returncode == 0 and manifests:
        manifest = json.loads(manifests[-1].read_text())
        result |= {"id": manifest["id"], "rows": manifest["stats"]["rows_out"],
                   "execution": manifest["producer"].get("execution")}  # fmt: skip
    return result


def versions() -> str:
    import importlib.metadata

    ray = importlib.metadata.version("ray") if importlib.util.find_spec("ray") else "missing"
    return f"ray {ray}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=20_000)
    args = parser.parse_args()
    print(f"machine: {machine()}, {versions()}")
    if importlib.util.find_spec("ray") is None:
        raise SystemExit("Ray is not installed: .venv/bin/pip install -e '.[ray]'")
    with tempfile.TemporaryDirectory(prefix="ray-two-nodes-") as tmp:
        folder = Path(tmp)
        data = folder / "docs.jsonl"
        DocumentGenerator(seed=0).write(data, args.docs)
        recipe = yaml.safe_load(RECIPE.read_text())
        recipe |= {"name": "ray-two-nodes", "inputs": [{"path": str(data), "format": "jsonl"}],
                   "split_bytes": 1 << 20, "workers": 2}  # fmt: skip
        recipe["dedup"] = recipe.get("dedup", {}) | {"minhash": {"threshold": 0.8}}
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        print(f"data: {args.docs:,} documents, {data.stat().st_size / 2**20:.1f} MiB, tasks of 1 MiB; recipe: "
              f"steps {json.dumps(recipe['steps'])}, dedup {json.dumps(recipe['dedup'])}\n")  # fmt: skip
        local = build(folder, folder / "recipe.yaml", "local", "--executor", "local", "--workers", "2")
        print(f"local executor, 2 workers: {local.get('id', 'FAILED')} ({local['wall']:.1f} s)", flush=True)
        with TwoNodeCluster(folder) as cluster:
            print(f"ray cluster: 2 nodes, 1 CPU each, head at {cluster.address}", flush=True)
            sampler = TaskSampler(cluster.temp_dir)
            sampler.start()
            on_ray = build(folder, folder / "recipe.yaml", "ray", "--executor", "ray", "--address", cluster.address,
                           "--workers", "2", env=cluster.env)  # fmt: skip
            sampler.stop.set()
            sampler.join()
        print(f"ray executor, 2 nodes:      {on_ray.get('id', 'FAILED')} ({on_ray['wall']:.1f} s)")
        for i, (raylet, titles) in enumerate(sorted(sampler.seen.items())):
            print(f"  raylet {raylet} (node {i + 1}) ran: {', '.join(sorted(titles))}")
        if len(sampler.seen) < 2:
            print(f"  tasks were seen on {len(sampler.seen)} node(s) only")
        for name, result in (("local", local), ("ray", on_ray)):
            if result["rc"] != 0:
                print(f"\n{name} build failed (exit {result['rc']}):\n{result['stderr']}")
        if "id" in local and "id" in on_ray:
            equal = local["id"] == on_ray["id"]
            print(f"\nmanifest ids equal: {'yes' if equal else 'NO'} ({local['rows']:,} and {on_ray['rows']:,} rows; "
                  f"execution {on_ray['execution']})")  # fmt: skip


if __name__ == "__main__":
    main()
