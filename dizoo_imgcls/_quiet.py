import contextlib
import io
import logging
import warnings


def quiet_ding_import() -> None:
    """Import DI-engine without the notices it prints about optional packages (gym, numba, pyecharts, ...):
    none concern image classification, and they bury the first lines a user should read. A real import
    error still raises."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter('ignore')
            import ding.policy  # noqa: F401
            import ding.worker  # noqa: F401
    finally:
        logging.disable(previous)
