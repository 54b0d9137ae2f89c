"""The zygote's Python half: what a forked run does before and after the user's code, so that
the code sees what `python3 -I -u -c CODE` would give it.

Loaded once into the zygote (and taken out of `sys.modules`). The user's code itself is compiled
and executed from Rust, so that no frame of this module appears in its tracebacks.
"""

import atexit
import io
import os
import signal
import sys

# How the zygote's own interpreter set up its standard streams (from the locale it was started
# with, as CPython does for every interpreter): (encoding, errors) per stream.
_STDIO = [
    (stream.encoding, stream.errors)
    for stream in (sys.__stdin__, sys.__stdout__, sys.__stderr__)
]
# `__main__` as a fresh interpreter has it, before anything ran in it.
_MAIN = dict(sys.modules["__main__"].__dict__)


def prepare(python, preload):
    """In the zygote, once: the real interpreter as sys.executable, imports as `-I` has them."""
    sys.executable = python
    sys._base_executable = python
    import site

    # -I: no user site-packages (sys.path itself is replaced by the caller).
    site.ENABLE_USER_SITE = False
    # Runs start from every signal's default, whatever the agent was started with (a shell's
    # `nohup` or `&` ignores SIGHUP, SIGINT or SIGQUIT, and the zygote inherits that), as a
    # python3 started from a login shell does; done once here, every run inherits it.
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    # What CPython's own startup does with signals (the embedding API leaves them alone); SIGINT
    # is ignored by the zygote itself and restored to Python's handler in each run.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    failed = []
    for name in preload:
        try:
            __import__(name)
        except BaseException as exc:  # noqa: BLE001 - a preload must never stop the zygote
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    if "multiprocessing" in sys.modules:
        # A preload imported it before any run could: make sure it spawns the real python.
        sys.modules["multiprocessing"].set_executable(python)
    _install_run_state()
    # The first compile() in an interpreter builds its AST types (about 120 classes, made on
    # first use: compile() checks whether it was given an AST). A run compiles its code with
    # compile(), so unless the zygote did once, every run built them again: ~2.5 ms of a
    # run's CPU here, more than the rest of the run. Something a preload or a .pth file did
    # may have done it already; compile once so that no run has to.
    compile("pass", "<lull-zygote>", "exec")
    import gc

    # What the zygote holds now is shared by every run: keep the collector off it, so that
    # children do not copy its pages just to count references.
    gc.freeze()
    return failed


def set_base_environment(env):
    """In the zygote, when the part of the runs' environment that is the same for every run
    changes (in practice once): each run then only adds its own few variables, so that a run
    does not rebuild `os.environ` (and copy the pages that holds) to get the same values."""
    os.environ.clear()
    os.environ.update(env)


def _stream(fd, name, writable, encoding, errors):
    # CPython's create_stdio with -u: unbuffered binary layer for output, write-through text.
    if writable:
        raw = io.open(fd, "wb", buffering=0, closefd=False)
        buffer = raw
    else:
        buffer = io.open(fd, "rb", buffering=-1, closefd=False)
        raw = buffer.raw
    raw.name = name
    text = io.TextIOWrapper(
        buffer,
        encoding=encoding,
        errors=errors,
        newline="\n",
        line_buffering=False,
        write_through=True,
    )
    text.mode = "w" if writable else "r"
    return text


def _fresh_main():
    main = type(sys)("__main__")
    main.__dict__.update(_MAIN)
    if "__annotations__" in _MAIN:
        main.__annotations__ = {}
    return main


def _install_run_state():
    """In the zygote, once: the interpreter state every run starts from, what `python3 -I -u
    -c` builds at startup (the standard streams, `sys.argv` and `__main__`), installed in the
    zygote itself, which never uses its own again, so that each forked run has it in place,
    as its own copy, instead of making or setting it (each object a run makes or sets costs it
    copy-on-write page faults). A run's fds 1 and 2 are always pipes and 0 is /dev/null (as
    the zygote's own 0 is): the streams are made while 1 and 2 are a pipe, so that what they
    learn of their file at creation (not seekable) is what it will be in every run; the
    zygote's own 1 and 2 are put back afterwards (the streams write to whatever fd 1 and 2
    are: in the zygote, its own)."""
    read, write = os.pipe()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(write, 1)
        os.dup2(write, 2)
        streams = [
            _stream(fd, name, fd != 0, *_STDIO[fd])
            for fd, name in enumerate(("<stdin>", "<stdout>", "<stderr>"))
        ]
        for stream in streams:
            stream.seekable()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [read, write]:
            os.close(fd)
    sys.stdin, sys.stdout, sys.stderr = streams
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams
    sys.argv = ["-c"]
    sys.modules["__main__"] = _fresh_main()


def system_exit_status(exc):
    """The exit status of an uncaught SystemExit, printing its message as CPython does."""
    try:
        value = exc.code
    except BaseException:  # noqa: BLE001
        value = exc
    if value is None:
        return 0
    if isinstance(value, int):
        # CPython: (int)PyLong_AsLong(value), -1 when it does not fit; exit() keeps 8 bits.
        return (value if -(2**63) <= value < 2**63 else -1) & 0xFF
    try:
        sys.stderr.write(str(value))
        sys.stderr.write("\n")
    except BaseException:  # noqa: BLE001
        pass
    return 1


def _unraisable(what):
    try:
        print(f"Exception ignored in: {what!r}", file=sys.stderr)
        import traceback

        traceback.print_exc()
    except BaseException:  # noqa: BLE001
        pass


def finish(status, interrupted):
    """What Py_FinalizeEx does that a run can see: wait for threads, run atexit callbacks, flush
    the standard streams (120 when stdout cannot be flushed). Returns the exit status."""
    threading = sys.modules.get("threading")
    if threading is not None:
        try:
            threading._shutdown()
        except BaseException:  # noqa: BLE001
            _unraisable(threading)
    atexit._run_exitfuncs()
    for stream, is_stdout in ((sys.stdout, True), (sys.stderr, False)):
        try:
            if stream is None or stream.closed:
                continue
        except BaseException:  # noqa: BLE001
            continue
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            if is_stdout:
                _unraisable(stream)
            status = 120
    if interrupted:
        # An uncaught KeyboardInterrupt ends python by SIGINT, so its parent sees that.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        status = 130
    return status
