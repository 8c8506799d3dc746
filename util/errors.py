"""The one exception type for problems a user fixes by changing an input: a setting, a path, a file,
free disk. Library code raises it with a message that names the input and the fix; only the
``main_*`` scripts and ``app.py`` turn it into an exit status and one line (``util.runtime.user_errors``)."""


class UserError(Exception):
    """A problem with the run's inputs or environment that its one-line message explains."""
