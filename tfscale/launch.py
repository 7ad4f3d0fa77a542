"""Start N training workers on this machine, each with its own ``TF_CONFIG``.

Usage::

    python -m tfscale.launch --num_workers 4 [--devices_per_worker 2] -- \\
        python scripts/train.py --all_reduce=torus --grid_shape=2x2

What it does:

1. Picks `num_workers` free TCP ports on 127.0.0.1 (or checks ``--base_port ..
   base_port + num_workers - 1`` and fails with a clear message if one is in use).
2. Starts one copy of the command per worker with ``TF_CONFIG`` set to
   ``{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": i}}``, plus
   ``TFSCALE_DEVICES_PER_WORKER`` (read by
   `tfscale.distribute.collective.create_multi_worker_strategy`) and, when GPUs are
   listed in ``CUDA_VISIBLE_DEVICES``, a disjoint slice of them per worker.
3. Prints every line a worker writes (stdout and stderr) prefixed with ``[worker i]``.
4. When a worker exits with a non-zero code (or is killed by a signal), stops the others
   (SIGTERM, then SIGKILL after ``--grace_seconds``), says which worker died and why, and
   exits with that first non-zero code (128 + signal number for a signal, as a shell does).
   With ``--timeout_seconds`` the whole job is stopped after that many seconds (exit 124).

The exit code of the launcher is 0 only when every worker exited 0.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

__all__ = [
    "LaunchError",
    "find_free_ports",
    "check_ports_free",
    "worker_environments",
    "launch",
    "main",
]

_HOST = "127.0.0.1"


class LaunchError(RuntimeError):
    """The launcher could not start the workers (bad argument, port in use)."""


def find_free_ports(count, host=_HOST):
    """Returns `count` distinct TCP ports that were free on `host` a moment ago.

    The sockets are bound to port 0 (the kernel picks), all held open until every port is
    chosen so the ports are distinct, then closed; a worker binds its port about a second
    later. Another program could take one in between: the worker then fails to start its
    gRPC server and the launcher reports it.

    Args:
      count: int >= 1, the number of ports.
      host: str, the interface to bind; default ``"127.0.0.1"``.

    Returns:
      A list of `count` ints.

    Raises:
      ValueError: if `count` < 1.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"Argument `count` must be an int >= 1. Received: count={count!r}")
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def check_ports_free(ports, host=_HOST):
    """Raises `LaunchError` naming the first port of `ports` that cannot be bound on `host`.

    Args:
      ports: iterable of ints in 1..65535.
      host: str, the interface; default ``"127.0.0.1"``.

    Raises:
      LaunchError: if a port is in use (or not bindable), with the port and the OS error.
    """
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise LaunchError(
                f"Port {host}:{port} is already in use ({err.strerror}); the workers need "
                f"ports {list(ports)}. Stop the program that holds it, pick another "
                "--base_port, or leave --base_port unset to use free ports."
            ) from None
        finally:
            sock.close()


def _visible_gpus(environ):
    text = environ.get("CUDA_VISIBLE_DEVICES")
    if text is None or not text.strip() or text.strip() == "-1":
        return []
    return [g.strip() for g in text.split(",") if g.strip()]


def worker_environments(ports, devices_per_worker=1, environ=None):
    """Builds each worker's environment: ``TF_CONFIG`` and the device settings.

    Args:
      ports: list of ints, one port on 127.0.0.1 per worker.
      devices_per_worker: int >= 1, replicas per worker. Exported as
        ``TFSCALE_DEVICES_PER_WORKER``; when ``CUDA_VISIBLE_DEVICES`` lists at least
        ``len(ports) * devices_per_worker`` GPUs, worker i gets GPUs
        ``[i * devices_per_worker, (i + 1) * devices_per_worker)`` of that list.
      environ: the base environment; default `os.environ`.

    Returns:
      A list of dicts (full environments), one per worker.

    Raises:
      ValueError: if `devices_per_worker` < 1, or GPUs are listed but too few.
    """
    environ = dict(os.environ if environ is None else environ)
    if isinstance(devices_per_worker, bool) or not isinstance(devices_per_worker, int) or devices_per_worker < 1:
        raise ValueError(
            "Argument `devices_per_worker` must be an int >= 1. "
            f"Received: devices_per_worker={devices_per_worker!r}"
        )
    gpus = _visible_gpus(environ)
    if gpus and len(gpus) < len(ports) * devices_per_worker:
        raise ValueError(
            f"CUDA_VISIBLE_DEVICES lists {len(gpus)} GPUs but --num_workers={len(ports)} x "
            f"--devices_per_worker={devices_per_worker} needs {len(ports) * devices_per_worker}."
        )
    workers = [f"{_HOST}:{port}" for port in ports]
    envs = []
    for index in range(len(ports)):
        env = dict(environ)
        env["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        )
        env["TFSCALE_DEVICES_PER_WORKER"] = str(devices_per_worker)
        env["PYTHONUNBUFFERED"] = "1"
        if gpus:
            start = index * devices_per_worker
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[start:start + devices_per_worker])
        # mpirun/SLURM variables would describe another cluster: TF_CONFIG wins anyway,
        # but drop them so that nothing downstream is confused.
        for key in list(env):
            if key.startswith("OMPI_COMM_WORLD_") or key in ("SLURM_PROCID", "SLURM_NTASKS"):
                del env[key]
        envs.append(env)
    return envs


def _describe_exit(code):
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def _shell_code(code):
    return 128 - code if code < 0 else code


def _pump(rank, stream, out, lock):
    prefix = f"[worker {rank}] "
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        with lock:
            out.write(prefix + line + "\n")
            out.flush()
    stream.close()


