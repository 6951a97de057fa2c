"""A vendor plugin whose import fails, as when its native library is missing."""

raise ImportError("libacme_kernels.so: cannot open shared object file: No such file or directory")
