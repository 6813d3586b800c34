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

__version__ = "0.1.0"
