"""Put on PYTHONPATH by bench/gpu_bench.py, to see what keeps a stage alive after its work (it found the loader
workers that held stage 6 ~20 s after saving on the GPU: docs/performance.md, "Exiting").

If a process is still alive 10 s after its main thread returned, every thread's stack is written to stderr (then
every 10 s), and its Python child processes (loader workers, inductor's compile pool) are asked to write theirs
(SIGUSR1, registered here, so forked children inherit the handler)."""
import faulthandler
import os
import signal
import sys
import threading

faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
_shutdown = threading._shutdown


def _python_children() -> list:
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError as e:
            print(f"exit_trace: /proc/self/task/{task}/children: {e}", file=sys.__stderr__)
    python = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"python" in f.read():
                    python.append(pid)
        except OSError as e:
            print(f"exit_trace: child {pid}: {e}", file=sys.__stderr__)
    return python


def _signal_children_later() -> None:
    threading.Event().wait(10)
    for pid in _python_children():
        print(f"exit_trace: asking child {pid} for its stacks", file=sys.__stderr__, flush=True)
        os.kill(pid, signal.SIGUSR1)


def _traced_shutdown():
    faulthandler.dump_traceback_later(10, repeat=True, file=sys.__stderr__)
    threading.Thread(target=_signal_children_later, daemon=True).start()
    _shutdown()


threading._shutdown = _traced_shutdown
