"""The one exception type for user mistakes: bad config, unknown task/model, missing asset, malformed data."""

import dataclasses


class SentcompError(Exception):
    """A problem the user can fix; the message says what was expected and how to fix it."""


class ResumeRefused(SentcompError):
    """A program refused to continue what its workdir holds (a checkpoint of other settings, one it cannot read
    for a reason that is not damage) before changing anything there: the launcher then leaves the workdir's
    record (``done.json``, ``config.json``, ``runs.jsonl``) as it found it."""


def check_sizes(config, *keys: str) -> None:
    """Each dotted ``key`` of ``config`` (a count: a size, a batch, a length) must be ≥ 1; otherwise
    :class:`SentcompError` names the first that is not."""
    for key in keys:
        value = config
        for part in key.split("."):
            value = value[part]
        if value < 1:
            raise SentcompError(f"config.{key} must be ≥ 1, got {value}.")


def field_names(cls) -> list[str]:
    """The field names of the dataclass ``cls`` (an instance works too), in declaration order."""
    return [field.name for field in dataclasses.fields(cls)]


def check_fields(keys, cls, what: str) -> None:
    """Every name among ``keys`` must be a field of the dataclass ``cls``; otherwise one :class:`SentcompError`
    ``Unknown {what} keys [...]; known keys: [...]`` (both sorted)."""
    unknown = sorted(set(keys) - set(field_names(cls)))
    if unknown:
        raise SentcompError(f"Unknown {what} keys {unknown}; known keys: {sorted(field_names(cls))}.")


def replace_settings(options, settings: dict, what: str):
    """The frozen dataclass ``options`` with the fields named in ``settings`` replaced (checked again as it is
    rebuilt); a name that is no field of it is one clear :class:`SentcompError` naming ``what`` and listing the
    known fields, instead of a ``TypeError`` deep inside a call."""
    known = field_names(options)
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise SentcompError(f"unknown {what}{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                            f"the known ones are {', '.join(known)}")
    return dataclasses.replace(options, **settings) if settings else options
