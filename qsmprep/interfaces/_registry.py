"""The trait of an interface input that names a method of the registry (:mod:`qsmprep.methods`)."""

from __future__ import annotations

from nipype.interfaces.base import traits

from qsmprep import methods as registry

__all__ = ["MethodName"]


class MethodName(traits.BaseStr):
    """The name of a registered method of one stage (and kind), or one of ``extra``.

    Checked on assignment against the registry as it is then, so methods registered at run
    time are accepted.
    """

    def __init__(self, stage: str, default_value=None, *, kind=None, extra=(), **metadata):
        self._stage, self._kind, self._extra = stage, kind, tuple(extra)
        if default_value is None:
            super().__init__(**metadata)
        else:
            super().__init__(default_value, **metadata)

    def _choices(self) -> tuple[str, ...]:
        return (*self._extra, *registry.names(self._stage, kind=self._kind))

    def validate(self, obj, name, value):
        value = super().validate(obj, name, value)
        if value not in self._choices():
            self.error(obj, name, value)
        return value

    def info(self):
        return "one of " + ", ".join(map(repr, self._choices()))
