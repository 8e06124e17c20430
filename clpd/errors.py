"""The one exception type that clpd reports to users as a single line (no traceback)."""


class ClpdError(Exception):
    """A problem with the user's input: a config value, a path, a data file.

    The CLI prints ``clpd <command>: error: <message>`` and exits with status 1, so the message
    must name the offending key, path or line, and the allowed values where there are any.
    """
