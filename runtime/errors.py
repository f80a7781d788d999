"""The one exception type a user mistake raises, everywhere in Kiln."""


class KilnError(Exception):
    """A problem the user can fix: the message names what is wrong and what to do.

    The CLI prints it as one line and exits non-zero; the Python API lets it propagate.
    """
