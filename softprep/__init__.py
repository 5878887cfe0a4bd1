"""softprep: soft-label pyramids for semantic segmentation, in Zarr stores.

The public API (imported on first use, so ``import softprep`` stays light)::

    from softprep import SoftStore, build_store, BuildOptions, load_manifest, verify_store

- ``SoftStore(url)``: read a store: ``read_soft``, ``read_probs``, ``read_rgb``,
  ``read_full_label``, ``hw``, ``stats``, ``classes``, ``scales``, ``splits``.
- ``build_store(manifest, root, url, BuildOptions(scales=(0.125, 0.25)))``: write one
  (``softprep.build.build``).
- ``load_manifest("cityscapes")``: a dataset definition; ``write_sample`` makes a small
  synthetic dataset in its official layout.
- ``verify_store(SoftStore(url))``: a ``VerifyReport`` of every problem.
"""

import atexit
import gc
import os
import sys
from contextlib import contextmanager
from importlib import import_module

__version__ = "0.1.0"
OWN_PROCESS = "SOFTPREP_OWN_PROCESS"  # set to 1 by the CLI (softprep.kernels); workers inherit it

_EXPORTS = {
    "SoftStore": "softprep.store",
    "StoreError": "softprep.store",
    "parse_scale": "softprep.store",
    "scale_label": "softprep.store",
    "build_store": "softprep.build",
    "BuildOptions": "softprep.options",
    "BuildError": "softprep.build",
    "BuildSummary": "softprep.build",
    "load_manifest": "softprep.manifest",
    "Manifest": "softprep.manifest",
    "ManifestError": "softprep.manifest",
    "DatasetError": "softprep.datasets",
    "write_sample": "softprep.sample",
    "verify_store": "softprep.verify",
    "VerifyReport": "softprep.verify",
    "PriorReport": "softprep.priors",
}
_RENAMED = {"build_store": "build", "verify_store": "verify"}  # the modules keep those names
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    raise AttributeError(f"module 'softprep' has no attribute '{name}'")


def run_console(package: str) -> None:
    """A console script (``softprep``, ``softtrain``): import ``package.cli`` and run its
    ``main``. A Ctrl-C while the CLI is still being imported (its first ~0.3 s) or parsing
    arguments is one line and exit 130, like one during the command.

    At the interpreter's exit, after every other exit handler, the collector's objects are
    frozen (``gc.freeze``): the exit then skips searching all the command built (numba, torch)
    for garbage cycles: 0.08 s of a 0.5 s ``softprep verify``, up to 0.19 s once numba has
    compiled (measured). The cost: cyclic garbage still uncollected at that moment is not
    finalised (a ``NamedTemporaryFile`` in a reference cycle stays on disk), which Python
    never promises at exit; none of our commands leaves any (checked: build, verify, fit).
    Called in-process (a notebook, a test), nothing is frozen while the caller lives, only
    at its exit, with the same cost to the caller's own cycles."""
    atexit.unregister(gc.freeze)  # one entry, however often it is called
    atexit.register(gc.freeze)  # first registered, so it runs last
    try:
        with gc_paused():
            run = import_module(f"{package}.cli").main
    except KeyboardInterrupt:
        print("interrupted before the command started", file=sys.stderr, flush=True)
        os._exit(130)  # not SystemExit: CPython 3.11 may still exit by SIGINT if the
        # interrupt came through exec()'d code (dataclasses), with no message
    try:
        run()
    except KeyboardInterrupt:  # outside a command's own handling (argument parsing, ...)
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        _forget_handled_interrupt()


@contextmanager
def gc_paused():
    """No garbage collection while the block runs (imports, numba loading the compiled
    kernels): they create ~150k long-lived objects, which Python's collector searches again
    and again as they grow (0.03 s of the CLI's 0.32 s import, 0.05 s of the kernels'
    0.28 s load, measured); what the block leaves is collected later as usual."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def keep_freed_buffers() -> None:
    """Have glibc keep freed buffers up to 32 MiB for the next image instead of handing them
    back to the OS: each image's decode otherwise pays its buffers again in page faults
    (build: ~40 MiB, ~25 ms of a 2048x1024 image's ~100 ms; verify of 701 CamVid images:
    596k faults, 1.0 s of its 2.5 s; measured). For the process (up to 512 MiB stays
    mapped), called where it works image by image. No-op without glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 512 << 20)


def _forget_handled_interrupt() -> None:
    """CPython 3.11 marks the process to end by SIGINT (silently, whatever its exit code)
    once a KeyboardInterrupt has passed through code that ``exec`` or ``eval`` of a string
    runs (dataclasses, namedtuple and numba build functions so), even if it was caught later;
    under ``python -m`` that overrides the exit code. A Ctrl-C at such a moment, handled and
    reported by the command, still ended it with -SIGINT and no message (3 of 100 timed
    tries at start-up, ~1 in 20 Ctrl-C tests). The command has handled it: the mark is
    cleared where this CPython exposes it (no-op elsewhere)."""
    import ctypes

    try:
        ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt").value = 0
    except (ValueError, AttributeError):  # another Python: the flag has moved or gone
        pass
