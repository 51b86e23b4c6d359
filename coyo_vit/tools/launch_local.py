r"""Run N copies of a command as one multi-process JAX job on this machine.

    python -m coyo_vit.tools.launch_local --num_processes 2 --devices_per_process 2 -- \
        python train.py --config configs/demo.py --workdir /tmp/run

Each copy gets COYO_VIT_COORDINATOR / COYO_VIT_NUM_PROCESSES / COYO_VIT_PROCESS_ID (read by
`coyo_vit.training.runtime.initialize`, which joins `jax.distributed` with gloo CPU collectives) and
`devices_per_process` host CPU devices. This is how the tests exercise real multi-host code
paths; on a pod or cluster the scheduler starts the processes instead (see scripts/).
SIGTERM and SIGINT are forwarded to every copy, as a scheduler would send them to every host:
SIGTERM checkpoints the current step and exits 0, Ctrl-C (SIGINT) does the same and exits 130,
a second Ctrl-C aborts. The copies run in their own process group, so a Ctrl-C in the terminal
reaches each of them once (forwarded from here), not twice (terminal and forward, which would
abort them unsaved).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, devices_per_process: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update({
        "COYO_VIT_COORDINATOR": f"127.0.0.1:{port}",
        "COYO_VIT_NUM_PROCESSES": str(num_processes),
        "COYO_VIT_PROCESS_ID": str(process_id),
        "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"]),
        "JAX_PLATFORMS": "cpu",
    })
    return env


def _relay(stream, prefix: str) -> None:
    for line in iter(stream.readline, b""):
        sys.stderr.buffer.write(prefix.encode() + line)
        sys.stderr.buffer.flush()


def launch(command: Sequence[str], num_processes: int, devices_per_process: int) -> int:
    """Starts the processes, relays their output prefixed by rank; returns the worst exit code."""
    port = free_port()
    procs: list[subprocess.Popen] = []

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # Installed first: the copies then start with SIGINT at its default (a handler does not pass
    # through exec), even where this launcher was started with it ignored (a shell's `&` job).
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    procs.extend(subprocess.Popen(list(command), env=process_env(i, num_processes, port, devices_per_process),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  process_group=0)  # the terminal's Ctrl-C reaches them only via forward()
                 for i in range(num_processes))
    relays = [threading.Thread(target=_relay, args=(p.stdout, f"[{i}] "), daemon=True)
              for i, p in enumerate(procs)]
    for t in relays:
        t.start()

    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for t in relays:
        t.join(timeout=5)
    return next((c for c in codes if c != 0), 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coyo_vit.tools.launch_local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2, help="copies of the command to start")
    parser.add_argument("--devices_per_process", type=int, default=1, help="host CPU devices per copy")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after '--'")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given: put it after '--'")
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error(f"--num_processes ({args.num_processes}) and --devices_per_process "
                     f"({args.devices_per_process}) must be at least 1")
    return launch(command, args.num_processes, args.devices_per_process)


if __name__ == "__main__":
    sys.exit(main())
