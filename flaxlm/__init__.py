"""flaxlm: pretraining decoder Transformers with JAX, Flax, jax.sharding, tf.data and Orbax."""

import os as _os

# TensorFlow (the input pipeline) prints C++ start-up chatter about oneDNN and CPU features at
# import; it is noise here. A value set by the user wins. (oneDNN only speeds up TensorFlow's
# own float ops, which the pipeline does not use.)
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# gs:// paths (run directories, configs, data) go through etils epath; with TensorFlow installed
# it would pick TensorFlow's GCS client, whose endpoints are fixed (no emulator, no private
# endpoint). gcsfs, its other backend, honours STORAGE_EMULATOR_HOST. See flaxlm/fs.py.
_os.environ.setdefault("EPATH_USE_TF", "false")


def _quiet_libtpu_without_tpus() -> None:
    """With libtpu installed (extra `tpu`) but no TPU attached, jax's TPU plugin asks the cloud
    metadata server for the accelerator type and worker host names and prints errors when there
    is none. Tell it there is nothing to ask, unless TPU devices (/dev/accel*, /dev/vfio) exist
    or the user set these themselves; CPU and GPU platforms and ahead-of-time compilation for
    TPU topologies are unaffected."""
    import glob

    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/*"):
        return
    for key, value in (
        ("TPU_SKIP_MDS_QUERY", "1"),
        ("TPU_WORKER_HOSTNAMES", "localhost"),
        ("TPU_HOST_BOUNDS", "1,1,1"),
    ):
        _os.environ.setdefault(key, value)


_quiet_libtpu_without_tpus()

__version__ = "0.1.0"
