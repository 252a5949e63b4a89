"""The one exception type for input a user must fix (a config field, a data file, a workdir).

Entry points catch `InputError` wherever it is raised (config checks, building the data
pipeline, restoring a checkpoint) and print its message as one line with exit status 2;
any other exception is a bug and keeps its traceback. It subclasses ValueError, so code
that catches ValueError still catches it.
"""


class InputError(ValueError):
    """A bad input; the message names the field or file and the fix."""
