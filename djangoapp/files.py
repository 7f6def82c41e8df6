"""A cluster's or job's file list, as this project returns it and as the seed's
portals read it."""

__all__ = ["FileList", "GET_FILE_TREE"]

GET_FILE_TREE = 2003  # the seed's message id of a file list


class FileList(list):
    """A list of ``{"path", "is_dir", "size"}`` dicts (paths without a leading
    ``/``) that also reads like the seed's GET_FILE_TREE message, for portal
    code written against it::

        files.pop_uint()      # the message id, 2003
        count = files.pop_uint()
        for _ in range(count):
            files.pop_string(), files.pop_bool(), files.pop_ulong()
            # path with a leading "/", is a directory, size

    The pops only move a read cursor: the list itself is left as it is.
    """

    _KINDS = ("string", "bool", "ulong")

    def __init__(self, entries=()):
        super().__init__(entries)
        self._cursor = 0

    def _pop(self, kind):
        if self._cursor < 2:
            value = GET_FILE_TREE if self._cursor == 0 else len(self)
            expected = "uint"
        else:
            index, part = divmod(self._cursor - 2, 3)
            if index >= len(self):
                raise IndexError(f"the file list has {len(self)} entries and all were read")
            entry, expected = self[index], self._KINDS[part]
            value = ("/" + entry["path"].lstrip("/"), entry["is_dir"], entry["size"])[part]
        if kind != expected:
            raise TypeError(f"the file list holds a {expected} here, not a {kind}: read it as "
                            "uint (message id), uint (count), then string, bool, ulong per entry")
        self._cursor += 1
        return value

    def pop_uint(self):
        return self._pop("uint")

    def pop_string(self):
        return self._pop("string")

    def pop_bool(self):
        return self._pop("bool")

    def pop_ulong(self):
        return self._pop("ulong")


