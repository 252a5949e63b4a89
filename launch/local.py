r"""Run a JAX program as N processes on this machine, each with its own CPU devices,
joined into one runtime: the multi-host code path without a cluster.

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \
      experiments/pretrain.py --config=experiments/configs/m6_10b.py:tiny \
      --config.mesh.data=2 --config.mesh.fsdp=4 --workdir=runs/local2x4

Each process gets `--xla_force_host_platform_device_count=devices_per_process`,
JAX_PLATFORMS=cpu and `--coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=i` appended to the program's flags (experiments/pretrain.py accepts them).
Output of process i is streamed with an `[i]` prefix. If one process fails, the others
are stopped (they would wait forever on a collective) and the exit status is non-zero.
"""
import argparse
import os
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(proc, index: int, out):
    for line in proc.stdout:
        out.write(f"[{index}] {line}")
        out.flush()


def launch(program: list[str], num_processes: int, devices_per_process: int,
           port: int | None = None, env: dict | None = None, out=sys.stdout) -> int:
    """Starts the processes, streams their output, returns the first non-zero status."""
    port = port or free_port()
    base = dict(os.environ if env is None else env)
    base["XLA_FLAGS"] = (base.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_"
                         f"count={devices_per_process}").strip()
    base["JAX_PLATFORMS"] = "cpu"
    procs, threads = [], []
    for i in range(num_processes):
        cmd = [sys.executable, *program, f"--coordinator_address=127.0.0.1:{port}",
               f"--num_processes={num_processes}", f"--process_id={i}"]
        p = subprocess.Popen(cmd, env=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        procs.append(p)
        t = threading.Thread(target=_stream, args=(p, i, out), daemon=True)
        t.start()
        threads.append(t)
    status = 0
    pending = list(procs)
    while pending:
        for p in list(pending):
            try:
                rc = p.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            pending.remove(p)
            if rc and not status:
                status = rc
                for q in pending:  # the rest would block on a collective forever
                    q.kill()
    for t in threads:
        t.join()
    return status


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument("program", nargs=argparse.REMAINDER,
                        help="-- script.py and its flags")
    args = parser.parse_args()
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        parser.error("give the program to run after --, e.g. -- experiments/pretrain.py ...")
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be >= 1")
    sys.exit(launch(program, args.num_processes, args.devices_per_process, args.port))


if __name__ == "__main__":
    main()
