"""Put on PYTHONPATH by bench/gpu_bench.py: if a stage is still alive 10 s after its main thread returned, dump every
thread's stack to stderr (then every 10 s), to find what holds stage 6 open for ~20 s after saving on the GPU."""
import faulthandler
import sys
import threading

_shutdown = threading._shutdown


def _traced_shutdown():
    faulthandler.dump_traceback_later(10, repeat=True, file=sys.__stderr__)
    _shutdown()


threading._shutdown = _traced_shutdown
