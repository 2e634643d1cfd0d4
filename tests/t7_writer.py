"""A minimal Torch7 binary serializer, for tests only: it writes the authors' .t7 layout
(a table {model = nn.Sequential, mean = ...}) so that the .t7 reader can be tested
without the authors' 80 MB release. Covers the types that layout uses."""

import struct

import numpy as np

NIL, NUMBER, STRING, TABLE, TORCH, BOOLEAN = 0, 1, 2, 3, 4, 5


class TorchClass:
    """A Torch7 object of class ``name`` whose content is the table ``fields``."""

    def __init__(self, name, fields):
        self.name, self.fields = name, fields


class T7Writer:
    def __init__(self, f):
        self.f, self.next_index = f, 1

    def _int(self, v):
        self.f.write(struct.pack("<i", v))

    def _long(self, v):
        self.f.write(struct.pack("<q", v))

    def _string(self, s):
        b = s.encode() if isinstance(s, str) else s
        self._int(len(b))
        self.f.write(b)

    def _index(self):
        self._int(self.next_index)
        self.next_index += 1

    def write(self, obj):
        if obj is None:
            self._int(NIL)
        elif isinstance(obj, bool):
            self._int(BOOLEAN)
            self._int(int(obj))
        elif isinstance(obj, (int, float)):
            self._int(NUMBER)
            self.f.write(struct.pack("<d", float(obj)))
        elif isinstance(obj, str):
            self._int(STRING)
            self._string(obj)
        elif isinstance(obj, np.ndarray):
            self._tensor(obj)
        elif isinstance(obj, TorchClass):
            self._int(TORCH)
            self._index()
            self._string("V 1")
            self._string(obj.name)
            self.write(obj.fields)
        elif isinstance(obj, (dict, list)):
            items = obj.items() if isinstance(obj, dict) else ((i + 1, v) for i, v in enumerate(obj))
            items = list(items)
            self._int(TABLE)
            self._index()
            self._int(len(items))
            for k, v in items:
                self.write(k)
                self.write(v)
        else:
            raise TypeError(type(obj))

    def _tensor(self, array):
        array = np.ascontiguousarray(array, dtype=np.float32)
        self._int(TORCH)
        self._index()
        self._string("V 1")
        self._string("torch.FloatTensor")
        self._int(array.ndim)
        for s in array.shape:
            self._long(s)
        for s in array.strides:
            self._long(s // array.itemsize)
        self._long(1)  # storage offset, 1-based
        self._int(TORCH)
        self._index()
        self._string("V 1")
        self._string("torch.FloatStorage")
        self._long(array.size)
        self.f.write(array.tobytes())


def write_t7(path, obj):
    with open(path, "wb") as f:
        T7Writer(f).write(obj)
