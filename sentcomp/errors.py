"""The one exception type for user mistakes: bad config, unknown task/model, missing asset, malformed data."""


class SentcompError(Exception):
    """A problem the user can fix; the message says what was expected and how to fix it."""
