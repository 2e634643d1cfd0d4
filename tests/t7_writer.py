"""A minimal Torch7 binary serializer, for tests only: it writes the authors' .t7 layout
(a table {model = nn.Sequential, mean = ...}) so that the .t7 reader can be tested
without the authors' 80 MB release. Covers the types that layout uses."""

import struct

import numpy as np
import torch
from torch import nn

from glcic_fast.nn.architecture import COMPLETION_LAYERS
from glcic_fast.nn.reference import make_conv

NIL, NUMBER, STRING, TABLE, TORCH, BOOLEAN = 0, 1, 2, 3, 4, 5


class TorchClass:
    """A Torch7 object of class ``name`` whose content is the table ``fields``."""

    def __init__(self, name, fields):
        self.name, self.fields = name, fields


class RawTensor:
    """A FloatTensor written with the header given (sizes, strides, 1-based storage offset)
    over ``storage``, whether or not that header fits it: for testing the reader's checks."""

    def __init__(self, storage, size, stride, offset=1):
        self.storage = np.asarray(storage, dtype=np.float32)
        self.size, self.stride, self.offset = size, stride, offset


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
            array = np.ascontiguousarray(obj, dtype=np.float32)
            self._tensor(RawTensor(array.ravel(), array.shape, [s // array.itemsize for s in array.strides]))
        elif isinstance(obj, RawTensor):
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

    def _tensor(self, tensor):
        self._int(TORCH)
        self._index()
        self._string("V 1")
        self._string("torch.FloatTensor")
        self._int(len(tensor.size))
        for s in tensor.size:
            self._long(s)
        for s in tensor.stride:
            self._long(s)
        self._long(tensor.offset)
        self._int(TORCH)
        self._index()
        self._string("V 1")
        self._string("torch.FloatStorage")
        self._long(tensor.storage.size)
        self.f.write(tensor.storage.tobytes())


def write_t7(path, obj):
    with open(path, "wb") as f:
        T7Writer(f).write(obj)


# -- the authors' model ------------------------------------------------------------------

def authors_sequential(seed):
    """The authors' layout as a PyTorch nn.Sequential: [conv, BN, ReLU] x 16, conv, Sigmoid."""
    modules = []
    for spec in COMPLETION_LAYERS:
        modules.append(make_conv(spec))
        if spec.has_bn:
            modules += [nn.BatchNorm2d(spec.out_channels), nn.ReLU()]
    modules.append(nn.Sigmoid())
    seq = nn.Sequential(*modules)
    assert len(seq) == 50
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in seq:
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return seq.eval()


def authors_t7_table(seq, mean, old_bn=False):
    """The authors' .t7 structure for the weights of ``seq``."""
    modules = []
    for m in seq:
        a = lambda t: t.detach().numpy().astype(np.float32)
        if isinstance(m, nn.ConvTranspose2d):
            modules.append(TorchClass("nn.SpatialFullConvolution", {"weight": a(m.weight), "bias": a(m.bias), "dW": 2, "dH": 2, "padW": 1, "padH": 1}))
        elif isinstance(m, nn.Conv2d):
            name = "nn.SpatialDilatedConvolution" if m.dilation[0] > 1 else "nn.SpatialConvolution"
            # Torch7 SpatialConvolution often keeps its weight flattened to 2-d.
            weight = a(m.weight).reshape(m.weight.shape[0], -1)
            modules.append(TorchClass(name, {"weight": weight, "bias": a(m.bias), "dilationW": m.dilation[0]}))
        elif isinstance(m, nn.BatchNorm2d):
            fields = {"weight": a(m.weight), "bias": a(m.bias), "running_mean": a(m.running_mean), "eps": 1e-5, "momentum": 0.1, "affine": True}
            if old_bn:
                fields["running_std"] = (1 / np.sqrt(a(m.running_var).astype(np.float64) + 1e-5)).astype(np.float32)
            else:
                fields["running_var"] = a(m.running_var)
            modules.append(TorchClass("nn.SpatialBatchNormalization", fields))
        elif isinstance(m, nn.ReLU):
            modules.append(TorchClass("nn.ReLU", {"inplace": True}))
        else:
            modules.append(TorchClass("nn.Sigmoid", {}))
    return {"model": TorchClass("nn.Sequential", {"modules": modules, "train": False}), "mean": np.array(mean, dtype=np.float32)}
