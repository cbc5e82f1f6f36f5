"""``procs.exit_promptly``: the exit handlers and the streams are kept, the teardown skipped only when
nothing else would still run."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


def test_exit_handlers_run_and_buffered_output_is_flushed():
    out = _run("""
        import atexit, sys, tempfile, os
        from fasteval.procs import exit_promptly
        folder = tempfile.TemporaryDirectory()  # removed by a weakref finalizer at exit
        print(folder.name)
        atexit.register(lambda: print("handler ran"))
        sys.stdout.write("buffered, no newline")
        class Teardown:
            def __del__(self):
                print("teardown ran")
        keep = Teardown()  # a module global: only the interpreter's teardown would finalise it
        exit_promptly(3)
    """)
    assert out.returncode == 3, out.stderr
    lines = out.stdout.splitlines()
    import os

    assert not os.path.exists(lines[0])  # tempfile's exit finalizer ran
    assert "handler ran" in out.stdout and "buffered, no newline" in out.stdout
    assert "teardown ran" not in out.stdout  # the teardown was skipped


def test_a_live_thread_or_child_takes_the_normal_exit():
    thread = _run("""
        import threading, time
        from fasteval.procs import exit_promptly
        def late():
            time.sleep(0.3)
            print("thread finished")
        threading.Thread(target=late).start()
        exit_promptly(0)
    """)
    assert thread.returncode == 0 and "thread finished" in thread.stdout
    child = _run("""
        import subprocess, sys
        from fasteval.procs import exit_promptly
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
        class Teardown:
            def __del__(self):
                print("teardown ran", flush=True)
        keep = Teardown()
        exit_promptly(4)
    """)
    assert child.returncode == 4 and "teardown ran" in child.stdout  # the normal exit, teardown included


def test_a_stream_that_cannot_be_flushed_does_not_fail_the_exit():
    out = _run("""
        import io, sys
        from fasteval.procs import exit_promptly
        class ClosedPipe(io.StringIO):
            def flush(self):
                raise BrokenPipeError(32, "Broken pipe")
        sys.stdout = ClosedPipe()
        exit_promptly(5)
    """)
    assert out.returncode == 5 and "Traceback" not in out.stderr
