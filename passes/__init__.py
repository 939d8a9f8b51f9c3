"""ocomp passes: one module a pass; importing this package registers them all."""

from . import ternary  # noqa: F401
from . import foldbn  # noqa: F401
from . import prune  # noqa: F401
from . import bnrecal  # noqa: F401,E402
from . import w2a8  # noqa: F401,E402