def launch(command, num_workers, devices_per_worker=1, base_port=None, grace_seconds=10.0,
           timeout_seconds=None, out=None, poll_seconds=0.1):
    """Runs `command` as `num_workers` workers on 127.0.0.1 and waits for them.

    Args:
      command: list of str, the program and its arguments (e.g.
        ``["python", "scripts/train.py", "--all_reduce=torus"]``).
      num_workers: int >= 1, the number of worker processes.
      devices_per_worker: int >= 1, replicas per worker (see `worker_environments`).
      base_port: int or None. None picks free ports; an int uses ports
        ``base_port .. base_port + num_workers - 1`` and fails if one is in use.
      grace_seconds: float >= 0, seconds between SIGTERM and SIGKILL when stopping the
        surviving workers; default 10.
      timeout_seconds: float or None, stop everything after this many seconds (wall clock)
        and return 124; default None (no limit).
      out: a text stream for the prefixed output and the launcher's messages; default
        `sys.stdout`.
      poll_seconds: float, how often the worker processes are polled; default 0.1 s.

    Returns:
      int: 0 when all workers exited 0; else the first non-zero exit code (128 + N for a
      worker killed by signal N; 124 on `timeout_seconds`).

    Raises:
      ValueError: if `command` is empty or a numeric argument is out of range.
      LaunchError: if a port in ``base_port ..`` is in use.
    """
    out = sys.stdout if out is None else out
    if not command:
        raise ValueError("Argument `command` must be a non-empty list, e.g. ['python', 'train.py'].")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"Argument `num_workers` must be an int >= 1. Received: num_workers={num_workers!r}")
    if grace_seconds < 0:
        raise ValueError(f"Argument `grace_seconds` must be >= 0. Received: grace_seconds={grace_seconds}")
    if timeout_seconds is not None and timeout_seconds <= 0:
        raise ValueError(
            f"Argument `timeout_seconds` must be > 0 or None. Received: timeout_seconds={timeout_seconds}"
        )
    if base_port is None:
        ports = find_free_ports(num_workers)
    else:
        if not 0 < base_port <= 65536 - num_workers:
            raise ValueError(
                f"Argument `base_port` must be in 1..{65536 - num_workers}. Received: base_port={base_port}"
            )
        ports = list(range(base_port, base_port + num_workers))
        check_ports_free(ports)
    envs = worker_environments(ports, devices_per_worker)
    lock = threading.Lock()

    def say(message):
        with lock:
            out.write(f"[launch] {message}\n")
            out.flush()

    say(f"starting {num_workers} workers on {', '.join(f'{_HOST}:{p}' for p in ports)}: {' '.join(command)}")
    procs, pumps = [], []
    try:
        for rank, env in enumerate(envs):
            proc = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
            procs.append(proc)
            pump = threading.Thread(target=_pump, args=(rank, proc.stdout, out, lock), daemon=True)
            pump.start()
            pumps.append(pump)
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        first_failure = None
        while True:
            codes = [proc.poll() for proc in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed and first_failure is None:
                first_failure = failed[0]
                rank, code = first_failure
                alive = [r for r, c in enumerate(codes) if c is None]
                say(
                    f"worker {rank} (pid {procs[rank].pid}) {_describe_exit(code)}; "
                    + (f"stopping workers {alive}" if alive else "no other worker is running")
                )
                break
            if all(c is not None for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                alive = [r for r, c in enumerate(codes) if c is None]
                say(f"timeout after {timeout_seconds:g} s; stopping workers {alive}")
                first_failure = (None, 124)
                break
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        say("interrupted; stopping all workers")
        first_failure = (None, 130)
    finally:
        _stop(procs, grace_seconds)
        for pump in pumps:
            pump.join(timeout=5)
    if first_failure is None:
        say(f"all {num_workers} workers exited 0")
        return 0
    rank, code = first_failure
    if rank is None:
        return code
    others = {r: p.returncode for r, p in enumerate(procs) if r != rank}
    say(f"exit codes: {dict(sorted({rank: code, **others}.items()))}; returning {_shell_code(code)}")
    return _shell_code(code)


def _stop(procs, grace_seconds):
    """SIGTERM each running worker's process group, then SIGKILL after the grace period."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_seconds
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m tfscale.launch",
        description="Run a training command as N MultiWorkerMirroredStrategy workers on 127.0.0.1.",
        epilog="Example: python -m tfscale.launch --num_workers 4 -- python scripts/train.py --all_reduce=torus",
    )
    parser.add_argument("--num_workers", type=int, required=True, help="number of worker processes (>= 1)")
    parser.add_argument("--devices_per_worker", type=int, default=1,
                        help="replicas per worker (GPUs are split between workers); default 1")
    parser.add_argument("--base_port", type=int, default=None,
                        help="use ports base_port..base_port+N-1 instead of free ones")
    parser.add_argument("--grace_seconds", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL when stopping workers; default 10")
    parser.add_argument("--timeout_seconds", type=float, default=None,
                        help="stop all workers after this many seconds (exit 124); default: no limit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given; put it after '--', e.g. -- python scripts/train.py")
    return args, command


def main(argv=None):
    """Command-line entry point; returns the exit code (see `launch`)."""
    args, command = _parse_args(sys.argv[1:] if argv is None else argv)

    def _on_sigterm(signum, frame):  # stop the workers when the launcher itself is stopped
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return launch(
            command, args.num_workers, devices_per_worker=args.devices_per_worker,
            base_port=args.base_port, grace_seconds=args.grace_seconds,
            timeout_seconds=args.timeout_seconds,
        )
    except (LaunchError, ValueError) as err:
        sys.stderr.write(f"[launch] error: {err}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
