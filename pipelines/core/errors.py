"""Exceptions shared by the pipelines package.

Kept free of gradio so that the pipelines can be used (and tested) headless;
the UI layer decides how to present these errors (e.g. ``gr.Error(str(exc))``).
"""


class InputError(ValueError):
    """Bad user input (unreadable upload, wrong shape, too large...).

    ``str(exc)`` is a single, user-facing sentence, so the UI can show it as-is
    instead of a traceback. Subclasses ValueError so generic callers that
    already catch ValueError keep working.
    """
