import pyfunc  # noqa: F401  (the TensorFlow environment, set before TensorFlow loads)
