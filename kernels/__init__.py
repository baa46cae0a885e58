"""npmobile's kernels: reference.py (plain NumPy, the definitions) and the Numba kernels beside it.

Numba's OpenMP workers spin for a while after each parallel kernel before they sleep (libgomp's
default is 300,000 spins). Between two depthwise layers npmobile runs the pointwise product on the
same cores with its own threads, and spinning workers steal those cores: on this 2-core machine
MobileNet V1 ran 15.8 ms with the default and 11.0 ms with 1,000 spins (V2 10.7 -> 9.6 ms).
The setting must be in the environment before libgomp starts, so it is set here, on import, and
only when the user has not chosen a value.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "1000")
