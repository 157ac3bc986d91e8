# Moved to floe.testing.distributed (benchmarks share it; tools never import tests). This alias lets work in
# flight land this session; the lead removes it once every import says floe.testing.
import sys

from floe.testing import distributed as _moved

sys.modules[__name__] = _moved
