"""The CPU kernels of ``lsq_kernels.cc``: LSQ quantizer forward and backward, one pass each.

The XLA kernels of :mod:`metamix_tf.quant.ops` are compiled once per tensor shape and
write one full-size temporary per gradient term before TensorFlow reduces it; these read
each input once, write each output once and reduce while they go (a per-tensor step on
TensorFlow's intra-op threads), with the values of TensorFlow's own ops bit for bit (sums
in float64, in a fixed order). They exist for the training and
evaluation steps of :mod:`metamix_tf.training.steps`, which trace the model inside
:func:`enabled_in`; every other graph (a user's ``model.fit``, ``model.export``, the TFLite
conversion) keeps TensorFlow's own ops, so no SavedModel ever needs this library.

The library is compiled from source with the C++ compiler (``$CXX``, else ``g++``) against
the installed TensorFlow's headers the first time a step needs it (about 20 s, once) and
cached in ``$METAMIX_TF_CACHE`` (default ``~/.cache/metamix_tf``), keyed by the source,
the TensorFlow version, the compiler and the CPU's instruction sets. Without a compiler,
or with ``METAMIX_TF_NATIVE_OPS=0``, the XLA kernels run instead (one warning says why).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings

import tensorflow as tf
from tensorflow.python.ops import control_flow_util  # XLA-context check (private module)

from metamix_tf.config import switched_on

__all__ = ["library", "load", "enabled_in", "active", "build_flags", "SOURCE", "MAX_BRANCHES"]

SOURCE = os.path.join(os.path.dirname(__file__), "lsq_kernels.cc")
MAX_BRANCHES = 8  # kMaxBranches of the mixture kernels
_DEPTH = [0]  # enabled_in() nesting; process-wide: MirroredStrategy traces replicas in threads


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_X86_64_V4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
_X86_64_V3 = {"avx2", "fma", "f16c"}


def build_flags() -> list[str]:
    """Compiler flags: TensorFlow's own, optimisation without changing float results
    (no FMA contraction; ``-fno-trapping-math`` only lets selects vectorize), and on x86-64
    the CPU's level: x86-64-v4 (AVX-512: the kernels' vector types take 16 lanes) or
    x86-64-v3 (AVX2: 8 lanes, and the single quantizer on the compiler's own loops).
    ``METAMIX_TF_NATIVE_ARCH`` sets that level instead (``x86-64-v3``, ... or ``none``),
    e.g. to build one cache for machines of several generations."""
    flags = ["-O3", "-shared", "-fPIC", "-w", "-ffp-contract=off", "-fno-math-errno",
             "-fno-trapping-math"]
    arch = os.environ.get("METAMIX_TF_NATIVE_ARCH")
    if arch is None and platform.machine() in ("x86_64", "AMD64"):
        cpu = _cpu_flags()
        arch = ("x86-64-v4" if cpu >= _X86_64_V4 | _X86_64_V3
                else "x86-64-v3" if cpu >= _X86_64_V3 else None)
    if arch and arch != "none":
        flags.append(f"-march={arch}")
    return flags + list(tf.sysconfig.get_compile_flags())


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _cache_path(compiler: str, source: str = SOURCE) -> str:
    with open(source, "rb") as f:
        key = hashlib.sha256(f.read())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    for part in (tf.__version__, version, " ".join(build_flags()), sys.platform):
        key.update(part.encode())
    root = os.environ.get("METAMIX_TF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "metamix_tf")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError:  # a read-only home: the temporary directory instead
        root = os.path.join(tempfile.gettempdir(), f"metamix_tf-{os.getuid()}")
    return os.path.join(root, f"lsq_kernels-{key.hexdigest()[:16]}.so")


def _build(compiler: str, path: str, source: str = SOURCE) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print("metamix_tf: compiling the native quantizer kernels (once, about 20 s) ...",
          file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        command = [compiler, *build_flags(), source, "-o", tmp, *tf.sysconfig.get_link_flags()]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line]
            raise RuntimeError((errors or result.stderr.splitlines() or ["no output"])[0])
        os.replace(tmp, path)  # atomic: a concurrent build writes the same file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(source: str = SOURCE):
    """``source`` compiled (cached as described above) and loaded with
    ``tf.load_op_library``; raises when there is no compiler or the build fails. A process
    can load one build of the kernels only (their ops are registered by name)."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (set $CXX or install g++)")
    path = _cache_path(compiler, source)
    if not os.path.exists(path):
        _build(compiler, path, source)
    return tf.load_op_library(path)


@functools.cache
def library():
    """The loaded op library (``tf.load_op_library``), built first if needed; None (with
    one warning naming the reason) when it cannot be, or ``METAMIX_TF_NATIVE_OPS=0``."""
    if not switched_on("METAMIX_TF_NATIVE_OPS"):
        return None
    if _compiler() is None:
        warnings.warn("metamix_tf: no C++ compiler (set $CXX or install g++): the quantizers "
                      "use their XLA kernels, which are slower", stacklevel=2)
        return None
    try:
        return load()
    except Exception as e:  # a compiler or loader failure must not stop training
        warnings.warn(f"metamix_tf: the native quantizer kernels are unavailable ({e}); the "
                      "quantizers use their XLA kernels, which are slower", stacklevel=2)
        return None


@contextlib.contextmanager
def enabled_in():
    """Trace-time context: quantizers traced inside it use the native kernels (where
    :func:`active` allows)."""
    _DEPTH[0] += 1
    try:
        yield
    finally:
        _DEPTH[0] -= 1


def active(x: tf.Tensor):
    """The library if a quantizer of ``x`` should run natively here: inside
    :func:`enabled_in`, building a graph that XLA will not compile, ``x`` float32 (else
    None). The ops have CPU kernels only (soft placement keeps them there)."""
    if _DEPTH[0] == 0 or tf.executing_eagerly() or x.dtype != tf.float32:
        return None
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        return None
    return library()
