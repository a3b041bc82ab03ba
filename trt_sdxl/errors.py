"""The one exception type for mistakes a user can make (bad file, flag or input).

Entry points catch it and print its message as one line, without a traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message names the file, tensor or flag and what was expected."""
